"""Encoding, the second stage: each resolved history through `encode_history`, or its
cross-request KV cache entry reused as is (hit) or extended by the appended actions (extend)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..sequences import Actions
from .kv_cache import UserKVCache
from .resolve import Resolved
from .timing import StageTimer


class HistoryEncoder:
    def __init__(self, device: torch.device, user_cache: UserKVCache, actions_type: type[Actions] = Actions):
        self.device = device
        self.user_cache = user_cache
        self.actions_type = actions_type

    def batch(self, preps: Sequence[Resolved], max_history: int, start: Sequence[int] | None = None) -> Actions:
        """Right-padded batch of each prep's last `max_history` actions (from `start[i]` of those)."""
        windows = [p.window(max_history, 0 if start is None else start[i]) for i, p in enumerate(preps)]
        return self.actions_type.from_histories(windows, [p.request_ts for p in preps], device=self.device)

    def encode(self, loaded, preps: Sequence[Resolved], timer: StageTimer, stage: str, use_cache: bool):
        """-> (kv_cache of the batch in prep order, cache status per prep)."""
        from ..model import KVCache

        model = loaded.model
        L = model.config.max_history
        caching = use_cache and self.user_cache.enabled
        looked = [self.user_cache.lookup(p.req.user_id, p.window(L), p.request_ts, L) if caching else None
                  for p in preps]
        status = [lk.status if lk is not None else "miss" for lk in looked]
        parts: list[tuple[Any, list[int]]] = []
        with timer.stage(stage):
            miss = [i for i, s in enumerate(status) if s == "miss"]
            if miss:
                parts.append((model.encode_history(self.batch([preps[i] for i in miss], L))[1], miss))
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
            for i, p in enumerate(preps):
                if status[i] != "hit":
                    self.user_cache.put(p.req.user_id, kv.row(i), p.window(L), p.request_ts)
        return kv, status

    def _in_order(self, kv, parts):
        order = [i for p in parts for i in p[1]]
        return kv.index_select(torch.as_tensor(np.argsort(order), device=self.device))
