"""Retrieval, the third stage: top candidates by user-item dot product from an item index
(faiss or exact, `index.py`), seen items excluded; users with no history get the most popular
items instead."""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from .resolve import Resolved
from .timing import StageTimer


@runtime_checkable
class ItemIndex(Protocol):
    model_version: str

    def search(self, queries, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) user vectors -> (scores (Q, k), item ids (Q, k), -1 where fewer were found)."""
        ...


class Popularity:
    """The cold-start list: items by descending popularity (counts aligned with the vocab;
    default: catalog order)."""

    def __init__(self, item_ids: np.ndarray, counts: np.ndarray | None = None):
        n = len(item_ids)
        pop = np.asarray(counts, dtype=np.float64) if counts is not None else np.linspace(1.0, 0.5, n)
        if len(pop) != n:
            raise ValueError(f"popularity has {len(pop)} entries for {n} items")
        order = np.argsort(-pop, kind="stable")
        self.item_ids = item_ids[order]
        self.scores = (pop[order] / max(pop.sum(), 1e-12)).astype(np.float32)

    def top(self, n: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        keep = slice(None) if exclude is None or not len(exclude) else ~np.isin(self.item_ids, exclude)
        return self.item_ids[keep][:n], self.scores[keep][:n]


class Retriever:
    def __init__(self, index: ItemIndex, popularity: Popularity):
        self.index = index
        self.popularity = popularity

    def retrieve(self, preps: Sequence[Resolved], user_vectors: torch.Tensor, timer: StageTimer):
        """Top num_candidates ids and scores per request, seen items excluded when asked."""
        C = max(p.req.num_candidates for p in preps)
        warm = [i for i, p in enumerate(preps) if len(p.rows) > 0]
        ids: list = [None] * len(preps)
        scores: list = [None] * len(preps)
        with timer.stage("retrieve"):
            if warm:
                on_device = hasattr(self.index, "vectors")  # the exact index searches torch tensors
                q = user_vectors[warm] if on_device else user_vectors[warm].float().cpu().numpy()
                excl = [preps[i].history.items if preps[i].req.exclude_seen else None for i in warm]
                s, found = self.index.search(q, C, exclude=excl)
                for j, i in enumerate(warm):
                    n = preps[i].req.num_candidates
                    ok = found[j, :n] >= 0
                    ids[i], scores[i] = found[j, :n][ok], s[j, :n][ok]
            for i, p in enumerate(preps):
                if ids[i] is None:
                    seen = p.history.items if p.req.exclude_seen else None
                    ids[i], scores[i] = self.popularity.top(p.req.num_candidates, seen)
        return ids, scores
