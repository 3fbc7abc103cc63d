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
    def __init__(self, index: ItemIndex, popularity: Popularity, vocab=None):
        self.index = index
        self.popularity = popularity
        # an index that searches on the device (TorchIndex) hands the ranker candidate rows
        # without a trip through the host: index position -> embedding row, once
        self._pos_to_row = self._row_to_pos = None
        if vocab is not None and hasattr(index, "search_device"):
            rows = vocab.lookup(np.asarray(index.item_ids), unknown=0)
            self._pos_to_row = torch.from_numpy(rows).to(index.vectors.device)
            row_to_pos = np.full(vocab.num_rows, index.num_items, dtype=np.int64)  # num_items: not indexed
            row_to_pos[rows[rows > 0]] = np.flatnonzero(rows > 0)
            self._row_to_pos = torch.from_numpy(row_to_pos).to(index.vectors.device)

    def retrieve(self, preps: Sequence[Resolved], user_vectors: torch.Tensor, timer: StageTimer):
        """Top num_candidates ids and scores per request, seen items excluded when asked; and
        the candidates' embedding rows (B, C) on the device when every row came from a device
        index (None otherwise: the ranker looks them up)."""
        C = max(p.req.num_candidates for p in preps)
        warm = [i for i, p in enumerate(preps) if len(p.rows) > 0]
        ids: list = [None] * len(preps)
        scores: list = [None] * len(preps)
        rows = None
        with timer.stage("retrieve"):
            if warm:
                q = user_vectors[warm] if len(warm) < len(preps) else user_vectors
                if self._pos_to_row is None:
                    excl = [preps[i].seen_items() if preps[i].req.exclude_seen else None for i in warm]
                    s, found, rows = self._search(q, C, excl)
                else:
                    s, found, rows = self._search_device(q, C, [preps[i] for i in warm])
                for j, i in enumerate(warm):
                    n = preps[i].req.num_candidates
                    ok = found[j, :n] >= 0
                    ids[i], scores[i] = found[j, :n][ok], s[j, :n][ok]
            for i, p in enumerate(preps):
                if ids[i] is None:
                    seen = p.seen_items() if p.req.exclude_seen else None
                    ids[i], scores[i] = self.popularity.top(p.req.num_candidates, seen)
        return ids, scores, (rows if len(warm) == len(preps) else None)

    def _search(self, q: torch.Tensor, C: int, excl):
        on_device = hasattr(self.index, "vectors")  # the exact index searches torch tensors
        s, found = self.index.search(q if on_device else q.float().cpu().numpy(), C, exclude=excl)
        return s, found, None

    def _search_device(self, q: torch.Tensor, C: int, preps: Sequence[Resolved]):
        """Device top-K: seen items (the preps' embedding rows, one pinned copy) masked by one
        scatter; scores and ids come back in one copy, candidate rows stay on the device."""
        from .graphs import to_device, to_host

        excl = [p.seen_rows() if p.req.exclude_seen else None for p in preps]
        W = max([1] + [len(e) for e in excl if e is not None])
        seen = np.zeros((len(preps), W), dtype=np.int64)  # row 0 (padding) maps to "none"
        for j, e in enumerate(excl):
            if e is not None:
                seen[j, :len(e)] = e
        positions = self._row_to_pos[to_device(seen, q.device)]
        top, pos = self.index.search_device(q, C, exclude_positions=positions)
        ids = torch.where(torch.isfinite(top), self.index._ids_t[pos], -1)
        both = to_host(torch.stack([top.float().view(torch.int32).long(), ids]))  # (2, Q, C)
        return both[0].astype(np.int32).view(np.float32), both[1], self._pos_to_row[pos]
