"""Byte-bounded LRU, handle expiry, and the cross-request KV cache's hit / extend / miss rules."""
from __future__ import annotations

import numpy as np
import torch

from unipinrec.sequences import Actions, History
from unipinrec.serving.kv_cache import ByteLRU, UserKVCache


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lru_evicts_least_recently_used_within_the_byte_budget():
    lru = ByteLRU(100, entry_overhead=0)
    lru.put("a", 1, 40)
    lru.put("b", 2, 40)
    assert lru.get("a") == (1, "ok")  # a is now the most recent
    lru.put("c", 3, 40)  # over budget: b goes
    assert lru.get("b") == (None, "evicted")
    assert lru.get("a")[0] == 1 and lru.get("c")[0] == 3
    assert lru.bytes == 80 and lru.evictions == 1
    assert lru.put("huge", 0, 101) is False and lru.get("huge") == (None, "missing")
    lru.put("a", 9, 10)  # replacing an entry frees its old bytes
    assert lru.bytes == 50 and lru.get("a")[0] == 9


def test_lru_ttl_marks_entries_expired():
    clock = Clock()
    lru = ByteLRU(1000, ttl_s=5, clock=clock, entry_overhead=0)
    lru.put("h", "state", 10)
    clock.t = 4.9
    assert lru.get("h") == ("state", "ok")
    clock.t = 10.0
    assert lru.get("h") == (None, "expired")
    assert lru.get("never") == (None, "missing")
    assert lru.bytes == 0


def test_lru_counts_per_entry_overhead_and_bounds_entries():
    lru = ByteLRU(10_000, entry_overhead=1000)
    for i in range(20):
        lru.put(i, i, 10)
    assert len(lru) == 9 and lru.bytes == 9 * 1010  # 10 bytes of data cost 1,010 each
    few = ByteLRU(10**9, max_entries=3, entry_overhead=0)
    for i in range(5):
        few.put(i, i, 1)
    assert len(few) == 3 and few.get(0) == (None, "evicted") and few.get(4) == (4, "ok")


def test_expired_entries_are_swept_without_being_looked_up():
    clock = Clock()
    lru = ByteLRU(10**6, ttl_s=5, clock=clock, entry_overhead=0)
    for i in range(100):
        lru.put(f"abandoned{i}", i, 100)
    clock.t = 6.0
    lru.put("fresh", 0, 100)  # any put (or get) sweeps what has expired
    assert len(lru) == 1 and lru.bytes == 100 and lru.expirations == 100
    assert lru.get("abandoned7") == (None, "expired")


def _kv(lengths, width, layers=2, heads=2, dh=4):
    from unipinrec.model import KVCache

    B = len(lengths)
    g = torch.Generator().manual_seed(0)
    k = [torch.randn(B, heads, width, dh, generator=g) for _ in range(layers)]
    v = [torch.randn(B, heads, width, dh, generator=g) for _ in range(layers)]
    z = torch.zeros(B, width, dtype=torch.long)
    history = Actions(items=z + 1, actions=z, ts=z, surfaces=z, lengths=torch.tensor(lengths),
                      request_ts=torch.zeros(B, dtype=torch.long))
    return KVCache(keys=k, values=v, history=history, user_vectors=torch.randn(B, heads * dh, generator=g))


def test_a_cache_row_drops_padding_bytes():
    kv = _kv([3, 8], width=8)
    row = kv.row(0)
    assert row.keys[0].shape == (1, 2, 3, 4) and row.history.items.shape == (1, 3)
    assert torch.equal(row.keys[1][0], kv.keys[1][0, :, :3])
    assert row.nbytes < kv.nbytes / 2


def _hist(n, seed=0) -> History:
    rng = np.random.default_rng(seed)
    return History(items=rng.integers(1, 50, n), actions=rng.integers(0, 4, n), ts=np.cumsum(rng.integers(1, 9, n)))


def test_user_cache_hit_extend_miss():
    cache = UserKVCache(10**6)
    h = _hist(12)
    first = h.take(slice(0, 8))
    assert cache.lookup(7, first, 100, max_history=16).status == "miss"
    kv = _kv([8], 8).row(0)
    cache.put(7, kv, first, 100)
    hit = cache.lookup(7, first, 200, max_history=16)
    assert hit.status == "hit" and hit.kv is kv
    ext = cache.lookup(7, h, 200, max_history=16)
    assert ext.status == "extend" and ext.num_cached == 8
    # past L the window slides: old positions change, so no reuse
    assert cache.lookup(7, h, 200, max_history=10).status == "miss"
    changed = h.actions.copy()
    changed[2] = (changed[2] + 1) % 4
    assert cache.lookup(7, History(**{**h.arrays, "actions": changed}), 200, max_history=16).status == "miss"
    assert cache.lookup(8, first, 100, max_history=16).status == "miss"
    assert cache.stats.as_dict() == {"hits": 1, "extends": 1, "misses": 4}


def test_request_time_dependent_tokens_hit_only_at_the_same_request_ts():
    cache = UserKVCache(10**6, request_dependent=True)
    h = _hist(6)
    cache.put(1, _kv([6], 6).row(0), h, 100)
    assert cache.lookup(1, h, 100, 16).status == "hit"
    assert cache.lookup(1, h, 101, 16).status == "miss"
    assert cache.lookup(1, h.concat(h.take(slice(0, 1))), 100, 16).status == "miss"  # never extended


def test_disabled_cache_stores_nothing():
    cache = UserKVCache(0)
    h = _hist(4)
    cache.put(1, _kv([4], 4).row(0), h, 1)
    assert not cache.enabled and cache.lookup(1, h, 1, 16).status == "miss"
    assert len(cache.lru) == 0
