"""The whole request in one CUDA graph: encode, retrieval (seen items masked, exact top-K over
the item vectors), ranking (on the same KV cache, or after a second encode when the engine
re-encodes or ranks with another model) and utility, for a batch of plain requests. One copy in (the batch's actions and seen items), one
replay, one copy out: on a GPU the staged path's host round trips between the stages cost more
than the stages themselves at small batches (docs/serving.md, "On a GPU").

Plain: stage "all", a history of at least one action, no deadline (the staged path checks it
between retrieval and ranking), a device index (`TorchIndex`), and every cross-request cache
lookup a miss (the misses are stored as usual). Anything else takes the staged path, which
computes the same scores (tests/serving/test_graphs.py runs both on CPU, where the graph is
replaced by the same function run eagerly).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..sequences import Actions
from .graphs import bucket
from .resolve import Resolved
from .timing import StageTimer


def eligible(engine, preps: Sequence[Resolved]) -> bool:
    r = engine.retriever
    return (r._pos_to_row is not None and engine.config.deadline_ms == 0
            and all(p.req.stage == "all" and len(p.rows) > 0 and p.req.deadline_ms is None for p in preps))


def serve_fn(model, ranking, index, row_to_pos, pos_to_row, weights, acts: Actions, seen, cands: int, kv=None):
    """The fused computation: -> (kv, (B, C', T + 3) int64: float32 bits of task probabilities,
    utility and retrieval score, then the item id (-1 where not found)), each row's candidates in
    the response's order (utility descending, ties in retrieval order; not found last, utility
    -inf). ranking: None when ranking attends to the retrieval encode's KV cache, else the model
    that encodes again. seen (B, 2 + W): column 0 is 1 where the row excludes seen items, column 1
    its num_candidates, then the embedding rows of its actions before the encoded window (the
    window's own rows are acts.items, already here). kv: the batch's cached encode (cross-request
    cache hits): no encode here."""
    if kv is None:
        _, kv = model.encode_history(acts)
    top, pos = retrieve_top(kv, acts, seen, index, row_to_pos, cands)
    rank_kv = kv if ranking is None else ranking.encode_history(acts)[1]
    ranker = model if ranking is None else ranking
    gaps = ranker.default_candidate_gaps(acts.lengths, kv.last_ts(), acts.request_ts)
    probs = torch.sigmoid(ranker.rank(pos_to_row[pos], rank_kv, gaps).float())  # (B, C', T)
    packed, utility = pack_candidates(probs, top, pos, seen, weights, index)
    return kv, in_response_order(packed, utility)


def retrieve_top(kv, acts: Actions, seen, index, row_to_pos, cands: int):
    """Exact top-`cands` of the catalog for each row's user vector, its seen items masked ->
    (scores (B, C'), positions in the index (B, C')), in retrieval order: the index's own device
    search, as the staged path's."""
    masked = torch.cat([acts.items * seen[:, :1], seen[:, 2:]], dim=1)  # row 0 (padding) maps to "none"
    return index.search_device(kv.user_vectors, cands, exclude_positions=row_to_pos[masked])


def pack_candidates(probs, top, pos, seen, weights, index):
    """A batch's ranked candidates, in retrieval order -> (packed (B, C', T + 3) int64: float32
    bits of probabilities, utility and retrieval score, then the item id, -1 where not found;
    utility (B, C'), -inf where not found). Found: a finite retrieval score among the row's
    first num_candidates (seen column 1)."""
    found = torch.isfinite(top) & (torch.arange(top.shape[1], device=top.device)[None] < seen[:, 1:2])
    score = probs @ weights
    found &= score == score  # a NaN utility (a broken model) is not found: the places need a total order
    utility = torch.where(found, score, float("-inf"))  # (B, C')
    ids = torch.where(found, index._ids_t[pos], -1)
    floats = torch.cat([probs, utility[..., None], top.float()[..., None]], dim=-1)
    return torch.cat([floats.view(torch.int32).long(), ids[..., None]], dim=-1), utility


# below this many pairs (8 rows of 256 candidates) counting places beats a sort on the H200:
# 11 / 30 us less at 1 / 8 rows, 15 us more at 32 (bench/tail_probe.py, docs/serving.md)
PLACES_MAX_PAIRS = 8 * 256 * 256


def in_response_order(packed: torch.Tensor, utility: torch.Tensor) -> torch.Tensor:
    """packed (B, C, F) rows in retrieval order -> in the response's: utility descending, ties in
    retrieval order. Small batches scatter each row to its place; larger ones sort (a sort of
    the batch is one kernel of about 40 us at any batch size, the places grow with B * C * C)."""
    B, C = utility.shape
    if B * C * C <= PLACES_MAX_PAIRS:
        place = descending_places(utility)[..., None].expand_as(packed)
        return torch.empty_like(packed).scatter_(1, place, packed)
    order = utility.sort(dim=1, descending=True, stable=True).indices
    return packed.gather(1, order[..., None].expand_as(packed))


_EARLIER: dict = {}  # (C, device) -> (C, C) bool, [i, j] = j < i: made once, outside any graph capture


def descending_places(x: torch.Tensor) -> torch.Tensor:
    """x (B, C) -> each entry's place in a stable descending sort of its row (ties keep their
    order): the number of entries that go before it, from comparisons of every pair (four
    small kernels)."""
    C = x.shape[1]
    key = (C, x.device)
    if key not in _EARLIER:
        _EARLIER[key] = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1)
    before, after = x[:, None, :], x[:, :, None]  # [b, i, j]: entry j against entry i
    return torch.where(_EARLIER[key], before >= after, before > after).sum(-1)


