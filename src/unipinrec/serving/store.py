"""Where a request's history comes from when it does not carry one: an online-store lookup.

`OnlineStore` is the interface (a Protocol) the engine calls; `InMemoryStore` implements it
for tests, benchmarks and local serving. A Feast-backed implementation (the pipeline side)
satisfies the same Protocol: `get_histories(user_ids)` -> one `History` (or None for an
unknown user) per id, in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass
class History:
    """A user's actions, chronological, as int64 arrays of equal length (raw item ids)."""

    item_ids: np.ndarray
    actions: np.ndarray
    ts: np.ndarray
    surfaces: np.ndarray

    def __post_init__(self) -> None:
        self.item_ids, self.actions, self.ts, self.surfaces = (
            np.asarray(a, dtype=np.int64).reshape(-1) for a in (self.item_ids, self.actions, self.ts, self.surfaces))
        n = len(self.item_ids)
        if not (len(self.actions) == len(self.ts) == len(self.surfaces) == n):
            raise ValueError("History arrays must have equal lengths")

    def __len__(self) -> int:
        return len(self.item_ids)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.item_ids, self.actions, self.ts, self.surfaces

    def last(self, n: int) -> "History":
        return History(*(a[len(self) - n:] if n < len(self) else a for a in self.arrays()))

    @classmethod
    def empty(cls) -> "History":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, z)

    @classmethod
    def from_actions(cls, actions: Iterable) -> "History":
        """From dicts {item_id, action, ts[, surface]} or objects with those attributes."""
        actions = list(actions)
        n = len(actions)
        if n == 0:
            return cls.empty()

        def values():  # one flat pass, no per-action tuples (this runs on every request)
            for a in actions:
                if isinstance(a, Mapping):
                    yield a["item_id"]; yield a["action"]; yield a["ts"]; yield a.get("surface", 0)  # noqa: E702
                else:
                    yield a.item_id; yield a.action; yield a.ts; yield getattr(a, "surface", 0)  # noqa: E702

        arr = np.fromiter(values(), dtype=np.int64, count=4 * n).reshape(n, 4)
        return cls(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])


@runtime_checkable
class OnlineStore(Protocol):
    def get_histories(self, user_ids: Sequence[int]) -> list[History | None]:
        """One History per user id (None: unknown user), in the order asked."""
        ...


class InMemoryStore:
    """Histories in a dict; `append` adds new actions (what a feature pipeline would do)."""

    def __init__(self, histories: Mapping[int, History] | None = None, max_actions: int | None = None):
        self._h: dict[int, History] = dict(histories or {})
        self.max_actions = max_actions

    def get_histories(self, user_ids: Sequence[int]) -> list[History | None]:
        return [self._h.get(int(u)) for u in user_ids]

    def put(self, user_id: int, history: History) -> None:
        self._h[int(user_id)] = history if self.max_actions is None else history.last(self.max_actions)

    def append(self, user_id: int, new: History) -> None:
        old = self._h.get(int(user_id), History.empty())
        self.put(user_id, History(*(np.concatenate([a, b]) for a, b in zip(old.arrays(), new.arrays()))))

    def __len__(self) -> int:
        return len(self._h)

    @classmethod
    def from_examples(cls, examples_dir: str | Path, split: str = "test", max_actions: int | None = None) -> "InMemoryStore":
        """Each user's history at their latest request in `EX/<split>` (the unified format)."""
        from ..format import read_sharded

        table = read_sharded(Path(examples_dir) / split, columns=["user_id", "request_ts", "history"])
        latest: dict[int, tuple[int, list]] = {}
        for uid, rts, hist in zip(table.column("user_id").to_pylist(), table.column("request_ts").to_pylist(),
                                  table.column("history").to_pylist()):
            if uid not in latest or rts >= latest[uid][0]:
                latest[uid] = (rts, hist)
        return cls({u: History.from_actions(h) for u, (_, h) in latest.items()}, max_actions)
