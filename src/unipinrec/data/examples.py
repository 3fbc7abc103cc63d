"""Unified example builder: RAW events -> EX/{train,valid,test} UnifiedExamples (docs/data.md).

Streams the events in chunks of whole users (events are sorted by user_id, ts), so memory is
bounded by the chunk, not the dataset.

With impressions (synthetic): each feed request is one example. history = the user's
non-impression actions (any surface) strictly before request_ts, the last L kept (with
`history_impressions`, earlier impressions too: shown-not-engaged items are the user's skips,
the negatives MAM then trains on inside the history); slate = the
request's impressions (position < slate_size) with their action. Per user, the last request is
`test`, the one before `valid`, earlier ones `train`.

Without impressions (MovieLens), per user sequence s (chronological, n actions):
  test:  history s[:n-1] (last L), slate [s[n-1]]
  valid: history s[:n-2] (last L), slate [s[n-2]]
  train: uses only s[:m], m = n-2; examples at t = max(1, m-S), then t - L, t - 2L, ... (t >= 1),
         history s[max(0, t-L):t], slate s[t:min(t+S, m)] (action = rating, position = index)
request_ts is the time of the first slate action.

The rules are computed once per chunk as a plan (row indices: which rows are history material,
where each example's history ends, which rows are its slate); a writer renders the plan as one
UnifiedExample per row (layout "examples") or as sequences stored once plus request rows
(layout "sequences", sequence_table.py).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import format as fmt

LAYOUTS = ("examples", "sequences")
_COLUMNS = ["user_id", "item_id", "action", "ts", "surface", "request_id", "position"]
_HISTORY_TYPE = fmt.UNIFIED_EXAMPLE_SCHEMA.field("history").type
_SLATE_TYPE = fmt.UNIFIED_EXAMPLE_SCHEMA.field("slate").type


@dataclass
class _Chunk:
    """Events of whole users, sorted by (user, ts, request_id, position), as numpy columns."""

    user: np.ndarray
    item: np.ndarray
    action: np.ndarray
    ts: np.ndarray
    surface: np.ndarray
    request: np.ndarray  # -1 where null (organic action)
    position: np.ndarray  # -1 where null

    def __len__(self) -> int:
        return len(self.user)


def _to_chunk(table: pa.Table) -> _Chunk:
    def col(name: str, fill: int | None = None) -> np.ndarray:
        c = table.column(name)
        if fill is not None:
            c = pc.fill_null(c, fill)
        return c.to_numpy()

    req, pos = col("request_id", -1), col("position", -1)
    user, ts = col("user_id"), col("ts")
    order = np.lexsort((pos, req, ts, user))
    if not np.array_equal(order, np.arange(len(order))):
        cols = (user, col("item_id"), col("action"), ts, col("surface"), req, pos)
        return _Chunk(*(c[order] for c in cols))
    return _Chunk(user, col("item_id"), col("action"), ts, col("surface"), req, pos)


def iter_user_chunks(events_dir: str | Path, chunk_events: int = 500_000) -> Iterator[_Chunk]:
    """Yield chunks of complete users of about `chunk_events` rows (more if one user is larger).

    Raises FormatError when user_id goes down across the stream (events must be sorted by user).
    """
    pending: list[pa.Table] = []
    rows = 0
    last_user = None
    batch_size = max(1, min(65_536, chunk_events))
    for batch in fmt.iter_batches(events_dir, columns=_COLUMNS, batch_size=batch_size):
        if batch.num_rows == 0:
            continue
        users = batch.column("user_id").to_numpy()
        if (last_user is not None and users[0] < last_user) or np.any(np.diff(users) < 0):
            raise fmt.FormatError(f"{events_dir}: field 'user_id' is not sorted; events must be sorted by user_id, ts")
        last_user = users[-1]
        pending.append(pa.Table.from_batches([batch]))
        rows += batch.num_rows
        if rows < chunk_events:
            continue
        table = pa.concat_tables(pending)
        users = table.column("user_id").to_numpy()
        cut = int(np.searchsorted(users, users[-1], side="left"))  # first row of the last user
        if cut == 0:
            continue  # one user larger than a chunk: keep reading
        yield _to_chunk(table.slice(0, cut))
        rest = table.slice(cut)
        pending, rows = [rest], rest.num_rows
    if rows:
        yield _to_chunk(pa.concat_tables(pending))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), vectorised."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts.astype(np.int64) - offsets, lengths) + np.arange(total)


def _offsets(lengths: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


@dataclass
class _Plan:
    """The examples of one split of a chunk, as row indices; `seq` (of the _ChunkPlan) holds the
    chunk rows that histories are cut from, grouped by user in chronological order.

    Example i: user and request_ts of chunk row rows[i]; history = seq[h_begin[i]:h_end[i]], where
    seq_start[i] is the first entry of its user in seq and h_begin = max(seq_start, h_end - L);
    slate = chunk rows slate_rows (s_len[i] each, in order) at positions s_pos.
    """

    rows: np.ndarray
    seq_start: np.ndarray
    h_begin: np.ndarray
    h_end: np.ndarray
    slate_rows: np.ndarray
    s_len: np.ndarray
    s_pos: np.ndarray


@dataclass
class _ChunkPlan:
    seq: np.ndarray  # chunk rows that are history material, grouped by user, chronological
    splits: dict[str, _Plan]


def _history_values(c: _Chunk, rows: np.ndarray) -> pa.StructArray:
    return pa.StructArray.from_arrays(
        [pa.array(c.item[rows], pa.int64()), pa.array(c.action[rows], pa.int8()),
         pa.array(c.ts[rows], pa.int64()), pa.array(c.surface[rows], pa.int8())],
        fields=list(_HISTORY_TYPE.value_type),
    )


def _slates(c: _Chunk, p: _Plan) -> pa.ListArray:
    values = pa.StructArray.from_arrays(
        [pa.array(c.item[p.slate_rows], pa.int64()), pa.array(p.s_pos, pa.int16()),
         pa.array(c.action[p.slate_rows], pa.int8())],
        fields=list(_SLATE_TYPE.value_type),
    )
    return pa.ListArray.from_arrays(_offsets(p.s_len), values, type=_SLATE_TYPE)


def _examples(c: _Chunk, seq: np.ndarray, p: _Plan) -> pa.Table:
    """The UnifiedExamples of a plan (histories copied out of seq)."""
    h_len = p.h_end - p.h_begin
    history = pa.ListArray.from_arrays(_offsets(h_len), _history_values(c, seq[_ranges(p.h_begin, h_len)]),
                                       type=_HISTORY_TYPE)
    return pa.Table.from_arrays(
        [pa.array(c.user[p.rows], pa.int64()), pa.array(c.ts[p.rows], pa.int64()), history, _slates(c, p)],
        schema=fmt.UNIFIED_EXAMPLE_SCHEMA,
    )


def restrict_to_bucket(c: _Chunk, bucket: int, buckets: int) -> _Chunk:
    """The events of the chunk's users in user-hash bucket `bucket` of `buckets` (order kept).
    The rules are per user, so a bucket's examples are exactly its users' part of the full build."""
    from .sequence_table import user_bucket

    keep = user_bucket(c.user, buckets) == bucket
    return _Chunk(**{f.name: getattr(c, f.name)[keep] for f in fields(_Chunk)})


def _user_starts(user: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rank of each row's user within the chunk, first row of each user, rows per user)."""
    new = np.ones(len(user), dtype=bool)
    new[1:] = user[1:] != user[:-1]
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, len(user)))
    return np.cumsum(new) - 1, starts, counts