class PinnedRing:
    """Host buffers kept for reuse, `depth` per (shape, dtype), handed out in turn (pinned on a
    GPU: allocating one per batch cost 25 us each, three per batch). A buffer comes back only
    after `depth - 1` others of its shape and once the device has finished the copies last marked
    on it (`mark`); `depth` exceeds the batches in flight at once (`serve_chunks`: two), so the
    host is done reading an output buffer before the device writes it again. Callers take the
    shapes of graph buckets, so the ring holds `depth` buffers per bucket at most.

    A batch's buffers are marked together, by one event (each CUDA call costs the host 4-11 us
    on the GPU machine: bench/cuda_call_cost.py), and marks are numbered: once the host has waited for a batch
    (`done`), every earlier mark is known complete and `take` does not ask the device again."""

    def __init__(self, pin: bool, depth: int = 4):
        self.pin, self.depth = pin, depth
        self._rings: dict[tuple, list] = {}
        self._marks: dict[int, tuple[int, torch.cuda.Event]] = {}  # buffer -> (mark number, its event)
        self._events: dict[int, torch.cuda.Event] = {}  # one per marking buffer, made once, recorded again
        self._count = self._done = 0

    def take(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(shape), dtype)
        if key not in self._rings:  # all of a shape's buffers at once: the warm-up's shapes never on a request
            # (a shape not warmed comes with a graph not captured yet: tens of ms against ~0.1 ms here)
            self._rings[key] = [torch.empty(shape, dtype=dtype, pin_memory=self.pin) for _ in range(self.depth)]
        ring = self._rings[key]
        buf = ring.pop(0)
        ring.append(buf)
        self.wait(self._marks.get(buf.data_ptr()))
        return buf

    def mark(self, first: torch.Tensor, *others: torch.Tensor):
        """The buffers' copies are enqueued: none is handed out again before the device has done
        them. -> the mark, to `wait` for (None unpinned)."""
        if not self.pin:
            return None
        ev = self._events.get(first.data_ptr())
        if ev is None:  # first's own event, made once and recorded at each use
            ev = self._events[first.data_ptr()] = torch.cuda.Event()
        ev.record()
        self._count += 1
        for buf in (first, *others):
            self._marks[buf.data_ptr()] = (self._count, ev)
        return self._count, ev

    def wait(self, mark) -> None:
        """Until the device has done the copies of `mark` (and so every earlier one)."""
        if mark is not None and mark[0] > self._done:
            mark[1].synchronize()  # a later record of the event waits longer, never less
            self._done = mark[0]


