"""Encoding, the second stage: each resolved history through `encode_history`, or its
cross-request KV cache entry reused as is (hit) or extended by the appended actions (extend).
On a GPU a fresh encode is a CUDA graph replay at the batch's bucket shape (`graphs.py`)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..sequences import Actions
from .kv_cache import UserKVCache
from .resolve import Resolved
from .timing import StageTimer


class HistoryEncoder:
    def __init__(self, device: torch.device, user_cache: UserKVCache, graphs=None,
                 actions_type: type[Actions] = Actions):
        self.device = device
        self.user_cache = user_cache
        self.graphs = graphs  # serving.graphs.Graphs on CUDA, else None (eager)
        self.actions_type = actions_type

    def batch(self, preps: Sequence[Resolved], max_history: int, start: Sequence[int] | None = None) -> Actions:
        """Right-padded batch of each prep's last `max_history` actions (from `start[i]` of those)."""
        windows = [p.window(max_history, 0 if start is None else start[i]) for i, p in enumerate(preps)]
        return self.actions_type.from_histories(windows, [p.request_ts for p in preps], device=self.device)

    def encode(self, loaded, preps: Sequence[Resolved], timer: StageTimer, stage: str, use_cache: bool,
               looked=None):
        """-> (kv_cache of the batch in prep order, cache status per prep). looked: the cache
        lookups already made for these preps (the fused path's)."""
        from ..model import KVCache

        model = loaded.model
        L = model.config.max_history
        caching = use_cache and self.user_cache.enabled
        if looked is None or not caching:
            looked = [(p.cached or self.user_cache.lookup(p.req.user_id, p.raw_window(L), p.request_ts, L))
                      if caching else None for p in preps]
        status = [lk.status if lk is not None else "miss" for lk in looked]
        parts: list[tuple[Any, list[int]]] = []
        with timer.stage(stage):
            miss = [i for i, s in enumerate(status) if s == "miss"]
            if miss:
                parts.append((self._encode_new(model, [preps[i] for i in miss], L, stage), miss))
            ext = [i for i, s in enumerate(status) if s == "extend"]
            if ext:
                cached = KVCache.cat([looked[i].kv.to(self.device) for i in ext])
                new = self.batch([preps[i] for i in ext], L, start=[looked[i].num_cached for i in ext])
                parts.append((model.extend_history(cached, new)[1], ext))
            hit = [i for i, s in enumerate(status) if s == "hit"]
            if hit:
                parts.append((KVCache.cat([looked[i].kv.to(self.device) for i in hit]), hit))
            kv = parts[0][0] if len(parts) == 1 else self._in_order(KVCache.cat([p[0] for p in parts]), parts)
        if caching:
            new = [i for i, s in enumerate(status) if s != "hit"]
            windows = [preps[i].window(L) for i in new]
            for i, window, row in zip(new, windows, kv.rows(new, [len(w) for w in windows])):
                self.user_cache.put(preps[i].req.user_id, row, preps[i].raw_window(L), preps[i].request_ts,
                                    rows=window.items)
        return kv, status

    def _encode_new(self, model, preps: Sequence[Resolved], L: int, role: str):
        """A fresh encode of the preps' windows: a graph replay on CUDA, else eager."""
        if self.graphs is not None:
            g = self.graphs.of(model)
            windows = [p.window(L) for p in preps]
            width = g.buckets.width(max([1] + [len(w) for w in windows]))
            acts = self.actions_type.from_histories(windows, [p.request_ts for p in preps], device=self.device,
                                          rows=g.buckets.batch(len(preps)), width=width)
            kv = g.encode(acts, len(preps), role)
            if kv is not None:
                return kv
            return model.encode_history(acts.index_select(torch.arange(len(preps), device=self.device)))[1]
        return model.encode_history(self.batch(preps, L))[1]

    def _in_order(self, kv, parts):
        order = [i for p in parts for i in p[1]]
        return kv.index_select(torch.as_tensor(np.argsort(order), device=self.device))
