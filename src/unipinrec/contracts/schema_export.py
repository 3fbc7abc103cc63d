"""JSON Schema (draft 2020-12) of the unified format, generated from the pyarrow schemas in
format.py, so that tools outside Python (or a request validator) can check one record.

One record = one Parquet row as JSON: int columns are JSON integers (range of the Arrow width),
nullable fields accept null, lists are arrays, structs are objects with every field required.
"""
from __future__ import annotations

import pyarrow as pa

from ..format import EVENTS_SCHEMA, ITEMS_SCHEMA, UNIFIED_EXAMPLE_SCHEMA

DIALECT = "https://json-schema.org/draft/2020-12/schema"

# What each field means; also the descriptions in the JSON schemas. Keys: table.field or
# table.list.field for the nested structs.
FIELD_DOCS = {
    "events.user_id": "who acted",
    "events.item_id": "which item (must exist in the items table)",
    "events.action": "action id in the dataset's vocabulary (meta.json 'actions'); 0 = impression (shown, not engaged)",
    "events.ts": "when, in seconds since the Unix epoch",
    "events.surface": "where the action happened (synthetic: 0 = feed, 1 = organic; MovieLens: 0)",
    "events.request_id": "feed request of an impression row; null for organic (non-feed) actions",
    "events.position": "slate position of an impression row (0 = top); null for organic actions",
    "items.item_id": "the item's id (unique)",
    "items.category": "topic (synthetic) or first genre (MovieLens)",
    "items.title": "human-readable title, when the source has one",
    "examples.user_id": "whose feed request this is",
    "examples.request_ts": "when the feed was requested, in seconds since the Unix epoch",
    "examples.history": "the user's actions strictly before request_ts, oldest first, the last L kept",
    "examples.history.item_id": "item acted on",
    "examples.history.action": "action id in the vocabulary",
    "examples.history.ts": "when, in seconds (< request_ts, non-decreasing along the list)",
    "examples.history.surface": "where the action happened",
    "examples.slate": "what the feed showed at request_ts (may be empty); the ranker's labelled candidates",
    "examples.slate.item_id": "item shown",
    "examples.slate.position": "slate position (0 = top), unique within the slate",
    "examples.slate.action": "what the user did with it; 0 = shown, not engaged (a real negative)",
}

TITLES = {"events": "unipinrec raw event", "items": "unipinrec item", "examples": "unipinrec UnifiedExample"}
FILES = {"events": "events.schema.json", "items": "items.schema.json", "examples": "unified_example.schema.json"}


def _type(t: pa.DataType, nullable: bool, doc_prefix: str) -> dict:
    if pa.types.is_integer(t):
        bits = t.bit_width
        lo, hi = (0, 2**bits - 1) if pa.types.is_unsigned_integer(t) else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        out = {"type": "integer", "minimum": lo, "maximum": hi, "x-arrow-type": str(t)}
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        out = {"type": "string", "x-arrow-type": str(t)}
    elif pa.types.is_floating(t):
        out = {"type": "number", "x-arrow-type": str(t)}
    elif pa.types.is_boolean(t):
        out = {"type": "boolean", "x-arrow-type": str(t)}
    elif pa.types.is_list(t):
        out = {"type": "array", "items": _type(t.value_type, t.value_field.nullable, doc_prefix), "x-arrow-type": "list"}
    elif pa.types.is_struct(t):
        props = {}
        for f in t:
            props[f.name] = _type(f.type, f.nullable, f"{doc_prefix}.{f.name}")
        out = {"type": "object", "properties": props, "required": [f.name for f in t], "additionalProperties": False}
    else:  # not used by format.py today; fail loudly rather than export a wrong schema
        raise TypeError(f"no JSON Schema mapping for Arrow type {t}")
    if doc_prefix in FIELD_DOCS and not pa.types.is_list(t):
        out["description"] = FIELD_DOCS[doc_prefix]
    if nullable and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def json_schema(table: str) -> dict:
    schema = {"events": EVENTS_SCHEMA, "items": ITEMS_SCHEMA, "examples": UNIFIED_EXAMPLE_SCHEMA}[table]
    props = {}
    for f in schema:
        p = _type(f.type, f.nullable, f"{table}.{f.name}")
        if pa.types.is_list(f.type):
            p["description"] = FIELD_DOCS[f"{table}.{f.name}"]
        props[f.name] = p
    return {
        "$schema": DIALECT,
        "$id": f"https://github.com/unipinrec/unipinrec/data_contracts/{FILES[table]}",
        "title": TITLES[table],
        "description": f"One row of the '{table}' table (src/unipinrec/format.py), as JSON. Generated; do not edit.",
        "type": "object",
        "properties": props,
        "required": schema.names,
        # sources may add feature columns to items; the other tables are closed
        "additionalProperties": table == "items",
    }