class FusedGraphs:
    """Fused graphs of one engine, per (rows, history width, seen width, candidates) bucket."""

    def __init__(self, engine):
        self.engine = engine
        self.graphs: dict[tuple, tuple] = {}
        self.inputs: dict[tuple, torch.Tensor] = {}  # (rows, width) -> the static input of those graphs
        self.host = PinnedRing(pin=engine.device.type == "cuda")  # the batches' host sides, reused

    def input(self, rows: int, width: int) -> torch.Tensor:
        """The static input of the (rows, width) graphs, shared by all of them (replays run in
        stream order): `Actions.from_histories(out=...)` copies a batch straight into it."""
        key = (rows, width)
        if key not in self.inputs:
            self.inputs[key] = torch.zeros(Actions.flat_size(rows, width), dtype=torch.long, device=self.engine.device)
        return self.inputs[key]

    def run(self, acts: Actions, seen: torch.Tensor, cands: int, cached: list | None = None):
        """acts: the batch, on the device; on a GPU built in `input(rows, width)` (its graphs read
        it there: nothing is copied); seen: its `_seen_before_window` rows on the host (pinned on a GPU);
        cached: the batch's cross-request cache entries (all hits), copied into the graph's KV
        buffers; else the graph encodes."""
        e = self.engine
        r = e.retriever
        args = (e.ret.model, None if e.share_kv else e.rnk.model, r.index, r._row_to_pos, r._pos_to_row,
                e.ranker.weights)
        eager = lambda: serve_fn(*args, acts, seen.to(e.device, non_blocking=True), cands,  # noqa: E731
                                 kv=None if cached is None else self._cat(cached, acts))
        if e.graphs is None:  # CPU: the same function, eagerly
            return eager()
        from .graphs import _Graph

        B, W = acts.batch_size, acts.width
        key = (B, W, seen.shape[1], cands, cached is not None)
        if key not in self.graphs:
            if len(self.graphs) >= e.config.max_graphs:
                return eager()
            st_acts = Actions.of_flat(self.input(B, W), B, W)
            st_seen = torch.zeros(seen.shape, dtype=seen.dtype, device=e.device)
            st_kv = None if cached is None else self._static_kv(st_acts, cached[0])
            fn = self.function(lambda: serve_fn(*args, st_acts, st_seen, cands, kv=st_kv))
            self.graphs[key] = (st_acts, st_seen, st_kv, _Graph(fn))
        st_acts, st_seen, st_kv, graph = self.graphs[key]
        if acts.lengths.data_ptr() != st_acts.lengths.data_ptr():
            raise ValueError("FusedGraphs.run: build the batch in input(rows, width) (Actions.from_histories(out=...))")
        st_seen.copy_(seen, non_blocking=True)
        if cached is not None:  # each entry is trimmed to its length: copy into the padded buffers
            self._copy_cached(st_kv, cached)
        return graph.replay()

    def function(self, fn):
        """fn, or fn through torch.compile (EngineConfig.compile): static shapes, one graph with no
        breaks (a break would leave Python between kernels inside the captured replay)."""
        if not self.engine.config.compile:
            return fn
        import torch._dynamo

        # every bucket is one more compilation of the same code: allow one per graph this engine may hold
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 4 * self.engine.config.max_graphs))
        fn()  # once eagerly first: one-time choices (the attention kernel) are made outside the trace
        return torch.compile(fn, dynamic=False, fullgraph=True, backend=self.backend)

    @property
    def backend(self) -> str:
        return "inductor" if self.engine.device.type == "cuda" else "eager"  # CPU: traced, not code-generated

    @staticmethod
    def _static_kv(st_acts: Actions, like):
        """Zeroed KV buffers of the bucket's shape (zeros: padding stays finite), on st_acts: one
        buffer for every layer's keys and values when the cached rows are stacked alike."""
        from ..model import KVCache

        B, Wt = st_acts.batch_size, st_acts.width * like.tokens_per_action
        parts, buffer = (*like.keys, *like.values), None
        if like.stacked() is not None:
            k = parts[0]
            buffer = k.new_zeros((len(parts), B, k.shape[1], Wt, k.shape[3]))
            parts = list(buffer)
        else:
            parts = [t.new_zeros((B, t.shape[1], Wt, t.shape[3])) for t in parts]
        n = len(like.keys)
        return KVCache(keys=parts[:n], values=parts[n:], history=st_acts,
                       user_vectors=like.user_vectors.new_zeros((B, like.user_vectors.shape[1])),
                       tokens_per_action=like.tokens_per_action, buffer=buffer)

    @staticmethod
    def _copy_cached(st_kv, cached: list) -> None:
        """The cached rows into the graph's padded buffers: one copy per row when both sides are
        stacked (a batch of 64 hits made 1,024 copies otherwise: 3 ms of launches), else one per
        layer, key and value of each row; all in one call."""
        whole, rows = st_kv.stacked(), [c.stacked() for c in cached]
        if whole is not None and all(r is not None for r in rows):
            dst = [whole[:, i:i + 1, :, :r.shape[3]] for i, r in enumerate(rows)]
            src = rows
        else:
            dst = [d[i:i + 1, :, :c.keys[0].shape[2]] for i, c in enumerate(cached)
                   for d in (*st_kv.keys, *st_kv.values)]
            src = [t for c in cached for t in (*c.keys, *c.values)]
        torch._foreach_copy_(dst, src)
        st_kv.user_vectors[:len(cached)].copy_(torch.cat([c.user_vectors for c in cached]))

    @staticmethod
    def _cat(cached: list, acts: Actions):
        from ..model import KVCache
        from .graphs import pad_kv

        kv = pad_kv(KVCache.cat(cached), acts.batch_size, acts.width * cached[0].tokens_per_action)
        return KVCache(keys=kv.keys, values=kv.values, history=acts, user_vectors=kv.user_vectors,
                       tokens_per_action=kv.tokens_per_action)


