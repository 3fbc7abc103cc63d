"""Evaluation: retrieval by full ranking, ranking AUC on slates, oracle and popularity references.

Retrieval (the protocol of ../shared/data/movielens-1m/README.md): every example's user vector
is scored against ALL item vectors (dot product of L2-normalised vectors), the items of the
example's (truncated) history are removed (`exclude_history`), and each positive slate item's
rank is its number of strictly better-scored items + 1. HR@K = share of examples with a positive
in the top K, NDCG@K = DCG/IDCG with binary relevance (1/log2(rank+1) for a single target, as
HSTU), recall@K = share of positives in the top K. MovieLens test slates hold the one next item.
With `exclude_history` off (users re-engage with seen items, as on synthetic data) the positives
that are not in the history are also scored with the history removed (`retrieval_new_items`),
so re-engagement cannot make retrieval look better than it is.

Ranking: the model's `rank` over each slate (candidates attend to the cached history), AUC per
task over all impressions and per-user grouped AUC (impression-weighted mean over users with
both classes). On synthetic data the oracle's probabilities (EX/oracle) are scored on the same
impressions. A popularity baseline (positive actions counted in the train split) is ranked the
same way as the model.

One inference pass: `evaluate_with_predictions` returns the metrics together with the ranking
predictions they were computed from (`RankingPredictions`); the report's ROC curves render those
same arrays, so a curve and the AUC beside it cannot disagree.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from . import format as fmt
from .actions import vocab_for
from .batches import ItemVocab, TaskSpec, TrainBatch, collate_examples
from .model import UniPinRec

MAX_SLATE = 1024


# ---------------------------------------------------------------------------------------------
# Metrics


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None without both classes."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    ranks = avg_rank[inv]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def grouped_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Impression-weighted mean of per-group AUC over groups that have both classes."""
    order = np.argsort(groups, kind="stable")
    g, y, s = groups[order], labels[order], scores[order]
    cuts = np.flatnonzero(np.diff(g)) + 1
    total, weight = 0.0, 0
    for yy, ss in zip(np.split(y, cuts), np.split(s, cuts)):
        a = auc(yy, ss)
        if a is not None:
            total += a * len(yy)
            weight += len(yy)
    return total / weight if weight else None


def retrieval_metrics(scores: torch.Tensor, positives: torch.Tensor, positive_mask: torch.Tensor,
                      ks: list[int]) -> dict[str, torch.Tensor]:
    """scores (B, N+1) with excluded items at -inf; positives (B, P) item rows, mask (B, P).

    Returns per-example HR@K, NDCG@K, recall@K (B,) for examples with at least one positive."""
    target = scores.gather(1, positives)  # (B, P)
    better = torch.zeros_like(positives)
    for start in range(0, scores.shape[1], 8192):  # chunked so B x P x N never materialises at once
        chunk = scores[:, None, start:start + 8192]
        better += (chunk > target[:, :, None]).sum(-1)
    rank = (better + 1).float()  # (B, P)
    rank = torch.where(positive_mask & torch.isfinite(target), rank, torch.full_like(rank, float("inf")))
    n_pos = positive_mask.sum(1).float()
    out = {}
    for k in ks:
        hit = (rank <= k) & positive_mask
        dcg = (hit.float() / torch.log2(rank.clamp(max=1e9) + 1)).sum(1)
        ideal = torch.arange(1, k + 1, device=scores.device, dtype=torch.float)
        idcg_table = torch.cumsum(1.0 / torch.log2(ideal + 1), 0)
        idcg = idcg_table[(n_pos.clamp(min=1, max=k) - 1).long()]
        out[f"HR@{k}"] = hit.any(1).float()
        out[f"NDCG@{k}"] = dcg / idcg
        out[f"recall@{k}"] = hit.sum(1).float() / n_pos.clamp(min=1)
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation of a model in memory


