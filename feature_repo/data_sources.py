"""Batch sources: Parquet files that `unipinrec.features.write_sources` derives from RAW events.

Paths are relative to the feature repo, so a copied repo (a pipeline artifact) stays valid:
Feast resolves a relative FileSource path against the repo it is loaded from.
"""
from feast import FileSource

user_history_source = FileSource(
    name="user_history_source",
    path="data/user_history.parquet",
    timestamp_field="event_timestamp",
    description=(
        "One row per (user, distinct action time t): the user's last L actions with ts <= t. "
        "event_timestamp is t + 1 s, the first moment the snapshot may be seen, so a point-in-time "
        "join at request_ts only sees actions strictly before request_ts."
    ),
)

item_features_source = FileSource(
    name="item_features_source",
    path="data/item_features.parquet",
    timestamp_field="event_timestamp",
    description="One row per item: its static attributes, valid from the start of the dataset.",
)