def _split_of_last(group_rank: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """For items grouped by user (group_rank sorted): 2 = last of its user, 1 = before, 0 = earlier."""
    first = np.cumsum(counts) - counts
    idx_in_group = np.arange(len(group_rank)) - first[group_rank]
    from_end = counts[group_rank] - 1 - idx_in_group
    return np.where(from_end == 0, 2, np.where(from_end == 1, 1, 0))


def _plan_impressions(c: _Chunk, L: int, S: int, history_impressions: bool = False) -> _ChunkPlan:
    user_rank, _, _ = _user_starts(c.user)
    shown = np.flatnonzero((c.request >= 0) & (c.position < S))
    hist = np.arange(len(c)) if history_impressions else np.flatnonzero(c.action != fmt.IMPRESSION_ACTION)
    # requests: runs of equal request_id among the impression rows (rows are grouped by request)
    imp_req = c.request[shown]
    new_req = np.ones(len(shown), dtype=bool)
    new_req[1:] = imp_req[1:] != imp_req[:-1]
    req_first = shown[new_req]  # first slate row of each request
    s_len = np.diff(np.append(np.flatnonzero(new_req), len(shown)))
    # history end = number of the user's history rows with ts < request_ts (the request's own
    # impressions share its ts, so they never leak into its history)
    t0 = int(c.ts.min()) if len(c) else 0
    hkey = user_rank[hist].astype(np.int64) * (1 << 40) + (c.ts[hist] - t0)
    rkey = user_rank[req_first].astype(np.int64) * (1 << 40) + (c.ts[req_first] - t0)
    h_end = np.searchsorted(hkey, rkey, side="left")
    h_user_start = np.searchsorted(hkey, user_rank[req_first].astype(np.int64) * (1 << 40), side="left")
    h_begin = np.maximum(h_user_start, h_end - L)
    # splits: per user, last request = test, the one before = valid
    r_group = np.unique(user_rank[req_first], return_inverse=True)[1]
    split = _split_of_last(r_group, np.bincount(r_group))
    slate_start = np.cumsum(s_len) - s_len
    plans = {}
    for code, name in enumerate(fmt.SPLITS):
        sel = np.flatnonzero(split == code)
        slate_rows = shown[_ranges(slate_start[sel], s_len[sel])]
        plans[name] = _Plan(rows=req_first[sel], seq_start=h_user_start[sel], h_begin=h_begin[sel], h_end=h_end[sel],
                            slate_rows=slate_rows, s_len=s_len[sel], s_pos=c.position[slate_rows])
    return _ChunkPlan(seq=hist, splits=plans)


def _plan_sequences(c: _Chunk, L: int, S: int) -> _ChunkPlan:
    _, starts, n = _user_starts(c.user)
    plans = {}
    for name, back in (("test", 1), ("valid", 2)):
        ok = n >= back
        t = starts[ok] + n[ok] - back
        plans[name] = _Plan(rows=t, seq_start=starts[ok], h_begin=np.maximum(starts[ok], t - L), h_end=t,
                            slate_rows=t, s_len=np.ones(len(t), np.int64), s_pos=np.zeros(len(t), np.int16))
    m = n - 2  # the train part s[:m]
    ok = m >= 2
    first_t = np.maximum(1, m[ok] - S)
    per_user = (first_t - 1) // L + 1
    k = _ranges(np.zeros(len(per_user), np.int64), per_user)  # 0, 1, ... within each user
    user_of = np.repeat(np.arange(len(per_user)), per_user)
    # chronological within a user: k counts back from the last window
    t_local = first_t[user_of] - (per_user[user_of] - 1 - k) * L
    base = starts[ok][user_of]
    t = base + t_local
    s_len = np.minimum(t_local + S, m[ok][user_of]) - t_local
    slate_rows = _ranges(t, s_len)
    plans["train"] = _Plan(rows=t, seq_start=base, h_begin=base + np.maximum(0, t_local - L), h_end=t,
                           slate_rows=slate_rows, s_len=s_len, s_pos=slate_rows - np.repeat(t, s_len))
    return _ChunkPlan(seq=np.arange(len(c)), splits=plans)


def plan_chunk(c: _Chunk, L: int, S: int, has_impressions: bool, history_impressions: bool) -> _ChunkPlan:
    """Which examples a chunk yields, under the rules of the module docstring."""
    return _plan_impressions(c, L, S, history_impressions) if has_impressions else _plan_sequences(c, L, S)


class _ExampleWriter:
    """The per-example layout: EX/{train,valid,test}/part-*.parquet of UnifiedExamples."""

    def __init__(self, out: Path, rows_per_shard: int):
        for sub in ("sequences", "requests"):  # a folder rebuilt in this layout drops the other one
            shutil.rmtree(out / sub, ignore_errors=True)
        self.writers = {s: fmt.ShardedWriter(out / s, fmt.UNIFIED_EXAMPLE_SCHEMA, rows_per_shard) for s in fmt.SPLITS}

    def write(self, chunk: _Chunk, plan: _ChunkPlan) -> None:
        for split, p in plan.splits.items():
            self.writers[split].write(_examples(chunk, plan.seq, p))

    def close(self) -> dict:
        for w in self.writers.values():
            w.close()
        return {}


def _copy_shards(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.glob("part-*.parquet"):
        old.unlink()
    for p in fmt.shard_paths(src):
        shutil.copyfile(p, dst / p.name)


def _check(raw: Path, out: Path, raw_meta: dict, max_history: int, slate_size: int | None, chunk_events: int,
           layout: str, buckets: int, bucket: int | None) -> int:
    """Check build_examples' arguments; returns the slate size S."""
    if out.resolve() == raw.resolve():  # items/ would be copied onto itself and lost
        raise ValueError(f"out_dir must differ from raw_dir ({raw})")
    if max_history <= 0:
        raise ValueError(f"max_history must be positive, got {max_history}")
    if slate_size is None:
        slate_size = int(raw_meta.get("config", {}).get("slate_size", 10)) if raw_meta.get("has_impressions") else 10
    for name, value in (("slate_size", slate_size), ("chunk_events", chunk_events), ("buckets", buckets)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got '{layout}'")
    if bucket is not None and not 0 <= bucket < buckets:
        raise ValueError(f"bucket must be in 0..{buckets - 1} (buckets={buckets}), got {bucket}")
    return slate_size


def _stream(raw: Path, writer, plan: dict, total: int, chunk_events: int, progress: bool,
            bucket: tuple[int, int] | None = None) -> dict:
    """Plan and write every chunk of RAW/events (only the users of bucket = (k, N) when given);
    returns split counts, users and chunk sizes."""
    from tqdm.auto import tqdm

    counts = dict.fromkeys(fmt.SPLITS, 0)
    num_users = num_chunks = max_chunk = 0
    with tqdm(total=total, unit="event", unit_scale=True, desc="examples", disable=not progress) as bar:
        for chunk in iter_user_chunks(raw / "events", chunk_events):
            bar.update(len(chunk))
            if bucket is not None:
                chunk = restrict_to_bucket(chunk, *bucket)
                if len(chunk) == 0:
                    continue
            chunk_plan = plan_chunk(chunk, **plan)
            writer.write(chunk, chunk_plan)
            for split, p in chunk_plan.splits.items():
                counts[split] += len(p.rows)
            num_users += len(np.unique(chunk.user))
            num_chunks += 1
            max_chunk = max(max_chunk, len(chunk))
    return {"splits": counts, "num_examples": sum(counts.values()), "num_users": num_users,
            "chunks": {"count": num_chunks, "max_events": max_chunk, "chunk_events": chunk_events}}


def build_examples(raw_dir: str | Path, out_dir: str | Path, *, max_history: int = 50, slate_size: int | None = None,
                   chunk_events: int = 500_000, rows_per_shard: int = 250_000, progress: bool = True,
                   history_impressions: bool = False, layout: str = "examples", buckets: int = 16,
                   bucket: int | None = None) -> dict:
    """Build EX/ from RAW/ (docs/architecture.md); returns the EX meta dict.

    slate_size: MovieLens next-action slate length S; with impressions, slates keep positions
    < S (default: the generator's slate size, i.e. the whole slate).
    history_impressions: keep earlier impressions (action 0) in the history (data with
    impressions only; MovieLens has none).
    layout: "examples" writes one UnifiedExample per row (EX/{train,valid,test}/); "sequences"
    stores each user's history material once, in `buckets` user-hash buckets, and request rows
    that reference it (unipinrec.data.sequence_table; read back as UnifiedExamples by iter_examples).
    bucket: build only the users in user-hash bucket `bucket` of `buckets` (sequence_table.user_bucket),
    in either layout: the part one pod of a parallel build writes; data.buckets.merge_buckets
    assembles the parts into the folder the one-process build writes.
    """
    raw, out = Path(raw_dir), Path(out_dir)
    raw_meta = fmt.read_meta(raw)
    slate_size = _check(raw, out, raw_meta, max_history, slate_size, chunk_events, layout, buckets, bucket)
    has_imp = bool(raw_meta.get("has_impressions", False))
    total = raw_meta.get("num_events") or fmt.count_rows(raw / "events")
    if layout == "sequences":
        from .sequence_table import SequenceWriter

        writer = SequenceWriter(out, buckets, rows_per_shard, only=bucket)
    else:
        writer = _ExampleWriter(out, rows_per_shard)
    plan = dict(L=max_history, S=slate_size, has_impressions=has_imp, history_impressions=history_impressions)
    try:
        built = _stream(raw, writer, plan, total, chunk_events, progress,
                        bucket=None if bucket is None else (bucket, buckets))
    finally:
        layout_meta = writer.close()

    _copy_shards(raw / "items", out / "items")
    if (raw / "oracle").exists():
        _copy_shards(raw / "oracle", out / "oracle")
    meta = {
        "source": raw_meta["source"],
        "actions": raw_meta["actions"],
        "max_history": max_history,
        "slate_size": slate_size,
        "has_impressions": has_imp,
        "history_impressions": bool(history_impressions and has_imp),
        **built,
        "num_items": raw_meta.get("num_items") or fmt.count_rows(out / "items"),
        "num_events": total,
        "seed": raw_meta.get("seed"),
        "rule": "feed requests (last request per user = test, second-to-last = valid)" if has_imp
        else "leave-one-out sequences (last action = test, second-to-last = valid, train windows on the rest)",
        "raw": str(raw),
        "layout": layout,
        **({} if bucket is None else {"bucket": bucket, "buckets": buckets}),
        **layout_meta,
    }
    fmt.write_meta(out, meta)
    return meta
