"""The sequence layout: each user's actions stored once, request rows that reference them.

`examples build --layout sequences` writes, instead of one UnifiedExample per row (which copies
up to L actions of history into every example of a user):

    EX/sequences/bucket=K/part-*.parquet        SEQUENCE_SCHEMA: the history material of the
                                                users of bucket K (the actions a history may
                                                hold under the builder's rule), one row per
                                                action, grouped by user, chronological
    EX/requests/{train,valid,test}/bucket=K/part-*.parquet
                                                REQUEST_SCHEMA: user_id, request_ts, slate, and
                                                history_end = how many of the user's sequence
                                                rows come before the request

User u is in bucket user_bucket(u, N) (a multiplicative hash, so consecutive ids spread). The
reader (`iter_examples`) loads one bucket's sequences at a time and cuts each request's
history window, sequence[max(0, history_end - L):history_end], while streaming the request rows:
it yields RecordBatches in format.UNIFIED_EXAMPLE_SCHEMA, the same records the per-example
layout holds (in bucket order rather than user order). history_end is computed by the builder's
own rule (examples.py: strictly before request_ts with impressions; the window start for
MovieLens-style sequences), so the two layouts cannot drift apart.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import format as fmt
from .examples import _HISTORY_TYPE, _Chunk, _ChunkPlan, _history_values, _offsets, _ranges, _slates

SEQUENCE_SCHEMA = pa.schema([pa.field("user_id", pa.int64(), nullable=False),
                             *[pa.field(f.name, f.type, nullable=False) for f in fmt.ACTION_TYPE]])
REQUEST_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("request_ts", pa.int64(), nullable=False),
    pa.field("history_end", pa.int32(), nullable=False),  # the user's sequence rows before the request
    fmt.UNIFIED_EXAMPLE_SCHEMA.field("slate"),
])
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def user_bucket(user_ids: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of each user id: Fibonacci hashing, high bits, modulo the bucket count."""
    h = (np.asarray(user_ids).astype(np.uint64) * _GOLDEN) >> np.uint64(32)
    return (h % np.uint64(buckets)).astype(np.int64)


def _bucket_dir(root: Path, k: int) -> Path:
    return root / f"bucket={k}"


class SequenceWriter:
    """Writes the sequence layout from the builder's chunk plans (examples.build_examples)."""

    def __init__(self, out: Path, buckets: int, rows_per_shard: int, only: int | None = None):
        """only: write bucket `only` alone (a parallel build's part; the chunks hold its users only)."""
        for split in fmt.SPLITS:  # a folder rebuilt in this layout drops the other one
            shutil.rmtree(out / split, ignore_errors=True)
        for sub in ("sequences", "requests"):
            shutil.rmtree(out / sub, ignore_errors=True)
        self.buckets = buckets
        owned = range(buckets) if only is None else [only]
        self.sequences = {k: fmt.ShardedWriter(_bucket_dir(out / "sequences", k), SEQUENCE_SCHEMA, rows_per_shard)
                          for k in owned}
        self.requests = {s: {k: fmt.ShardedWriter(_bucket_dir(out / "requests" / s, k), REQUEST_SCHEMA,
                                                  rows_per_shard) for k in owned} for s in fmt.SPLITS}
        self.sequence_rows = 0

    def write(self, c: _Chunk, plan: _ChunkPlan) -> None:
        seq = plan.seq
        table = pa.Table.from_arrays([pa.array(c.user[seq], pa.int64()), *_history_values(c, seq).flatten()],
                                     schema=SEQUENCE_SCHEMA)
        self._scatter(table, user_bucket(c.user[seq], self.buckets), self.sequences)
        self.sequence_rows += len(seq)
        for split, p in plan.splits.items():
            table = pa.Table.from_arrays(
                [pa.array(c.user[p.rows], pa.int64()), pa.array(c.ts[p.rows], pa.int64()),
                 pa.array(p.h_end - p.seq_start, pa.int32()), _slates(c, p)], schema=REQUEST_SCHEMA)
            self._scatter(table, user_bucket(c.user[p.rows], self.buckets), self.requests[split])

    def _scatter(self, table: pa.Table, bucket: np.ndarray, writers: dict[int, fmt.ShardedWriter]) -> None:
        order = np.argsort(bucket, kind="stable")  # keeps user order, and event order inside a user
        bounds = np.searchsorted(bucket[order], np.arange(self.buckets + 1))
        for k in np.flatnonzero(np.diff(bounds)):
            writers[k].write(table.take(order[bounds[k]:bounds[k + 1]]))

    def close(self) -> dict:
        for w in [*self.sequences.values(), *(w for ws in self.requests.values() for w in ws.values())]:
            w.close()
        return {"buckets": self.buckets, "sequence_rows": self.sequence_rows}


