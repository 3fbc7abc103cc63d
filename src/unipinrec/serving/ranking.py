"""Ranking, the last stage: every candidate as a MASK-action token attending to the cached
history keys/values (`UniPinRec.rank`), task probabilities, and the utility that orders them
(a weighted sum of task probabilities; weights are configuration)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .timing import StageTimer


class Ranker:
    def __init__(self, vocab, task_names: list[str], weights: dict[str, float], device: torch.device):
        self.vocab = vocab
        self.task_names = list(task_names)
        self.weights = torch.tensor([float(weights.get(t, 0.0)) for t in self.task_names], device=device)
        self.device = device
        self.ms_per_candidate: float | None = None  # running estimate (observe), for the deadline check

    def estimate_ms(self, num_candidates: int) -> float:
        return 0.0 if self.ms_per_candidate is None else self.ms_per_candidate * num_candidates

    def rank(self, loaded, kv, cand_ids: Sequence[np.ndarray], request_ts: Sequence[int], timer: StageTimer):
        """Task probabilities (C_i, T) and utilities (C_i,) per row, one batched `rank` call."""
        B = len(cand_ids)
        C = max([1] + [len(c) for c in cand_ids])
        rows = np.zeros((B, C), dtype=np.int64)
        for i, c in enumerate(cand_ids):
            if len(c):
                rows[i, :len(c)] = self.vocab.lookup(c)
        model = loaded.model
        with timer.stage("rank"):
            rts = torch.tensor(list(request_ts), dtype=torch.long, device=self.device)
            gaps = model.default_candidate_gaps(kv.lengths, kv.last_ts(), rts)
            probs = torch.sigmoid(model.rank(torch.from_numpy(rows).to(self.device), kv, gaps).float())  # (B, C, T)
            utility = probs @ self.weights
            probs, utility = probs.cpu().numpy(), utility.cpu().numpy()
        return [(probs[i, :len(c)], utility[i, :len(c)]) for i, c in enumerate(cand_ids)]

    def observe(self, ms: float, candidates: int) -> None:
        """Record how long a ranking call of `candidates` (batch x candidates) took."""
        per = ms / max(1, candidates)
        self.ms_per_candidate = per if self.ms_per_candidate is None else 0.8 * self.ms_per_candidate + 0.2 * per

    def items(self, k: int, ids, ret_scores, probs, utility) -> list[dict]:
        top = np.argsort(-utility, kind="stable")[:k]
        names = self.task_names
        return [{"item_id": int(ids[j]), "score": float(utility[j]), "retrieval_score": float(ret_scores[j]),
                 "tasks": {names[t]: float(probs[j, t]) for t in range(len(names))}} for j in top]

    @staticmethod
    def retrieval_order(k: int, ids, ret_scores) -> list[dict]:
        """The answer when ranking is skipped: the first k in retrieval order."""
        return [{"item_id": int(i), "score": float(s), "retrieval_score": float(s), "tasks": {}}
                for i, s in zip(ids[:k], ret_scores[:k])]
