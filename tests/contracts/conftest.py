"""Small valid datasets built by hand with the format.py schemas, and a writer that can also
write broken tables (wrong types, nulls in non-null fields) for the corruption tests."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unipinrec import format as fmt
from unipinrec.actions import SYNTHETIC


def _loose(schema: pa.Schema) -> pa.Schema:
    """The schema with every top-level field nullable, so corrupted rows can still be written."""
    return pa.schema([f.with_nullable(True) for f in schema])


def _act(item, action, ts, surface=0):
    return {"item_id": item, "action": action, "ts": ts, "surface": surface}


def _imp(item, position, action=0):
    return {"item_id": item, "position": position, "action": action}


ITEMS = [{"item_id": 100 + i, "category": i % 3, "title": None if i == 4 else f"item {i}"} for i in range(10)]

# Two users; feed requests (impression rows share the request's ts) and organic actions
# (surface 1, no request). Sorted by (user_id, ts), as the RAW layout promises.
EVENTS = [
    # user 1, request 10 at ts 1000
    {"user_id": 1, "item_id": 100, "action": 0, "ts": 1000, "surface": 0, "request_id": 10, "position": 0},
    {"user_id": 1, "item_id": 101, "action": 1, "ts": 1000, "surface": 0, "request_id": 10, "position": 1},
    {"user_id": 1, "item_id": 102, "action": 0, "ts": 1000, "surface": 0, "request_id": 10, "position": 2},
    {"user_id": 1, "item_id": 103, "action": 2, "ts": 1500, "surface": 1, "request_id": None, "position": None},
    # user 1, request 11 at ts 2000
    {"user_id": 1, "item_id": 104, "action": 3, "ts": 2000, "surface": 0, "request_id": 11, "position": 0},
    {"user_id": 1, "item_id": 105, "action": 0, "ts": 2000, "surface": 0, "request_id": 11, "position": 1},
    # user 2, request 20 at ts 1200, request 21 at ts 3000
    {"user_id": 2, "item_id": 106, "action": 4, "ts": 1200, "surface": 0, "request_id": 20, "position": 0},
    {"user_id": 2, "item_id": 107, "action": 1, "ts": 1200, "surface": 0, "request_id": 20, "position": 1},
    {"user_id": 2, "item_id": 108, "action": 1, "ts": 2500, "surface": 1, "request_id": None, "position": None},
    {"user_id": 2, "item_id": 109, "action": 0, "ts": 3000, "surface": 0, "request_id": 21, "position": 0},
    {"user_id": 2, "item_id": 100, "action": 2, "ts": 3000, "surface": 0, "request_id": 21, "position": 1},
]

EXAMPLES = {
    "train": [
        {"user_id": 1, "request_ts": 1000, "history": [], "slate": [_imp(100, 0), _imp(101, 1, 1), _imp(102, 2)]},
        {"user_id": 2, "request_ts": 1200, "history": [], "slate": [_imp(106, 0, 4), _imp(107, 1, 1)]},
    ],
    "valid": [
        {"user_id": 1, "request_ts": 2000, "history": [_act(101, 1, 1000), _act(103, 2, 1500, 1)],
         "slate": [_imp(104, 0, 3), _imp(105, 1)]},
    ],
    "test": [
        {"user_id": 2, "request_ts": 3000, "history": [_act(106, 4, 1200), _act(107, 1, 1200), _act(108, 1, 2500, 1)],
         "slate": [_imp(109, 0), _imp(100, 1, 2)]},
    ],
}


def write_table(directory: Path, rows: list[dict] | pa.Table, schema: pa.Schema | None) -> Path:
    """One shard; `schema=None` lets pyarrow infer types (how the wrong-type corruptions are made)."""
    directory.mkdir(parents=True, exist_ok=True)
    table = rows if isinstance(rows, pa.Table) else (
        pa.Table.from_pylist(rows, schema=_loose(schema)) if schema is not None else pa.Table.from_pylist(rows))
    path = directory / "part-00000.parquet"
    pq.write_table(table, path)
    return path


def make_raw(root: Path, events=None, items=None, actions=SYNTHETIC.names, events_schema=fmt.EVENTS_SCHEMA,
             items_schema=fmt.ITEMS_SCHEMA) -> Path:
    write_table(root / "events", EVENTS if events is None else events, events_schema)
    write_table(root / "items", ITEMS if items is None else items, items_schema)
    (root / "meta.json").write_text(json.dumps({"source": "synthetic", "actions": list(actions), "has_impressions": True}))
    return root


def make_ex(root: Path, splits=None, items=None, max_history=50, schema=fmt.UNIFIED_EXAMPLE_SCHEMA) -> Path:
    splits = EXAMPLES if splits is None else splits
    for split, rows in splits.items():
        write_table(root / split, rows, schema)
    write_table(root / "items", ITEMS if items is None else items, fmt.ITEMS_SCHEMA)
    (root / "meta.json").write_text(json.dumps({"source": "synthetic", "actions": list(SYNTHETIC.names),
                                                "max_history": max_history, "has_impressions": True}))
    return root


@pytest.fixture
def good_events():
    return copy.deepcopy(EVENTS)


@pytest.fixture
def good_items():
    return copy.deepcopy(ITEMS)


@pytest.fixture
def good_examples():
    return copy.deepcopy(EXAMPLES)


@pytest.fixture
def raw(tmp_path):
    """raw(events=..., items=...) -> a RAW folder (good data where not given)."""
    count = iter(range(1000))
    return lambda **kw: make_raw(tmp_path / f"raw{next(count)}", **kw)


@pytest.fixture
def ex(tmp_path):
    """ex(splits=..., items=..., max_history=...) -> an EX folder (good data where not given)."""
    count = iter(range(1000))
    return lambda **kw: make_ex(tmp_path / f"ex{next(count)}", **kw)
