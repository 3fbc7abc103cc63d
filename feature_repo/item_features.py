"""Feature view: static item attributes (the catalog), kept apart from the user history."""
from datetime import timedelta

from feast import FeatureView, Field
from feast.types import Int64, String

from data_sources import item_features_source
from entities import item

item_features = FeatureView(
    name="item_features",
    entities=[item],
    ttl=timedelta(0),  # static attributes never expire
    schema=[
        Field(name="category", dtype=Int64, description="topic (synthetic) or first genre (MovieLens) id"),
        Field(name="title", dtype=String, description="human-readable title, when the source has one"),
    ],
    source=item_features_source,
    online=True,
    description="Catalog attributes of an item, as in the RAW items table.",
    tags={"owner": "unipinrec"},
)
