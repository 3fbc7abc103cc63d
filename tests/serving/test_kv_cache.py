"""Byte-bounded LRU, handle expiry, and the cross-request KV cache's hit / extend / miss rules."""
from __future__ import annotations

import numpy as np
import torch

from unipinrec.sequences import Actions, History
from unipinrec.serving.kv_cache import ENTRY_OVERHEAD_BYTES, ByteLRU, UserKVCache


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


def test_the_ttl_queue_stays_within_the_entry_bound():
    """Keys evicted (or stored again) long before their TTL leave no trace in the sweep's queue
    beyond a constant factor of the live entries: a million abandoned split-flow handles held
    a million queue entries (178 MiB) in a store of 100."""
    clock = Clock()
    lru = ByteLRU(10**9, ttl_s=120, clock=clock, max_entries=100, entry_overhead=0)
    for i in range(20_000):
        lru.put(i if i % 2 else "again", i, 1)
    assert len(lru) == 100 and len(lru._born) <= 2 * 100 + 64
    clock.t = 121.0
    lru.put("fresh", 0, 1)  # the queue still sweeps what is left of them
    assert len(lru) == 1 and lru.get(19_999) == (None, "expired")


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


def test_user_cache_compares_every_action_of_every_field_and_keeps_its_own_copy():
    cache = UserKVCache(10**6)
    h = _hist(8)
    kept = History(**{n: a.copy() for n, a in h.arrays.items()})
    kv = _kv([8], 8).row(0)
    cache.put(3, kv, h, 1)
    assert cache.lru.bytes == kv.nbytes + h.nbytes + ENTRY_OVERHEAD_BYTES  # the actions it keeps are counted
    for name in h.arrays:  # one action of one field differs, first or last: a miss, also as a longer history's prefix
        for j in (0, 7):
            arr = h.arrays[name].copy()
            arr[j] += 1
            other = History(**{**h.arrays, name: arr})
            assert cache.lookup(3, other, 1, 16).status == "miss"
            assert cache.lookup(3, other.concat(h.take(slice(0, 2))), 1, 16).status == "miss"
    h.arrays["items"][:] += 1  # the caller's arrays change after the put: the entry compares with its own copy
    assert cache.lookup(3, kept, 1, 16).status == "hit"
    assert cache.lookup(3, h, 1, 16).status == "miss"


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


def test_cached_rows_go_into_the_graph_buffers_one_copy_each_with_the_same_result():
    """A GPU batch of hits copies each stored row (every layer's keys and values, one buffer)
    into the graph's one padded buffer in one copy; the per-layer path gives the same bytes."""
    from unipinrec.model import KVCache
    from unipinrec.serving.fused import FusedGraphs
    from unipinrec.serving.graphs import _dummy_actions

    kv = _kv([3, 8, 5], width=8)
    rows = [kv.row(i) for i in range(3)]
    assert all(r.stacked() is not None for r in rows)
    loose = [KVCache(keys=[k.clone() for k in r.keys], values=[v.clone() for v in r.values], history=r.history,
                     user_vectors=r.user_vectors) for r in rows]  # separate tensors: no buffer
    assert loose[0].stacked() is None
    out = {}
    for name, cached in (("stacked", rows), ("loose", loose)):
        st = FusedGraphs._static_kv(_dummy_actions(4, 8, "cpu"), cached[0])
        assert (st.stacked() is not None) == (name == "stacked")
        FusedGraphs._copy_cached(st, cached)
        out[name] = st
        for i, n in enumerate([3, 8, 5]):
            for got, want in zip(st.keys + st.values, kv.keys + kv.values):
                assert torch.equal(got[i, :, :n], want[i, :, :n])
        assert torch.equal(st.user_vectors[:3], kv.user_vectors)
    for a, b in zip(out["stacked"].keys + out["stacked"].values, out["loose"].keys + out["loose"].values):
        assert torch.equal(a, b)