# ---------------------------------------------------------------------------------------------
# Reading: UnifiedExamples cut while streaming

def _sequences(ex: Path, k: int) -> dict[str, np.ndarray]:
    t = fmt.read_sharded(_bucket_dir(ex / "sequences", k))
    return {name: t.column(name).to_numpy() for name in SEQUENCE_SCHEMA.names}


def _cut(seq: dict[str, np.ndarray], requests: pa.RecordBatch, L: int) -> pa.RecordBatch:
    """UnifiedExamples of request rows: history = the last L sequence rows before history_end."""
    user = requests.column("user_id").to_numpy()
    start = np.searchsorted(seq["user_id"], user, side="left")
    end = start + requests.column("history_end").to_numpy().astype(np.int64)
    begin = np.maximum(start, end - L)
    rows = _ranges(begin, end - begin)
    values = pa.StructArray.from_arrays([pa.array(seq[f.name][rows], f.type) for f in fmt.ACTION_TYPE],
                                        fields=list(_HISTORY_TYPE.value_type))
    history = pa.ListArray.from_arrays(_offsets(end - begin), values, type=_HISTORY_TYPE)
    return pa.RecordBatch.from_arrays([requests.column("user_id"), requests.column("request_ts"), history,
                                       requests.column("slate")], schema=fmt.UNIFIED_EXAMPLE_SCHEMA)


def iter_examples(ex_dir: str | Path, split: str, *, max_history: int | None = None, batch_size: int = 8192,
                  buckets: Iterable[int] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream the UnifiedExamples of `split` from a sequence-layout EX folder, bucket by bucket.

    max_history: L of the cut (default, and at most, the L the folder was built with);
    buckets: the buckets to read (a DDP rank or loader worker reads a disjoint part; default all,
    or the one bucket of a parallel build's part).
    Memory: one bucket's sequences plus one batch.
    """
    ex = Path(ex_dir)
    meta = fmt.read_meta(ex)
    if meta.get("layout") != "sequences":
        raise fmt.FormatError(f"{ex}: layout is {meta.get('layout', 'examples')!r}, not 'sequences'")
    if split not in fmt.SPLITS:
        raise ValueError(f"split must be one of {', '.join(fmt.SPLITS)}, got '{split}'")
    L = int(meta["max_history"]) if max_history is None else max_history
    if not 0 < L <= int(meta["max_history"]):
        raise ValueError(f"max_history must be in 1..{meta['max_history']} (the L of {ex}), got {L}")
    n = int(meta["buckets"])
    if buckets is None:  # a part of a parallel build holds its own bucket only
        buckets = [int(meta["bucket"])] if "bucket" in meta else range(n)
    for k in buckets:
        if not 0 <= k < n:
            raise ValueError(f"bucket {k} is not in 0..{n - 1}")
        seq = None
        for batch in fmt.iter_batches(_bucket_dir(ex / "requests" / split, k), batch_size=batch_size):
            seq = _sequences(ex, k) if seq is None else seq
            yield _cut(seq, batch, L)


def iter_split(ex_dir: str | Path, split: str, *, columns: list[str] | None = None,
               batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
    """UnifiedExample batches of a split in either layout (per-example or sequences)."""
    ex = Path(ex_dir)
    if (ex / "meta.json").exists() and fmt.read_meta(ex).get("layout") == "sequences":
        for batch in iter_examples(ex, split, batch_size=batch_size):
            yield batch.select(columns) if columns else batch
    else:
        yield from fmt.iter_batches(ex / split, columns=columns, batch_size=batch_size)


class SequenceExamples:
    """The sequence layout as a training stream's source (`unipinrec.stream.ExampleSource`): one
    part per (split, bucket); reading a part joins its request rows with the bucket's sequences
    and cuts each history window (strictly before request_ts, the last L) on the fly."""

    def __init__(self, ex_dir: str | Path, splits: Sequence[str], *, max_history: int | None = None,
                 batch_rows: int = 1024):
        self.ex, self.max_history, self.batch_rows = Path(ex_dir), max_history, batch_rows
        n = int(fmt.read_meta(self.ex)["buckets"])
        self._parts = [(split, k, _rows(_bucket_dir(self.ex / "requests" / split, k)))
                       for split in splits for k in range(n)]

    def part_rows(self) -> list[int]:
        return [rows for _, _, rows in self._parts]

    def read(self, part: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        split, k, _ = self._parts[part]
        for batch in iter_examples(self.ex, split, max_history=self.max_history, batch_size=self.batch_rows,
                                   buckets=[k]):
            yield batch.select(columns) if columns else batch


def _rows(directory: Path) -> int:
    """Rows of a bucket's request files, from their Parquet metadata (0 when the bucket is empty)."""
    if not directory.exists():
        return 0
    return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(directory.glob("part-*.parquet")))
