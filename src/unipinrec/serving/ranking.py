"""Ranking, the last stage: every candidate as a MASK-action token attending to the cached
history keys/values (`UniPinRec.rank`), task probabilities, and the utility that orders them
(a weighted sum of task probabilities; weights are configuration)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .graphs import to_device, to_host
from .timing import StageTimer


class Ranker:
    def __init__(self, vocab, task_names: list[str], weights: dict[str, float], device: torch.device, graphs=None):
        self.vocab = vocab
        self.task_names = list(task_names)
        for t, w in weights.items():  # a loaded model's were checked with its config (TaskConfig); a caller's not
            if not np.isfinite(float(w)):
                raise ValueError(f"score_weights.{t}: must be a finite number, got {w}")
        self.weights = torch.tensor([float(weights.get(t, 0.0)) for t in self.task_names], device=device)
        self.device = device
        self.graphs = graphs  # serving.graphs.Graphs on CUDA, else None (eager)
        self.ms_per_candidate: float | None = None  # running estimate (observe), for the deadline check

    def estimate_ms(self, num_candidates: int) -> float:
        return 0.0 if self.ms_per_candidate is None else self.ms_per_candidate * num_candidates

    def rank(self, loaded, kv, cand_ids: Sequence[np.ndarray], request_ts: Sequence[int], timer: StageTimer,
             rows: torch.Tensor | None = None):
        """Task probabilities (C_i, T) and utilities (C_i,) per row, one batched `rank` call.
        rows: the candidates' embedding rows (B, >= C) already on the device (from a device
        index), else they are looked up here."""
        B = len(cand_ids)
        C = max([1] + [len(c) for c in cand_ids])
        model = loaded.model
        with timer.stage("rank"):
            rows = self._rows(cand_ids, C) if rows is None else rows[:, :C]
            rts = to_device(list(request_ts), self.device)
            both = self.graphs.of(model).rank(rows, kv, rts, self.weights) if self.graphs is not None else None
            if both is None:
                gaps = model.default_candidate_gaps(kv.lengths, kv.last_ts(), rts)
                probs = torch.sigmoid(model.rank(rows, kv, gaps).float())  # (B, C, T)
                both = torch.cat([probs, (probs @ self.weights)[..., None]], dim=-1)
            both = to_host(both)  # one copy back
            probs, utility = both[..., :-1], both[..., -1]
        return [(probs[i, :len(c)], utility[i, :len(c)]) for i, c in enumerate(cand_ids)]

    def _rows(self, cand_ids: Sequence[np.ndarray], C: int) -> torch.Tensor:
        rows = np.zeros((len(cand_ids), C), dtype=np.int64)
        for i, c in enumerate(cand_ids):
            if len(c):
                rows[i, :len(c)] = self.vocab.lookup(c)
        return to_device(rows, self.device)

    def observe(self, ms: float, candidates: int) -> None:
        """Record how long a ranking call of `candidates` (batch x candidates) took."""
        per = ms / max(1, candidates)
        self.ms_per_candidate = per if self.ms_per_candidate is None else 0.8 * self.ms_per_candidate + 0.2 * per

    def items(self, k: int, ids, ret_scores, probs, utility) -> list[dict]:
        """One request's top k by utility (ties in retrieval order); a NaN utility (a broken
        model) is left out, as the fused graph leaves it out."""
        keep = np.flatnonzero(~np.isnan(utility))
        top = keep[np.argsort(-utility[keep], kind="stable")][:k]
        return self.items_ranked(ids[top][None], ret_scores[top][None], probs[top][None], utility[top][None],
                                 [len(top)])[0]

    def items_ranked(self, ids, ret_scores, probs, utility, counts) -> list[list[dict]]:
        """Rows already in the response's order (the fused graph orders them on the device) -> each
        row's first counts[b] items; one `tolist` per array for the batch (per-element float()
        was most of this stage)."""
        i_, u_, r_, p_ = ids.tolist(), utility.tolist(), ret_scores.tolist(), probs.tolist()
        names = self.task_names
        return [[{"item_id": i, "score": u, "retrieval_score": r, "tasks": dict(zip(names, p))}
                 for i, u, r, p in zip(i_[b][:n], u_[b][:n], r_[b][:n], p_[b][:n])]
                for b, n in enumerate(np.asarray(counts).tolist())]

    @staticmethod
    def retrieval_order(k: int, ids, ret_scores) -> list[dict]:
        """The answer when ranking is skipped: the first k in retrieval order."""
        return [{"item_id": int(i), "score": float(s), "retrieval_score": float(s), "tasks": {}}
                for i, s in zip(ids[:k], ret_scores[:k])]
