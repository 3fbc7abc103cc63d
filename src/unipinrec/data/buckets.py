"""A parallel example build: the parts of user-hash buckets assembled into one EX folder.

`build_examples(RAW, PART_k, bucket=k, buckets=N)` (one pod per k, `dsl.ParallelFor` in the
pipeline) writes the examples of the users in bucket k (sequence_table.user_bucket); the
rules are per user, so the parts hold exactly the one-process build's records, split by user.
`merge_buckets([PART_0, ..., PART_N-1], EX)` writes what the one-process build writes:

- layout "examples": each split's rows in the one-process order (users ascending, each user's
  rows as the builder wrote them), by a streaming merge on user_id: every part is sorted by
  user, so memory is one batch per part, not the split;
- layout "sequences": the parts' bucket=k folders side by side (that layout is bucketed already).

The meta is the one-process meta with the counts summed, plus `parallel_build` (the bucket
count); a part's own `bucket` key is dropped.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from .. import format as fmt
from .examples import _copy_shards

# keys every part must agree on (they describe the whole build, not the bucket)
_SAME = ("source", "actions", "max_history", "slate_size", "has_impressions", "history_impressions", "layout",
         "buckets", "raw", "num_events", "num_items", "seed", "rule", "history_source")
_SUMMED = ("num_examples", "num_users", "sequence_rows")


def _part_metas(parts: Sequence[Path]) -> list[tuple[Path, dict]]:
    """(part, meta) sorted by bucket; raises ValueError unless the parts are buckets 0..N-1 of one build."""
    if not parts:
        raise ValueError("parts: no bucket folders to merge")
    metas = [(p, fmt.read_meta(p)) for p in parts]
    for p, m in metas:
        if "bucket" not in m:
            raise ValueError(f"{p}: meta.json has no 'bucket': not a part of a parallel build (build_examples bucket=)")
    for key in _SAME:
        values = {repr(m.get(key)) for _, m in metas}
        if len(values) > 1:
            raise ValueError(f"parts disagree on '{key}' ({', '.join(sorted(values))}): they are not one build")
    n = int(metas[0][1]["buckets"])
    found = sorted(int(m["bucket"]) for _, m in metas)
    if found != list(range(n)):
        missing = sorted(set(range(n)) - set(found))
        twice = sorted({b for b in found if found.count(b) > 1})
        raise ValueError(f"parts must be buckets 0..{n - 1} once each; missing {missing}, more than once {twice}")
    return sorted(metas, key=lambda pm: int(pm[1]["bucket"]))


def _merged_meta(metas: list[dict]) -> dict:
    meta = {k: v for k, v in metas[0].items() if k != "bucket"}
    if meta["layout"] != "sequences":
        meta.pop("buckets")  # a key of the sequence layout; the per-example layout has none
    meta["splits"] = {s: sum(m["splits"][s] for m in metas) for s in fmt.SPLITS}
    for key in _SUMMED:
        if key in meta:
            meta[key] = sum(m[key] for m in metas)
    meta["chunks"] = {"count": sum(m["chunks"]["count"] for m in metas),
                      "max_events": max(m["chunks"]["max_events"] for m in metas),
                      "chunk_events": meta["chunks"]["chunk_events"]}
    if "feast" in meta:  # per split: examples, histories that differ from the builder's rule
        meta["feast"] = {s: {k: sum(m["feast"][s][k] for m in metas) for k in v} for s, v in meta["feast"].items()}
    meta["parallel_build"] = {"buckets": len(metas)}
    return meta


def _merge_by_user(streams: list[Iterator[pa.RecordBatch]]) -> Iterator[pa.Table]:
    """Tables in user order from streams that are each sorted by user_id, with disjoint users."""
    bufs: list[pa.Table | None] = [None] * len(streams)
    reading = set(range(len(streams)))

    def read(i: int) -> None:  # append stream i's next non-empty batch, or mark it done
        for batch in streams[i]:
            if batch.num_rows:
                t = pa.Table.from_batches([batch])
                bufs[i] = t if bufs[i] is None else pa.concat_tables([bufs[i], t])
                return
        reading.discard(i)

    def last_user(i: int) -> int:
        return bufs[i].column("user_id")[-1].as_py()

    for i in range(len(streams)):
        read(i)
    while True:
        # a user below the smallest last user of the streams still reading is complete in all
        cutoff = min(last_user(i) for i in reading) if reading else None
        pieces = []
        for i, b in enumerate(bufs):
            if b is not None:
                cut = b.num_rows if cutoff is None else int(np.searchsorted(b.column("user_id").to_numpy(), cutoff))
                pieces.append(b.slice(0, cut))
                bufs[i] = b.slice(cut)
        table = pa.concat_tables(pieces) if pieces else None
        if table is not None and table.num_rows:
            yield table.take(np.argsort(table.column("user_id").to_numpy(), kind="stable"))
        if cutoff is None:
            return
        for i in [i for i in reading if last_user(i) == cutoff]:
            read(i)


def merge_buckets(parts: Sequence[str | Path], out_dir: str | Path, *, batch_size: int = 65_536,
                  rows_per_shard: int = 250_000) -> dict:
    """Assemble the bucket folders of a parallel build into `out_dir`; returns its meta.

    Raises ValueError (and writes nothing) unless the parts are buckets 0..N-1 of one build.
    """
    parts = [Path(p) for p in parts]
    out = Path(out_dir)
    metas = _part_metas(parts)
    meta = _merged_meta([m for _, m in metas])
    for sub in (*fmt.SPLITS, "sequences", "requests"):
        shutil.rmtree(out / sub, ignore_errors=True)
    if meta["layout"] == "sequences":
        for part, m in metas:
            k = f"bucket={m['bucket']}"
            for sub in ("sequences", *(f"requests/{s}" for s in fmt.SPLITS)):
                shutil.copytree(part / sub / k, out / sub / k)
    else:
        for split in fmt.SPLITS:
            streams = [fmt.iter_batches(p / split, batch_size=batch_size) for p, _ in metas]
            fmt.write_sharded(out / split, _merge_by_user(streams), fmt.UNIFIED_EXAMPLE_SCHEMA, rows_per_shard)
    first = metas[0][0]
    for extra in ("items", "oracle"):
        if (first / extra).exists():
            _copy_shards(first / extra, out / extra)
    fmt.write_meta(out, meta)
    return meta
