"""Static shapes and CUDA graphs for serving on a GPU.

A GPU serves a request in well under a millisecond of kernels, so launching them one by one
from Python (hundreds per request) would cost more than the work. Here every batch is padded to
a bucket (batch, history width and candidates rounded up to half-octave steps: 1, 2, 3, 4, 6, 8,
12, 16, ...; exact powers of two stay themselves) and each bucket's encode and rank run as one
captured CUDA graph, replayed per batch. Padding is exact: padded history columns and padded
batch rows (length 0) are masked out of attention, and a padded candidate only attends to itself
and the history, so the real rows' scores do not change (tests/serving/test_graphs.py, on CPU).

`Graphs` holds one `ModelGraphs` per model; the engine's `HistoryEncoder` and `Ranker` use them
when the device is CUDA (on CPU the eager path runs, unchanged). Graphs are captured at engine
load by serving synthetic batches of the configured shapes (`warm_up`), so the first request is
as fast as a warm one; a bucket met later is captured on first use, up to `max_graphs` graphs
per model (then the eager path serves it).

The outputs of a replay live in the graph's static buffers: the KV cache `encode` returns is a
view of them, valid until the same bucket is encoded again (the engine copies what it keeps:
`KVCache.row` for the cross-request cache and the split-flow handles). Each `role` (the engine's
stage name, "encode" or "encode_rank") has its own buffers, so re-encoding for ranking never
overwrites the retrieval encode of the same request.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..sequences import Actions


def bucket(n: int, *, lo: int = 1, hi: int | None = None) -> int:
    """The smallest half-octave step (2^k or 3 * 2^(k-1)) >= max(n, lo), at most `hi`."""
    n = max(int(n), lo, 1)
    p = 1 << max(0, math.ceil(math.log2(n)))  # next power of two
    step = p if p < 4 or n > 3 * p // 4 else 3 * p // 4
    return min(step, hi) if hi is not None else step


@dataclass(frozen=True)
class Buckets:
    """Bucket rules of one model: history widths up to its L, candidates at least 8."""

    max_history: int
    min_width: int = 16
    min_candidates: int = 8

    def batch(self, b: int) -> int:
        return bucket(b)

    def width(self, w: int) -> int:
        return bucket(w, lo=min(self.min_width, self.max_history), hi=self.max_history)

    def candidates(self, c: int) -> int:
        return bucket(c, lo=self.min_candidates)


def pad_rows(t: torch.Tensor, rows: int, value: int | float = 0) -> torch.Tensor:
    """Pad dim 0 of t to `rows` with `value`."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), value)])


def pad_kv(kv, rows: int, width: int):
    """A KVCache padded to (rows, width): zero keys/values, empty padded rows."""
    import torch.nn.functional as F

    from ..model import KVCache

    W = kv.keys[0].shape[2]
    pad = lambda t: pad_rows(F.pad(t, (0, 0, 0, width - W)), rows)  # noqa: E731
    hist = kv.history
    hist = hist._map(lambda t: pad_rows(t, rows), rows=lambda t: pad_rows(t, rows))
    return KVCache(keys=[pad(k) for k in kv.keys], values=[pad(v) for v in kv.values], history=hist,
                   user_vectors=pad_rows(kv.user_vectors, rows), tokens_per_action=kv.tokens_per_action)