def _popularity(examples_dir: Path, vocab: ItemVocab, spec: TaskSpec) -> torch.Tensor:
    """(N+1,) counts of positive actions per item row in the train split (history and slates)."""
    counts = np.zeros(vocab.num_rows, dtype=np.float64)
    positive = np.flatnonzero(spec.positive)
    for rb in fmt.iter_batches(examples_dir / "train", columns=["history", "slate"]):
        for col in ("history", "slate"):
            flat = pc.list_flatten(rb.column(col))
            keep = pc.is_in(flat.field("action"), pa.array(positive, pa.int8()))
            ids = pc.filter(flat.field("item_id"), keep).to_numpy()
            np.add.at(counts, vocab.lookup(ids, unknown=0), 1.0)
    counts[0] = 0
    return torch.from_numpy(counts + 1e-6 * np.arange(len(counts))[::-1].copy() / len(counts))  # stable tie order


@dataclass(frozen=True)
class RankingPredictions:
    """Every valid slate impression of a split as the model ranked it (at the position it was
    shown): the one set of arrays behind the AUC table, the ROC curves and the oracle comparison."""
    tasks: tuple[str, ...]
    user: np.ndarray  # (n,) user ids
    request_ts: np.ndarray  # (n,)
    item: np.ndarray  # (n,) item ids
    labels: np.ndarray  # (n, T) 0/1 per task
    probs: np.ndarray  # (n, T) predicted probabilities


@dataclass(frozen=True)
class Evaluation:
    """The metrics dict and the ranking predictions they were computed from (None when the
    model cannot rank or the split has no slates)."""
    metrics: dict
    predictions: RankingPredictions | None


def ranking_metrics(predictions: RankingPredictions) -> dict[str, dict]:
    """AUC, grouped AUC (by user), impressions and positive rate per task."""
    out = {}
    for j, task in enumerate(predictions.tasks):
        y, p = predictions.labels[:, j], predictions.probs[:, j]
        out[task] = {"auc": auc(y, p), "gauc": grouped_auc(predictions.user, y, p),
                     "num_impressions": int(len(y)), "positive_rate": float(y.mean())}
    return out


def _score_retrieval(b: TrainBatch, spec: TaskSpec, model_scores: torch.Tensor, pop: torch.Tensor | None,
                     exclude_history: bool, ks: list[int], sinks: dict[str, dict]) -> None:
    """Adds one batch's per-example retrieval metrics (model and popularity) to `sinks`."""
    device = model_scores.device
    pos_mask = torch.from_numpy(spec.positive).to(device)[b.slate_actions.clamp(0, len(spec.positive) - 1)]
    pos_mask = pos_mask & b.slate_valid
    hist = b.history.items.masked_fill(
        torch.arange(b.history.items.shape[1], device=device)[None] >= b.history.lengths[:, None], 0)
    # positives the user had not acted on before: with history kept rankable, these are
    # scored a second time with the history removed (new-item retrieval, as on MovieLens)
    in_hist = (b.slate_items[:, :, None] == hist[:, None, :]).any(-1)
    passes = [(exclude_history, pos_mask, "")]
    if not exclude_history:
        passes.append((True, pos_mask & ~in_hist, "_new_items"))
    for excl, mask, suffix in passes:
        has = mask.any(1)
        if not has.any():
            continue
        for name, base in (("retrieval", model_scores), ("popularity", pop)):
            if base is None:
                continue
            scores = (base.expand(len(model_scores), -1) if base.dim() == 1 else base).float().clone()
            scores[:, 0] = float("-inf")
            if excl:
                scores.scatter_(1, hist, float("-inf"))
            for k, v in retrieval_metrics(scores[has], b.slate_items[has], mask[has], ks).items():
                sinks[name + suffix].setdefault(k, []).append(v.cpu())


def _rank_slates(model: UniPinRec, b: TrainBatch, cache, rb: pa.RecordBatch, vocab: ItemVocab) -> dict[str, np.ndarray]:
    """One batch's valid impressions with their predicted probabilities, as RankingPredictions fields."""
    # logged slates: each impression at the position it was shown (position-aware models)
    probs = torch.sigmoid(model.rank(b.slate_items, cache, slate_positions=b.slate_positions).float())
    valid = b.slate_valid
    rows = valid.nonzero()[:, 0].cpu().numpy()
    return {"user": rb.column("user_id").to_numpy()[rows], "request_ts": rb.column("request_ts").to_numpy()[rows],
            "item": vocab.ids(b.slate_items[valid].cpu().numpy()), "labels": b.slate_labels[valid].cpu().numpy(),
            "probs": probs[valid].cpu().numpy()}


