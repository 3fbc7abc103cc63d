"""The one input format (docs/data.md, "Unified examples") as pyarrow schemas, and sharded Parquet I/O.

Everything in the project speaks these tables:

- raw ``events``: one row per user action; impression rows also carry ``request_id`` and
  ``position`` (organic actions have them null).
- raw ``items``: one row per item with its features.
- ``UnifiedExample``: one row per (user, feed request): the history before ``request_ts`` and
  the slate shown at ``request_ts``.

Only pyarrow is imported here so that the model, the serving engine and the data contracts
can all share it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

# ---------------------------------------------------------------------------------------------
# Schemas

ACTION_TYPE = pa.struct(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("action", pa.int8(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("surface", pa.int8(), nullable=False),
    ]
)

IMPRESSION_TYPE = pa.struct(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),
        pa.field("action", pa.int8(), nullable=False),  # 0 = shown, not engaged
    ]
)

UNIFIED_EXAMPLE_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("request_ts", pa.int64(), nullable=False),
        # chronological, strictly before request_ts, the last L kept
        pa.field("history", pa.list_(pa.field("element", ACTION_TYPE, nullable=False)), nullable=False),
        # what the feed showed at request_ts; may be empty
        pa.field("slate", pa.list_(pa.field("element", IMPRESSION_TYPE, nullable=False)), nullable=False),
    ]
)

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("action", pa.int8(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("surface", pa.int8(), nullable=False),
        pa.field("request_id", pa.int64(), nullable=True),  # null for organic (non-feed) actions
        pa.field("position", pa.int16(), nullable=True),  # slate position of an impression row
    ]
)

# Items carry an id, a category (topic / first genre) and an optional title; sources may add
# more feature columns after these.
ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("category", pa.int32(), nullable=False),
        pa.field("title", pa.string(), nullable=True),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "events": EVENTS_SCHEMA,
    "items": ITEMS_SCHEMA,
    "examples": UNIFIED_EXAMPLE_SCHEMA,
}

IMPRESSION_ACTION = 0  # action id of "shown, not engaged" in every vocabulary that has impressions
SPLITS = ("train", "valid", "test")


class FormatError(ValueError):
    """A table does not match the unified format; the message names the field."""


def conform(table: pa.Table, schema: pa.Schema, *, name: str = "table") -> pa.Table:
    """Cast ``table`` to ``schema`` (columns by name, extra columns kept at the end).

    Raises FormatError naming the first missing or uncastable field.
    """
    columns, fields = [], []
    for field in schema:
        if field.name not in table.column_names:
            raise FormatError(f"{name}: missing field '{field.name}' ({field.type})")
        col = table.column(field.name)
        if not field.nullable and col.null_count:
            raise FormatError(f"{name}: field '{field.name}' has {col.null_count} null values")
        try:
            col = col.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise FormatError(f"{name}: field '{field.name}' cannot be read as {field.type}: {e}") from e
        columns.append(col)
        fields.append(field)
    for extra in table.column_names:
        if extra not in schema.names:
            columns.append(table.column(extra))
            fields.append(table.schema.field(extra))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


# ---------------------------------------------------------------------------------------------
# Sharded Parquet

class ShardedWriter:
    """Writes record batches to ``DIR/part-00000.parquet``, ``part-00001``, ... of at most
    ``rows_per_shard`` rows each, so that writers stream and readers can parallelise."""

    def __init__(self, directory: str | Path, schema: pa.Schema, rows_per_shard: int = 1_000_000):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for old in self.directory.glob("part-*.parquet"):
            old.unlink()  # a rewrite replaces the dataset, never mixes with an old one
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        self.num_shards = 0
        self.num_rows = 0

    def _open(self) -> None:
        path = self.directory / f"part-{self.num_shards:05d}.parquet"
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.num_shards += 1
        self._rows_in_shard = 0

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
        table = table.cast(self.schema) if table.schema != self.schema else table
        offset = 0
        while offset < table.num_rows:
            if self._writer is None or self._rows_in_shard >= self.rows_per_shard:
                self.close_shard()
                self._open()
            n = min(self.rows_per_shard - self._rows_in_shard, table.num_rows - offset)
            self._writer.write_table(table.slice(offset, n))
            self._rows_in_shard += n
            self.num_rows += n
            offset += n

    def close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        if self._writer is None and self.num_shards == 0:
            self._open()  # an empty dataset is still a readable dataset
        self.close_shard()

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_sharded(
    directory: str | Path, tables: pa.Table | Iterable[pa.Table | pa.RecordBatch], schema: pa.Schema,
    rows_per_shard: int = 1_000_000,
) -> int:
    """Write one table or a stream of tables; returns the number of rows written."""
    if isinstance(tables, pa.Table):
        tables = [tables]
    with ShardedWriter(directory, schema, rows_per_shard) as w:
        for t in tables:
            w.write(t)
    return w.num_rows


def shard_paths(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if directory.is_file():
        return [directory]
    paths = sorted(directory.glob("part-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no part-*.parquet shards in {directory}")
    return paths


def iter_batches(
    directory: str | Path, columns: list[str] | None = None, batch_size: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """Stream record batches from every shard in order, without loading the dataset."""
    for path in shard_paths(directory):
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)


def read_sharded(directory: str | Path, columns: list[str] | None = None) -> pa.Table:
    tables = [pq.read_table(p, columns=columns) for p in shard_paths(directory)]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def count_rows(directory: str | Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in shard_paths(directory))


# ---------------------------------------------------------------------------------------------
# Dataset metadata (meta.json beside the tables)

def write_meta(directory: str | Path, meta: dict) -> None:
    path = Path(directory) / "meta.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {directory} a unipinrec dataset folder?")
    return json.loads(path.read_text())
