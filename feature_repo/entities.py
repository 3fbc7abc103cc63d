"""Entities: who and what the features describe. Join keys match the unified format's ids."""
from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.INT64,
    description="A user whose action sequence (history) the model encodes; `user_id` of the unified format.",
    tags={"owner": "unipinrec"},
)

item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.INT64,
    description="A catalog item (pin, movie...); `item_id` of the unified format.",
    tags={"owner": "unipinrec"},
)
