"""The in-memory online store: latest history per user from an examples folder, appends, and
the archive's store spec (what `package --store-examples` packs)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from unipinrec.format import UNIFIED_EXAMPLE_SCHEMA, write_sharded
from unipinrec.serving.handler_support import make_store
from unipinrec.serving.store import History, InMemoryStore, OnlineStore


def act(item, action, ts):
    return {"item_id": item, "action": action, "ts": ts, "surface": 0}


@pytest.fixture
def examples(tmp_path):
    rows = [
        {"user_id": 1, "request_ts": 100, "history": [act(1001, 1, 10)], "slate": []},
        {"user_id": 1, "request_ts": 200, "history": [act(1001, 1, 10), act(1002, 2, 150)], "slate": []},
        {"user_id": 2, "request_ts": 50, "history": [], "slate": []},
    ]
    write_sharded(tmp_path / "ex" / "test", pa.Table.from_pylist(rows, schema=UNIFIED_EXAMPLE_SCHEMA),
                  UNIFIED_EXAMPLE_SCHEMA)
    return tmp_path / "ex"


def test_store_keeps_each_users_latest_history(examples):
    store = InMemoryStore.from_examples(examples)
    assert isinstance(store, OnlineStore)
    h1, h2, h3 = store.get_histories([1, 2, 3])
    assert h1.items.tolist() == [1001, 1002] and h1.ts.tolist() == [10, 150]
    assert len(h2) == 0 and h3 is None


def test_append_and_cap(examples):
    store = InMemoryStore(max_actions=2)
    store.put(5, History.from_actions([act(1, 1, 1), act(2, 1, 2)]))
    store.append(5, History.from_actions([act(3, 2, 3)]))
    assert store.get_histories([5])[0].items.tolist() == [2, 3]


def test_archive_store_specs(examples, tmp_path):
    store = make_store({"kind": "examples", "path": "ex", "split": "test"}, tmp_path)
    assert store.get_histories([1])[0].items.tolist() == [1001, 1002]
    assert make_store(None, tmp_path) is None
    made = make_store({"factory": "unipinrec.serving.store:InMemoryStore", "kwargs": {"max_actions": 3}}, tmp_path)
    assert isinstance(made, InMemoryStore) and made.max_actions == 3
    with pytest.raises(ValueError, match="store"):
        make_store({"kind": "redis"}, tmp_path)


def test_history_arrays_must_line_up():
    with pytest.raises(ValueError):
        History(items=np.arange(3), actions=np.arange(2), ts=np.arange(3))
