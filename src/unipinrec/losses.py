"""Training losses (arXiv 2606.00422): loss = retrieval + alpha * ranking, from the model's outputs.

`UniPinRecLoss.from_config(train_config)` is the one loss component the trainer calls:

    outputs = model(batch, mam_rate=train_config.mam_rate)  # ForwardOutput with the MAM mask
    loss, stats = loss_fn(model, outputs, batch)

Retrieval: the next positive item at each history position, a sampled softmax (shared in-batch and
uniform negatives, logQ-corrected) or the exact softmax over the catalog, over L2-normalised
user and item vectors. Ranking: BCE per task over the tokens in `outputs.rank_mask` (MAM-masked
history tokens) and the real slate tokens. A model without one of the heads skips its loss.
Imports torch only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .model import _last_row

if TYPE_CHECKING:
    from .batches import TrainBatch
    from .config import TrainConfig
    from .model import ForwardOutput, UniPinRec


def retrieval_loss(model: "UniPinRec", hidden, targets, *, num_uniform: int, num_inbatch: int,
                   logq: bool) -> torch.Tensor:
    """Sampled softmax over L2-normalised vectors: next positive item at each position vs
    shared in-batch and uniform negatives, logQ-corrected (expected sample counts).

    hidden (B, W, D); targets (B, W) item rows, 0 = no target at that position."""
    sel = targets > 0
    y = targets[sel]  # (P,)
    if y.numel() == 0:
        return hidden.sum() * 0.0
    N = model.config.num_items
    u = F.normalize(model.retrieval_proj(hidden[sel]).float(), dim=-1)  # (P, D)
    P = y.shape[0]
    negs = []
    if num_inbatch > 0:
        negs.append(y[torch.randint(0, P, (num_inbatch,), device=y.device)])
    if num_uniform > 0:
        negs.append(torch.randint(1, N + 1, (num_uniform,), device=y.device))
    neg = torch.cat(negs) if negs else y[:0]  # (K,)
    pos_v = F.normalize(model._item_embed(y).float(), dim=-1)  # (P, D)
    neg_v = F.normalize(model._item_embed(neg).float(), dim=-1)  # (K, D)
    tau = model.config.temperature
    pos_logit = (u * pos_v).sum(-1, keepdim=True) / tau  # (P, 1)
    neg_logit = (u @ neg_v.T) / tau  # (P, K)
    if logq:
        counts = torch.bincount(y, minlength=N + 1).float()
        expected = num_inbatch * counts / P + num_uniform / N  # expected times an item is sampled
        pos_logit = pos_logit - torch.log(expected[y])[:, None]
        neg_logit = neg_logit - torch.log(expected[neg])[None, :]
    neg_logit = neg_logit.masked_fill(neg[None, :] == y[:, None], float("-inf"))  # accidental hits
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros(P, dtype=torch.long, device=y.device))


def full_softmax_loss(model: "UniPinRec", hidden, targets) -> torch.Tensor:
    """Exact softmax over the whole catalog (every item vector, padding row excluded): no
    sampling, so no logQ correction. Cheap for small catalogs (MovieLens: 3,416 items).

    hidden (B, W, D); targets (B, W) item rows, 0 = no target at that position."""
    sel = targets > 0
    y = targets[sel]  # (P,)
    if y.numel() == 0:
        return hidden.sum() * 0.0
    u = F.normalize(model.retrieval_proj(hidden[sel]).float(), dim=-1)  # (P, D)
    items = F.normalize(model._item_table()[1:].float(), dim=-1)  # (N, D): row r -> class r - 1
    logits = (u @ items.T) / model.config.temperature  # (P, N)
    return F.cross_entropy(logits, y - 1)


def ranking_loss(model: "UniPinRec", out: "ForwardOutput", batch: "TrainBatch") -> torch.Tensor:
    """BCE per task over the history tokens of `out.rank_mask` and the real slate tokens.

    With rank_similarity each token's logits also get its user-item match: a history token's
    user vector is the output just before it, a slate token's the output at the last history token."""
    hist = batch.history
    hs, ls, us, its = [], [], [], []
    u_all = model._position_user_vectors(out.retrieval_hidden) if model.config.rank_similarity else None  # (B, W, D)
    if out.rank_mask is not None:
        m = out.rank_mask
        hs.append(out.ranking_hidden[m])
        ls.append(batch.history_labels[m])
        if u_all is not None:
            us.append(torch.cat([torch.zeros_like(u_all[:, :1]), u_all[:, :-1]], dim=1)[m])
            its.append(hist.items[m])
    if out.slate_hidden is not None:
        sv = batch.slate_valid
        hs.append(out.slate_hidden[sv])
        ls.append(batch.slate_labels[sv])
        if u_all is not None:
            u_last = _last_row(u_all, hist.lengths)  # (B, D)
            us.append(u_last[:, None].expand(-1, batch.slate_items.shape[1], -1)[sv])
            its.append(batch.slate_items[sv])
    h = torch.cat(hs) if hs else out.ranking_hidden.new_zeros(0, model.config.d_model)
    logits = model._rank_logits(h, torch.cat(us), torch.cat(its)) if us else model.rank_head(h)  # (P, T)
    if not len(h):
        return logits.sum() * 0
    return F.binary_cross_entropy_with_logits(logits.float(), torch.cat(ls).float())


@dataclass(kw_only=True)
class UniPinRecLoss:
    """loss = retrieval + alpha * ranking; called as `loss_fn(model, outputs, batch) -> (loss, stats)`,
    stats holding detached scalars: loss, retrieval_loss (with a retrieval head), ranking_loss
    (with a ranking head). The defaults live in TrainConfig: build it with `from_config`."""

    alpha: float
    num_uniform_negatives: int
    num_inbatch_negatives: int
    logq_correction: bool
    full_softmax: bool

    @classmethod
    def from_config(cls, train: "TrainConfig") -> "UniPinRecLoss":
        return cls(alpha=train.alpha, num_uniform_negatives=train.num_uniform_negatives,
                   num_inbatch_negatives=train.num_inbatch_negatives, logq_correction=train.logq_correction,
                   full_softmax=train.full_softmax)

    def retrieval(self, model: "UniPinRec", out: "ForwardOutput", batch: "TrainBatch") -> torch.Tensor:
        # logits in fp32 even under bf16 autocast: at temperature 0.05 a bf16 cosine (about 3
        # significant digits) would blur the logits by ~0.1, the size of the differences that rank items
        with torch.autocast(batch.targets.device.type, enabled=False):
            hidden = out.retrieval_hidden.float()
            if self.full_softmax:
                return full_softmax_loss(model, hidden, batch.targets)
            return retrieval_loss(model, hidden, batch.targets, num_uniform=self.num_uniform_negatives,
                                  num_inbatch=self.num_inbatch_negatives, logq=self.logq_correction)

    def __call__(self, model: "UniPinRec", out: "ForwardOutput", batch: "TrainBatch") -> tuple[torch.Tensor, dict]:
        cfg = model.config
        stats: dict[str, torch.Tensor] = {}
        loss = out.retrieval_hidden.new_zeros(())
        if cfg.has_retrieval_head:
            r = self.retrieval(model, out, batch)
            loss = loss + r
            stats["retrieval_loss"] = r.detach()
        if cfg.has_ranking_head:
            rk = ranking_loss(model, out, batch)
            loss = loss + self.alpha * rk
            stats["ranking_loss"] = rk.detach()
        stats["loss"] = loss.detach()
        return loss, stats
