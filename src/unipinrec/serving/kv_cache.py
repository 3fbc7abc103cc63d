"""Worker-local caches of encoded histories, bounded in bytes.

- `ByteLRU`: least-recently-used map with a byte budget, an optional time-to-live, and
  tombstones so a lookup can tell "expired/evicted" from "never existed".
- `UserKVCache` (beyond the paper): the KV cache of a user's last encoded history, across
  requests. A request whose history equals the cached one (the same actions) reuses it
  outright; one whose history only *appends* actions to it extends it with
  `UniPinRec.extend_history` (cost ~ new actions x cached length instead of L^2).
- `HandleStore`: KV state kept between a split `retrieve` call and its `rank` call.

Entries hold one batch row of a `KVCache`, trimmed to its real length (no padding bytes).
"""
from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..sequences import History


# What an entry costs beyond its tensors' bytes: the Python objects (dataclasses, lists, torch
# tensor headers and storages, dict slots) and allocator rounding. Measured with
# bench/reliability_bench.py's soak (RSS growth per entry, short histories); counted per entry so
# the byte bound is a memory bound.
ENTRY_OVERHEAD_BYTES = 8192


class ByteLRU:
    """LRU of (value, nbytes) within `max_bytes` and `max_entries`; entries older than `ttl_s`
    are gone (swept on every put and get, not only when pushed out)."""

    def __init__(self, max_bytes: int, ttl_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 tombstones: int = 10_000, max_entries: int | None = None, entry_overhead: int = ENTRY_OVERHEAD_BYTES):
        self.max_bytes = int(max_bytes)
        self.max_entries = max_entries
        self.entry_overhead = int(entry_overhead)
        self.ttl_s = ttl_s
        self.clock = clock
        self._data: OrderedDict[Any, tuple[Any, int, int]] = OrderedDict()  # key -> (value, nbytes, put number)
        self._born: deque[tuple[float, int, Any]] = deque()  # (birth, put number, key) in birth order, for the TTL sweep
        self._puts = itertools.count()
        self._gone: OrderedDict[Any, str] = OrderedDict()  # key -> "expired" | "evicted"
        self._max_gone = tombstones
        self.bytes = 0
        self.evictions = 0
        self.expirations = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def _bury(self, key, why: str) -> None:
        value, nbytes, _ = self._data.pop(key)
        self.bytes -= nbytes
        self._gone[key] = why
        while len(self._gone) > self._max_gone:
            self._gone.popitem(last=False)

    def _sweep(self) -> None:
        if self.ttl_s is None:
            return
        now = self.clock()
        while self._born and now - self._born[0][0] > self.ttl_s:
            _, put, key = self._born.popleft()
            item = self._data.get(key)
            if item is not None and item[2] == put:  # not a key stored again since
                self._bury(key, "expired")
                self.expirations += 1

    def get(self, key) -> tuple[Any, str]:
        """(value, "ok") or (None, "missing" | "expired" | "evicted")."""
        with self._lock:
            self._sweep()
            item = self._data.get(key)
            if item is None:
                return None, self._gone.get(key, "missing")
            self._data.move_to_end(key)
            return item[0], "ok"

    def put(self, key, value, nbytes: int) -> bool:
        """Store; False (and nothing stored) when one entry alone is over the budget."""
        nbytes = int(nbytes) + self.entry_overhead
        with self._lock:
            self._sweep()
            if key in self._data:
                self.bytes -= self._data.pop(key)[1]
            self._gone.pop(key, None)
            if nbytes > self.max_bytes:
                return False
            put = next(self._puts)
            self._data[key] = (value, nbytes, put)
            if self.ttl_s is not None:
                self._born.append((self.clock(), put, key))
                if len(self._born) > 2 * len(self._data) + 64:  # keys evicted or stored again before their TTL
                    self._born = deque(e for e in self._born if (it := self._data.get(e[2])) and it[2] == e[1])
            self.bytes += nbytes
            while self.bytes > self.max_bytes or (self.max_entries is not None and len(self._data) > self.max_entries):
                self._bury(next(iter(self._data)), "evicted")
                self.evictions += 1
            return True

    def pop(self, key) -> None:
        with self._lock:
            if key in self._data:
                self.bytes -= self._data.pop(key)[1]


@dataclass
class CacheStats:
    hits: int = 0
    extends: int = 0
    misses: int = 0

    def as_dict(self) -> dict:
        return {"hits": self.hits, "extends": self.extends, "misses": self.misses}


