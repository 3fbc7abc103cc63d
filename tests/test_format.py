"""The one input format: schemas, conform errors naming the field, sharded Parquet round trip."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unipinrec import format as fmt


def _examples(n: int) -> pa.Table:
    rows = []
    for i in range(n):
        history = [{"item_id": 10 * i + k, "action": k % 4 + 1, "ts": 1000 + k, "surface": k % 2} for k in range(i % 4)]
        slate = [{"item_id": 7 + k, "position": k, "action": 0 if k else 1} for k in range(i % 3)]
        rows.append({"user_id": i, "request_ts": 2000 + i, "history": history, "slate": slate})
    return pa.Table.from_pylist(rows, schema=fmt.UNIFIED_EXAMPLE_SCHEMA)


def test_examples_round_trip_through_several_shards(tmp_path):
    table = _examples(25)
    n = fmt.write_sharded(tmp_path / "ex", [table.slice(0, 10), table.slice(10)], fmt.UNIFIED_EXAMPLE_SCHEMA,
                          rows_per_shard=7)
    assert n == 25
    paths = fmt.shard_paths(tmp_path / "ex")
    assert [p.name for p in paths] == [f"part-{i:05d}.parquet" for i in range(4)]  # 7+7+7+4
    assert [pq.ParquetFile(p).metadata.num_rows for p in paths] == [7, 7, 7, 4]
    back = fmt.read_sharded(tmp_path / "ex")
    assert back.schema.equals(fmt.UNIFIED_EXAMPLE_SCHEMA)
    assert back.to_pylist() == table.to_pylist()
    assert fmt.count_rows(tmp_path / "ex") == 25
    streamed = pa.Table.from_batches(list(fmt.iter_batches(tmp_path / "ex", batch_size=3)))
    assert streamed.to_pylist() == table.to_pylist()


def test_events_round_trip_keeps_nulls(tmp_path):
    events = pa.table({
        "user_id": [1, 1], "item_id": [5, 6], "action": [0, 1], "ts": [10, 11], "surface": [0, 1],
        "request_id": [3, None], "position": [0, None],
    })
    events = fmt.conform(events, fmt.EVENTS_SCHEMA, name="events")
    fmt.write_sharded(tmp_path / "ev", events, fmt.EVENTS_SCHEMA)
    back = fmt.read_sharded(tmp_path / "ev")
    assert back.schema.equals(fmt.EVENTS_SCHEMA)
    assert back.column("request_id").to_pylist() == [3, None]
    assert back.column("position").type == pa.int16()


def test_rewrite_replaces_old_shards_and_empty_dataset_is_readable(tmp_path):
    fmt.write_sharded(tmp_path / "ex", _examples(20), fmt.UNIFIED_EXAMPLE_SCHEMA, rows_per_shard=5)
    fmt.write_sharded(tmp_path / "ex", _examples(3), fmt.UNIFIED_EXAMPLE_SCHEMA, rows_per_shard=5)
    assert fmt.count_rows(tmp_path / "ex") == 3
    fmt.write_sharded(tmp_path / "empty", [], fmt.UNIFIED_EXAMPLE_SCHEMA)
    empty = fmt.read_sharded(tmp_path / "empty")
    assert empty.num_rows == 0 and empty.schema.equals(fmt.UNIFIED_EXAMPLE_SCHEMA)


def test_conform_casts_by_name_and_keeps_extra_columns():
    t = pa.table({"title": ["a", None], "extra": [1.5, 2.5], "category": [1, 2], "item_id": [3, 4]})
    out = fmt.conform(t, fmt.ITEMS_SCHEMA, name="items")
    assert out.column_names == ["item_id", "category", "title", "extra"]
    assert out.schema.field("category").type == pa.int32()


@pytest.mark.parametrize(
    "table, field",
    [
        (pa.table({"item_id": [1], "title": ["x"]}), "category"),  # missing
        (pa.table({"item_id": [1, None], "category": [1, 2], "title": ["x", "y"]}), "item_id"),  # null key
        (pa.table({"item_id": ["one"], "category": [1], "title": ["x"]}), "item_id"),  # wrong type
        (pa.table({"item_id": [1], "category": ["drama"], "title": ["x"]}), "category"),
    ],
)
def test_conform_errors_name_the_field(table, field):
    with pytest.raises(fmt.FormatError, match=f"items: .*'{field}'"):
        fmt.conform(table, fmt.ITEMS_SCHEMA, name="items")


def test_conform_rejects_examples_with_a_bad_nested_field():
    bad = pa.table({"user_id": [1], "request_ts": [5], "history": [[{"item_id": "x", "action": 1, "ts": 1, "surface": 0}]],
                    "slate": [[]]})
    with pytest.raises(fmt.FormatError, match="'history'"):
        fmt.conform(bad, fmt.UNIFIED_EXAMPLE_SCHEMA, name="examples")


def test_meta_round_trip_and_missing_meta_names_the_file(tmp_path):
    fmt.write_meta(tmp_path / "d", {"source": "synthetic", "splits": {"train": 3}})
    assert fmt.read_meta(tmp_path / "d") == {"source": "synthetic", "splits": {"train": 3}}
    with pytest.raises(FileNotFoundError, match="meta.json"):
        fmt.read_meta(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="part-"):
        fmt.shard_paths(tmp_path / "d")
