"""Where a request's history comes from when it does not carry one: an online-store lookup.

`OnlineStore` is the interface (a Protocol) the engine calls; `InMemoryStore` implements it
for tests, benchmarks and local serving. A Feast-backed implementation (the pipeline side)
satisfies the same Protocol: `get_histories(user_ids)` -> one `History` (sequences.py; or None
for an unknown user) per id, in order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol, Sequence, runtime_checkable

from ..sequences import History


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
        old = self._h.get(int(user_id))
        self.put(user_id, new if old is None else old.concat(new))

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