def padded_rank(model, candidates: torch.Tensor, kv, gaps: torch.Tensor, buckets: Buckets) -> torch.Tensor:
    """`model.rank` at the bucket shape, cut back to (B, C, T): what a rank graph computes."""
    B, C = candidates.shape
    Bb, Cb = buckets.batch(B), buckets.candidates(C)
    Wb = buckets.width(kv.keys[0].shape[2] // kv.tokens_per_action) * kv.tokens_per_action
    cand = pad_rows(torch.nn.functional.pad(candidates, (0, Cb - C)), Bb)
    return model.rank(cand, pad_kv(kv, Bb, Wb), pad_rows(gaps, Bb))[:B, :C]


class _Graph:
    """One captured CUDA graph over static input tensors; `outputs` are its static outputs."""

    def __init__(self, fn: Callable[[], object]):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture (kernels chosen, workspaces made)
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # a private pool: no other graph writes its outputs
            self.outputs = fn()

    def replay(self):
        self.graph.replay()
        return self.outputs


def _dummy_actions(rows: int, width: int, device) -> Actions:
    z = lambda *s: torch.zeros(s, dtype=torch.long, device=device)  # noqa: E731
    return Actions(items=z(rows, width), actions=z(rows, width), ts=z(rows, width), surfaces=z(rows, width),
                   lengths=z(rows), request_ts=z(rows))


class ModelGraphs:
    """Encode and rank graphs of one model, per (role, bucket)."""

    def __init__(self, model, device: torch.device, max_graphs: int = 64):
        self.model = model
        self.device = device
        self.buckets = Buckets(max_history=model.config.max_history)
        self.tpa = model.config.tokens_per_action
        self.max_graphs = max_graphs
        self.encodes: dict[tuple, tuple[Actions, _Graph]] = {}
        self.ranks: dict[tuple, tuple[dict, _Graph]] = {}
        self.copy_kv: dict[tuple, object] = {}  # (rows, width) -> KVCache buffers for caches from elsewhere

    @property
    def num_graphs(self) -> int:
        return len(self.encodes) + len(self.ranks)

    def _room(self) -> bool:
        return self.num_graphs < self.max_graphs

    # --- encode -------------------------------------------------------------------------------

    def encode_graph(self, role: str, rows: int, width: int):
        key = (role, rows, width)
        if key not in self.encodes:
            if not self._room():
                return None
            static = _dummy_actions(rows, width, self.device)
            self.encodes[key] = (static, _Graph(lambda: self.model.encode_history(static)[1]))
        return self.encodes[key]

    def encode(self, history: Actions, num_rows: int, role: str = "encode"):
        """history: a batch already at a bucket shape (rows, width), its first `num_rows` real ->
        KVCache of those rows (views of the graph's buffers), or None without a graph."""
        got = self.encode_graph(role, history.batch_size, history.width)
        if got is None:
            return None
        static, graph = got
        for name in (*Actions.per_action_fields(), "lengths", "request_ts"):
            getattr(static, name).copy_(getattr(history, name), non_blocking=True)
        kv = graph.replay()
        return _first_rows(kv, num_rows, history)

    # --- rank ---------------------------------------------------------------------------------

    def rank_graph(self, kv_buffers, rows: int, cands: int, num_tasks: int, key_kv: tuple):
        key = (*key_kv, cands)
        if key not in self.ranks:
            if not self._room():
                return None
            from ..model import KVCache

            z = lambda *s: torch.zeros(s, dtype=torch.long, device=self.device)  # noqa: E731
            static = {"cand": z(rows, cands), "lengths": z(rows), "last_ts": z(rows), "request_ts": z(rows),
                      "user": torch.zeros_like(kv_buffers.user_vectors),
                      "weights": torch.zeros(num_tasks, device=self.device)}
            hist = _dummy_actions(rows, 1, self.device)
            hist.lengths = static["lengths"]
            kv = KVCache(keys=kv_buffers.keys, values=kv_buffers.values, history=hist, user_vectors=static["user"],
                         tokens_per_action=self.tpa)

            def scores():  # gaps, logits, probabilities and utility in one graph
                m = self.model
                gaps = m.default_candidate_gaps(static["lengths"], static["last_ts"], static["request_ts"])
                probs = torch.sigmoid(m.rank(static["cand"], kv, gaps).float())  # (rows, cands, T)
                return torch.cat([probs, (probs @ static["weights"])[..., None]], dim=-1)

            self.ranks[key] = (static, _Graph(scores))
        return self.ranks[key]

    def rank(self, candidates: torch.Tensor, kv, request_ts: torch.Tensor, weights: torch.Tensor):
        """candidates (B, C) rows, kv (B rows), request_ts (B,), task weights (T,) -> (B, C, T + 1):
        task probabilities and the utility last; None without a graph."""
        B, C = candidates.shape
        rows, cands = self.buckets.batch(B), self.buckets.candidates(C)
        width = self.buckets.width(kv.keys[0].shape[2] // self.tpa)  # in actions
        buffers, key_kv = self._kv_buffers(kv, rows, width)
        if buffers is None:
            return None
        got = self.rank_graph(buffers, rows, cands, len(weights), key_kv)
        if got is None:
            return None
        static, graph = got
        static["cand"].zero_()
        static["cand"][:B, :C].copy_(candidates)
        static["lengths"].zero_()  # padded rows: empty histories
        static["lengths"][:B].copy_(kv.lengths)
        static["last_ts"][:B].copy_(kv.last_ts())
        static["request_ts"][:B].copy_(request_ts)
        static["user"][:B].copy_(kv.user_vectors)
        static["weights"].copy_(weights)
        return graph.replay()[:B, :C]

    def _kv_buffers(self, kv, rows: int, width: int):
        """The graph buffers holding kv: an encode graph's own outputs when kv is their view
        (no copy), else kv copied into this bucket's copy buffers."""
        for (role, r, w), (_, graph) in self.encodes.items():
            out = graph.outputs
            if (r, w) == (rows, width) and kv.keys[0].data_ptr() == out.keys[0].data_ptr() \
                    and kv.keys[0].shape[2] == w * self.tpa:
                return out, ("enc", role, r, w)
        if (rows, width) not in self.copy_kv:
            if not self._room():
                return None, None
            self.copy_kv[(rows, width)] = pad_kv(kv[0:1], rows, width * self.tpa)  # buffers of the bucket shape
        buf = self.copy_kv[(rows, width)]
        B, W = kv.batch_size, kv.keys[0].shape[2]
        for dst, src in zip((*buf.keys, *buf.values), (*kv.keys, *kv.values)):
            dst[:B, :, :W].copy_(src)
        return buf, ("copy", rows, width)


def _first_rows(kv, n: int, history: Actions):
    """The first n rows of a batch KVCache, as views (no copy), with the given history's rows."""
    from ..model import KVCache

    if n == kv.batch_size:
        return KVCache(keys=kv.keys, values=kv.values, history=history, user_vectors=kv.user_vectors,
                       tokens_per_action=kv.tokens_per_action)
    cut = lambda t: t[:n]  # noqa: E731
    return KVCache(keys=[cut(k) for k in kv.keys], values=[cut(v) for v in kv.values],
                   history=history._map(cut, rows=cut), user_vectors=kv.user_vectors[:n],
                   tokens_per_action=kv.tokens_per_action)


class Graphs:
    """The engine's CUDA graphs, one `ModelGraphs` per model; None-valued on CPU."""

    def __init__(self, device: torch.device, max_graphs: int = 64):
        self.device = device
        self.max_graphs = max_graphs
        self.models: dict[int, ModelGraphs] = {}

    @staticmethod
    def for_device(device: torch.device, enabled: bool = True, max_graphs: int = 64) -> "Graphs | None":
        return Graphs(device, max_graphs) if enabled and device.type == "cuda" else None

    def of(self, model) -> ModelGraphs:
        if id(model) not in self.models:
            self.models[id(model)] = ModelGraphs(model, self.device, self.max_graphs)
        return self.models[id(model)]


def to_host(t: torch.Tensor):
    """One device -> host copy as numpy: through a pinned buffer on CUDA (a pageable copy is
    staged and slower), plain on CPU."""
    if t.device.type != "cuda":
        return t.numpy()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    return host.numpy()


def to_device(a, device: torch.device, dtype=torch.long) -> torch.Tensor:
    """Host values -> a device tensor, through a pinned buffer on CUDA (asynchronous)."""
    t = torch.as_tensor(a, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def warm_up(engine, shapes) -> None:
    """Serve synthetic batches of every (batch, history, candidates) in `shapes` twice before the
    engine serves (or reports ready): the CUDA graphs of those buckets are captured and every
    kernel on the way (retrieval, exclusion, copies) is loaded, so a first request runs warm.
    The cross-request cache forgets the synthetic users."""
    if engine.graphs is None:
        return
    from .request import parse_request

    item_ids = engine.vocab.item_ids
    users = []
    for batch, history, cands in shapes:
        n = min(history, engine.ret.model.config.max_history)
        hist = {"item_id": [int(item_ids[j % len(item_ids)]) for j in range(n)], "action": [0] * n,
                "ts": list(range(1_000_000, 1_000_000 + n))}
        c = min(cands, engine.config.max_candidates)
        reqs = [parse_request({"user_id": 2**62 + len(users) + i, "history": hist, "k": min(c, engine.config.max_k),
                               "num_candidates": c, "request_ts": 2_000_000}, engine.limits) for i in range(batch)]
        users += [r.user_id for r in reqs]
        for _ in range(2):
            bad = [o for o in engine.handle_batch(reqs) if not isinstance(o, dict)]
            if bad:
                raise RuntimeError(f"engine warm-up failed at (batch, history, candidates) = "
                                   f"{(batch, history, cands)}: {bad[0]}")
    for u in users:
        engine.user_cache.lru.pop(u)
    engine.user_cache.stats = type(engine.user_cache.stats)()
    torch.cuda.synchronize()


__all__ = ["Buckets", "Graphs", "ModelGraphs", "bucket", "pad_kv", "padded_rank", "to_device", "to_host", "warm_up"]