def _summarise(sink: dict[str, list]) -> dict:
    return {k: float(torch.cat(v).mean()) for k, v in sink.items()} | (
        {"num_examples": int(sum(len(x) for x in sink[next(iter(sink))]))} if sink else {})


@torch.no_grad()
def evaluate_model_with_predictions(
        model: UniPinRec, vocab: ItemVocab, spec: TaskSpec, examples_dir: str | Path, *, split: str = "test",
        ks: list[int] | tuple[int, ...] = (10, 50, 200), batch_size: int = 256, device: str | torch.device = "cpu",
        progress: bool = True, exclude_history: bool = True, max_examples: int = 0, popularity: bool = False,
        extra_ks: tuple[int, ...] = (100,)) -> Evaluation:
    """One inference pass over EX/<split>: retrieval metrics, and the ranking predictions of every
    slate impression with the ranking (and oracle) metrics computed from them."""
    from tqdm.auto import tqdm

    examples_dir = Path(examples_dir)
    table = fmt.read_sharded(examples_dir / split)
    if max_examples:
        table = table.slice(0, max_examples)
    if table.num_rows == 0:
        raise ValueError(f"{examples_dir}/{split}: no examples")
    was_training = model.training
    model.eval()
    device = torch.device(device)
    ks_all = sorted(set(int(k) for k in ks) | set(extra_ks))
    items = model.item_vectors().to(device)  # (N+1, D)
    pop = _popularity(examples_dir, vocab, spec).to(device) if popularity else None
    can_rank = model.config.has_ranking_head
    sinks: dict[str, dict] = {k: {} for k in ("retrieval", "popularity", "retrieval_new_items", "popularity_new_items")}
    ranked: list[dict[str, np.ndarray]] = []
    for start in tqdm(range(0, table.num_rows, batch_size), disable=not progress, desc=f"evaluate {split}", unit="batch"):
        rb = table.slice(start, batch_size)
        b = collate_examples(rb, vocab, spec, model.config.max_history, MAX_SLATE).to(device)
        user, cache = model.encode_history(b.history)
        _score_retrieval(b, spec, user @ items.T, pop, exclude_history, ks_all, sinks)
        if can_rank and b.slate_items.shape[1] > 0:
            ranked.append(_rank_slates(model, b, cache, rb, vocab))
    if was_training:
        model.train()

    out = {"split": split, "num_examples": table.num_rows, "exclude_history": exclude_history,
           "num_items": len(vocab), "retrieval": _summarise(sinks["retrieval"])}
    if popularity:
        out["popularity"] = _summarise(sinks["popularity"])
    if not exclude_history:
        out["retrieval_new_items"] = _summarise(sinks["retrieval_new_items"])
        if popularity:
            out["popularity_new_items"] = _summarise(sinks["popularity_new_items"])
    predictions = None
    if ranked:
        predictions = RankingPredictions(tasks=tuple(spec.names), **{
            k: np.concatenate([r[k] for r in ranked]) for k in ranked[0]})
        out["ranking"] = ranking_metrics(predictions)
        oracle_dir = examples_dir / "oracle"
        if oracle_dir.exists():
            out["oracle"] = _oracle_metrics(oracle_dir, predictions)
    return Evaluation(metrics=out, predictions=predictions)


def evaluate_model(model: UniPinRec, vocab: ItemVocab, spec: TaskSpec, examples_dir: str | Path,
                   **options) -> dict:
    """The metrics of `evaluate_model_with_predictions` (same options), e.g. for validation during training."""
    return evaluate_model_with_predictions(model, vocab, spec, examples_dir, **options).metrics