def serve(engine, preps: Sequence[Resolved], timer: StageTimer, fused: FusedGraphs):
    """-> (a response per prep, or None when the batch is not plain; the cache lookups made)."""
    with timer.stage("serve", sync=False):  # the batch waits for its own output (Pending.wait)
        pending, looked = launch(engine, preps, fused)
        host = None if pending is None else pending.wait()
    return (None if pending is None else pending.responses(host, timer.as_dict())), looked


class Pending:
    """A launched fused batch: its output on its way to a pinned host buffer. packed: the graph's
    output, a row per bucket row (the first len(preps) are the batch's)."""

    def __init__(self, engine, preps: Sequence[Resolved], packed: torch.Tensor, ring: PinnedRing,
                 status: str = "miss", inputs: Sequence[torch.Tensor] = ()):
        """inputs: the batch's host buffers copied in; marked with the output's copy (one event)."""
        self.engine, self.preps, self.status, self.ring = engine, preps, status, ring
        self.done = None
        if packed.device.type == "cuda":  # ring buffers of the bucket's shape: a few per bucket, not per batch size
            host = ring.take(packed.shape, packed.dtype)
            packed, self.host = packed[:len(preps)], host[:len(preps)]
            self.host.copy_(packed, non_blocking=True)
            self.done = ring.mark(host, *inputs)
        else:
            self.host = packed[:len(preps)]

    def wait(self) -> np.ndarray:
        self.ring.wait(self.done)
        return self.host.numpy()

    def responses(self, host: np.ndarray, timings: dict) -> list[dict]:
        engine, preps = self.engine, self.preps
        T = len(engine.ranker.task_names)
        ks = np.fromiter((p.req.k for p in preps), dtype=np.int64, count=len(preps))
        rows = host[:, :int(ks.max())]  # in the response's order already (serve_fn): the first k
        floats = rows[..., :T + 2].astype(np.int32).view(np.float32)
        ids = rows[..., T + 2]
        counts = np.minimum(ks, (ids >= 0).sum(axis=1))  # found ones come first
        items = engine.ranker.items_ranked(ids, floats[..., T + 1], floats[..., :T], floats[..., T], counts)
        return [{"items": it, "model_version": engine.model_version, "timings_ms": timings,
                 "kv_cache": self.status, **engine._history_meta(p)} for it, p in zip(items, preps)]


def launch(engine, preps: Sequence[Resolved], fused: FusedGraphs):
    """Start a plain batch on the device (no wait) -> (Pending, the cache lookups made), or
    (None, lookups) when the batch is not plain. Misses are stored in the cross-request cache
    here, while the graph's KV buffers still hold this batch."""
    from .graphs import Buckets, _first_rows

    if not eligible(engine, preps):
        return None, None
    L = engine.ret.model.config.max_history
    cache = engine.user_cache
    raw = [p.raw_window(L) for p in preps]  # what the cache compares
    looked = [p.cached or cache.lookup(p.req.user_id, w, p.request_ts, L) for p, w in zip(preps, raw)] \
        if cache.enabled else None
    status = [lk.status for lk in looked] if looked is not None else ["miss"] * len(preps)
    hits = status[0] == "hit" and all(s == "hit" for s in status)
    if not hits and any(s != "miss" for s in status):  # extends and mixed batches: the staged path
        return None, looked
    b = Buckets(max_history=L)
    B = len(preps)
    C = max(p.req.num_candidates for p in preps)
    rows = b.batch(B)
    width = b.width(max(len(w) for w in raw))
    ring = fused.host  # the batch's host side in reused buffers (pinned on a GPU)
    out = fused.input(rows, width) if engine.graphs is not None else None  # a GPU: the graphs' static input
    fields = [lk.kv.history_stacked() for lk in looked] if hits else None
    if fields is not None and all(f is not None for f in fields):  # the histories are on the device already
        windows, staging = None, _tail(ring, preps, rows, raw)
        acts = Actions.stack_rows(fields, staging, rows=rows, width=width, out=out)
    else:
        windows = [p.window(L) for p in preps]  # the batch and the store read them
        staging = ring.take((Actions.flat_size(rows, width),), torch.long)
        acts = Actions.from_histories(windows, [p.request_ts for p in preps], device=engine.device, rows=rows,
                                      width=width, out=out, staging=staging)
    seen = _seen_before_window(preps, rows, L, ring)
    kv, packed = fused.run(acts, seen, b.candidates(C), cached=[lk.kv for lk in looked] if hits else None)
    pending = Pending(engine, preps, packed, ring, "hit" if hits else "miss", inputs=(staging, seen))
    if looked is not None and not hits:
        kv = _first_rows(kv, B, acts)
        stored = kv.rows(range(B), [len(w) for w in windows])  # the lengths from here: no wait for the graph
        for p, r, w, row in zip(preps, raw, windows, stored):
            cache.put(p.req.user_id, row, r, p.request_ts, rows=w.items)
    return pending, looked


