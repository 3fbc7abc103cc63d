"""Feature services: the versioned feature sets that consumers ask for by name.

Bump the version (a new service, the old one kept) when a served model needs different
features, so a model trained on `unipinrec_v1` keeps reading exactly `unipinrec_v1`.
"""
from feast import FeatureService

from item_features import item_features
from user_history import user_history

unipinrec_v1 = FeatureService(
    name="unipinrec_v1",
    features=[user_history],
    description="What the UniPinRec model reads: the user's history (training examples and serving).",
    tags={"version": "1", "owner": "unipinrec"},
)

item_catalog_v1 = FeatureService(
    name="item_catalog_v1",
    features=[item_features],
    description="Item attributes for catalog lookups (index building, explanations).",
    tags={"version": "1", "owner": "unipinrec"},
)