def _oracle_metrics(oracle_dir: Path, predictions: RankingPredictions) -> dict:
    """AUC of the generator's true probabilities on the same impressions (synthetic data)."""
    import pandas as pd

    p = predictions
    oracle = fmt.read_sharded(oracle_dir).to_pandas()
    imp = pd.DataFrame({"user_id": p.user, "request_ts": p.request_ts, "item_id": p.item, "_i": np.arange(len(p.user))})
    cols = [c for c in oracle.columns if c.startswith("p_") or c == "relevance"]
    joined = imp.merge(oracle[["user_id", "request_ts", "item_id", *cols]].drop_duplicates(
        ["user_id", "request_ts", "item_id"]), on=["user_id", "request_ts", "item_id"], how="inner")
    out: dict = {"matched_impressions": int(len(joined)), "impressions": int(len(imp))}
    idx = joined["_i"].to_numpy()
    for j, task in enumerate(p.tasks):
        col = f"p_{task}"
        if col not in joined:
            continue
        y = p.labels[idx, j]
        entry = {"auc": auc(y, joined[col].to_numpy()), "gauc": grouped_auc(p.user[idx], y, joined[col].to_numpy()),
                 "model_auc_same_impressions": auc(y, p.probs[idx, j])}
        if task == "engaged" and "relevance" in joined:
            entry["auc_position_free_relevance"] = auc(y, joined["relevance"].to_numpy())
        out[task] = entry
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation of a model folder, and plots


def evaluate_with_predictions(model_dir: str | Path, examples_dir: str | Path, *, split: str | None = None,
                              device: str = "cpu", progress: bool = True,
                              max_examples: int | None = None) -> Evaluation:
    """Evaluate MODEL/ on EX/<split> with the model's EvalConfig, in one inference pass: the
    metrics dict (with the model's identity) and the ranking predictions behind it."""
    from .checkpoint import load_model

    loaded = load_model(model_dir, device)
    ec = loaded.config.eval
    ex_meta = fmt.read_meta(examples_dir)
    spec = TaskSpec.resolve(loaded.tasks, vocab_for(ex_meta["source"]))
    result = evaluate_model_with_predictions(
        loaded.model, loaded.vocab, spec, examples_dir, split=split or ec.split, ks=ec.ks,
        batch_size=ec.batch_size, device=device, progress=progress, exclude_history=ec.exclude_history,
        max_examples=ec.max_examples if max_examples is None else max_examples, popularity=True)
    summary_path = Path(model_dir) / "train_summary.json"
    metrics = {"model_version": loaded.version, "kind": loaded.kind, "model_dir": str(model_dir),
               "examples": str(examples_dir), "source": ex_meta["source"], **result.metrics,
               "train": json.loads(summary_path.read_text()) if summary_path.exists() else None}
    return Evaluation(metrics=metrics, predictions=result.predictions)


def evaluate(model_dir: str | Path, examples_dir: str | Path, **options) -> dict:
    """The metrics dict of `evaluate_with_predictions` (same options)."""
    return evaluate_with_predictions(model_dir, examples_dir, **options).metrics


def write_metrics(metrics: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    cols = {}
    for k in rows[0]:
        vals = [r.get(k) for r in rows]
        try:
            cols[k] = np.array([float(v) if v not in (None, "") else math.nan for v in vals])
        except ValueError:
            continue
    return cols


def plot_curves(model_dir: str | Path, out_png: str | Path) -> Path:
    """PNG of the training curves (losses, learning rate, throughput, validation metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_dir = Path(model_dir)
    log = _read_csv(model_dir / "train_log.csv")
    ev = _read_csv(model_dir / "eval_log.csv")
    if not log:
        raise FileNotFoundError(f"{model_dir / 'train_log.csv'} not found or empty")
    panels = 3 + bool(ev)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4))
    ax = axes[0]
    for k in ("loss", "retrieval_loss", "ranking_loss"):
        if k in log and not np.all(np.isnan(log[k])):
            ax.plot(log["step"], log[k], label=k)
    ax.set_xlabel("step"), ax.set_title("training loss"), ax.legend(fontsize=8)
    axes[1].plot(log["step"], log["lr"])
    axes[1].set_xlabel("step"), axes[1].set_title("learning rate")
    axes[2].plot(log["step"], log["tokens_per_s"])
    axes[2].set_xlabel("step"), axes[2].set_title("tokens / s")
    if ev:
        for k, v in ev.items():
            if k.startswith(("retrieval_HR@10", "retrieval_NDCG@10", "auc_")):
                axes[3].plot(ev["epoch"], v, marker="o", label=k)
        axes[3].set_xlabel("epoch"), axes[3].set_title("validation"), axes[3].legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