@dataclass
class _Entry:
    kv: Any  # KVCache, batch of one, trimmed
    actions: tuple  # the encoded history's arrays as the client sent them, as bytes (History.as_bytes)
    length: int
    request_ts: int | None  # what the tokens also depend on (request_dependent), else None
    rows: np.ndarray | None = None  # the history's embedding rows (read-only), for `probe`

    def holds(self, window: History, request_ts: int | None, length: int) -> bool:
        """The window's first `length` actions are exactly the cached ones (and request_ts equal)."""
        return request_ts == self.request_ts and window.starts_with(self.actions, length)


@dataclass
class Lookup:
    status: str  # "hit" | "extend" | "miss"
    kv: Any = None  # cached KVCache (hit / extend)
    num_cached: int = 0  # actions already encoded (extend: the new ones start here)
    rows: np.ndarray | None = None  # a probe's hit: the history's embedding rows, checked when stored


class UserKVCache:
    """A user's last encoded history (KV + user vector), looked up by user_id and checked
    against the history's arrays kept beside it (an exact comparison of their bytes: 8x faster
    than hashing them); extended when only actions were appended.

    `request_dependent`: the model's tokens depend on request_ts (time_gap "request"), so a
    cached KV is reusable only for the same request_ts and never extendable.
    """

    def __init__(self, max_bytes: int, request_dependent: bool = False, max_entries: int | None = None):
        self.lru = ByteLRU(max_bytes, max_entries=max_entries)
        self.request_dependent = request_dependent
        self.stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self.lru.max_bytes > 0

    def lookup(self, user_id: int, window: History, request_ts: int, max_history: int) -> Lookup:
        """window: the history the model would encode (its last max_history actions, item ids as
        the client sent them)."""
        if not self.enabled:
            return Lookup("miss")
        entry, _ = self.lru.get(user_id)
        if entry is None:
            self.stats.misses += 1
            return Lookup("miss")
        extra = request_ts if self.request_dependent else None
        n, m = len(window), entry.length
        if n == m and entry.holds(window, extra, n):
            self.stats.hits += 1
            return Lookup("hit", entry.kv, n)
        if not self.request_dependent and m < n <= max_history and entry.holds(window, None, m):
            self.stats.extends += 1
            return Lookup("extend", entry.kv, m)
        self.stats.misses += 1
        return Lookup("miss")

    def probe(self, user_id: int, history: History, request_ts: int | None) -> Lookup | None:
        """Before the history is checked: a hit when the client's whole history (raw, as sent)
        is byte for byte the cached one, which was checked when it was stored; then the checks
        would pass again (they read these bytes and the engine's vocabulary alone) and the
        request skips them (`HistoryResolver.resolve`). None otherwise: the request is checked
        and looked up as usual (`lookup`). request_ts: the request's, None when not given."""
        if not self.enabled or (self.request_dependent and request_ts is None):
            return None
        entry, _ = self.lru.get(user_id)
        n = len(history)
        if entry is None or entry.rows is None or n != entry.length or n == 0:
            return None
        if not entry.holds(history, request_ts if self.request_dependent else None, n):
            return None
        self.stats.hits += 1
        return Lookup("hit", entry.kv, n, rows=entry.rows)

    def put(self, user_id: int, kv_row, window: History, request_ts: int, rows: np.ndarray | None = None) -> None:
        """window: as `lookup` takes it; rows: its embedding rows (copied), which let `probe` find
        a hit before the history is checked."""
        if not self.enabled:
            return
        extra = request_ts if self.request_dependent else None
        if rows is not None:
            rows = np.array(rows, dtype=np.int64)
            rows.setflags(write=False)  # shared by the requests that hit it
        self.lru.put(user_id, _Entry(kv_row, window.as_bytes(), len(window), extra, rows),
                     kv_row.nbytes + window.nbytes + (0 if rows is None else rows.nbytes))


@dataclass
class HandleState:
    """What a split `rank` call needs from its `retrieve` call."""

    kv: Any  # KVCache row (None when the ranking side re-encodes)
    history: History | None  # the resolved history (for re-encoding and seen-item exclusion)
    request_ts: int
    user_id: int
    candidates: np.ndarray  # retrieved item ids, in retrieval order
    retrieval_scores: np.ndarray
    user_vector: Any
    meta: dict = field(default_factory=dict)


class HandleStore:
    """Handles of split retrieve -> rank calls, local to one worker process."""

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic,
                 max_entries: int | None = None):
        self.lru = ByteLRU(max_bytes, ttl_s=ttl_s, clock=clock, max_entries=max_entries)

    def new(self, state: HandleState) -> str:
        handle = secrets.token_urlsafe(16)
        nbytes = (state.kv.nbytes if state.kv is not None else 0) + 64 * len(state.candidates)
        if state.history is not None:
            nbytes += state.history.nbytes
        self.lru.put(handle, state, nbytes)
        return handle

    def get(self, handle: str) -> tuple[HandleState | None, str]:
        return self.lru.get(handle)