def serve_pipelined(engine, reqs: Sequence, chunk: int) -> list:
    """A large batch in chunks of `chunk` requests, so that the host work of one chunk (resolving
    the next, building the responses of the last) runs while the device computes another: the
    same answers as one batch, with the host time mostly hidden behind the device's."""
    return [res for out in serve_chunks(engine, (reqs[s:s + chunk] for s in range(0, len(reqs), chunk)))
            for res in out]


def serve_chunks(engine, chunks: Iterable[Sequence]) -> Iterator[list]:
    """Batches of requests -> each one's responses, in order, with one batch on the device while
    the host resolves the next and builds the responses of the one before (a serving loop's
    steady state: `Engine.handle_stream`)."""
    from .request import ServingError

    last = None  # (Pending, resolved, ok rows, timer, start) of the chunk on the device
    for reqs in chunks:
        timer = StageTimer(torch.device("cpu"))  # no synchronising stages here: the chunks overlap
        resolved = engine.resolver.resolve(reqs, timer)
        ok = [i for i, p in enumerate(resolved) if not isinstance(p, ServingError)]
        t = timer.elapsed_ms()
        pending, looked = launch(engine, [resolved[i] for i in ok], engine.fused) if ok else (None, None)
        if last is not None:
            yield _finish(*last)
            last = None
        if pending is None:  # not plain (or every request bad): the staged path, with the lookups made
            yield engine._serve_resolved(resolved, StageTimer(engine.device), looked=looked, fused_ok=False)
        else:
            last = (pending, resolved, ok, timer, t)
    if last is not None:
        yield _finish(*last)


def _finish(pending: Pending, resolved: list, ok: list, timer: StageTimer, start: float) -> list:
    host = pending.wait()
    timer.ms["serve"] = timer.elapsed_ms() - start
    out = list(resolved)
    for i, res in zip(ok, pending.responses(host, timer.as_dict())):
        out[i] = res
    return out


def _tail(ring: PinnedRing, preps: Sequence[Resolved], rows: int, windows: Sequence) -> torch.Tensor:
    """A batch's lengths then request times (2 * rows; padded rows 0) in a buffer of the ring (the
    caller marks it once its copy is enqueued)."""
    host = ring.take((2 * rows,), torch.long)
    t = host.numpy()
    t[:] = 0
    t[:len(preps)] = [len(w) for w in windows]
    t[rows:rows + len(preps)] = [p.request_ts for p in preps]
    return host


def _seen_before_window(preps: Sequence[Resolved], rows: int, L: int, ring: PinnedRing | None = None) -> torch.Tensor:
    """(rows, 2 + W): the exclude flag, num_candidates, then the rows of each history's actions
    before its last L (the whole history is excluded, not only the encoded window); in a buffer
    of `ring` when given."""
    excl = [p.seen_rows() if p.req.exclude_seen else None for p in preps]  # the dropped actions' items too
    before = [0 if e is None else len(e) - min(L, len(p.rows)) for p, e in zip(preps, excl)]
    shape = (rows, 2 + bucket(max(before), lo=16))
    out = torch.empty(shape, dtype=torch.long) if ring is None else ring.take(shape, torch.long)
    seen = out.numpy()
    seen[:] = 0
    seen[:len(preps), 0] = [p.req.exclude_seen for p in preps]
    seen[:len(preps), 1] = [p.req.num_candidates for p in preps]
    for j, p in enumerate(preps):
        if before[j]:
            seen[j, 2:2 + before[j]] = excl[j][:before[j]]
    return out
