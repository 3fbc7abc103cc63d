"""Feature view: the user's action sequence as array features (the latest L actions).

The online store keeps the latest row per user, so the whole sequence is one row of parallel
arrays (item, action, ts, surface), oldest first, as in `UnifiedExample.history`.
"""
from datetime import timedelta

from feast import FeatureView, Field
from feast.types import Array, Int32, Int64

from data_sources import user_history_source
from entities import user

user_history = FeatureView(
    name="user_history",
    entities=[user],
    ttl=timedelta(0),  # 0 = never expires: an old history is still the user's history
    schema=[
        Field(name="hist_item_ids", dtype=Array(Int64), description="item_id of each action, oldest first"),
        Field(name="hist_actions", dtype=Array(Int32), description="action id of each action (the source's vocabulary)"),
        Field(name="hist_ts", dtype=Array(Int64), description="time of each action, seconds since the epoch"),
        Field(name="hist_surfaces", dtype=Array(Int32), description="surface id of each action"),
        Field(name="hist_len", dtype=Int64, description="number of actions in the arrays (at most L)"),
    ],
    source=user_history_source,
    online=True,
    description="The latest L actions of a user, strictly before the point-in-time of the lookup.",
    tags={"owner": "unipinrec", "unified_format_field": "history"},
)
