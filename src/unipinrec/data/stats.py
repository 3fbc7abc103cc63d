"""Summary statistics of an examples folder (`unipinrec examples stats`), computed by streaming."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from .. import format as fmt
from .sequence_table import iter_split

# Positive actions when none are given: engagement for synthetic, "liked" (4-5 stars) for MovieLens.
DEFAULT_POSITIVES = {"synthetic": ("click", "save", "share"), "movielens": ("rating_4", "rating_5")}


def default_positives(source: str) -> tuple[str, ...]:
    return DEFAULT_POSITIVES["movielens" if source.startswith("movielens") else source]


def _quantiles(counts: np.ndarray) -> dict:
    """Summary of a length histogram (counts[k] = number of rows of length k)."""
    n = int(counts.sum())
    if n == 0:
        return {"mean": 0.0, "min": 0, "p50": 0, "p90": 0, "max": 0}
    cum = np.cumsum(counts)
    lengths = np.arange(len(counts))
    return {
        "mean": float((lengths * counts).sum() / n),
        "min": int(lengths[counts > 0][0]),
        "p50": int(np.searchsorted(cum, 0.5 * n)),
        "p90": int(np.searchsorted(cum, 0.9 * n)),
        "max": int(lengths[counts > 0][-1]),
    }


def examples_stats(examples_dir: str | Path, positives: tuple[str, ...] | None = None) -> dict:
    """Per split: examples, history length distribution, slate sizes, action mix, positives rate."""
    ex = Path(examples_dir)
    meta = fmt.read_meta(ex)
    actions = list(meta["actions"])
    positives = tuple(positives or default_positives(meta["source"]))
    unknown = [p for p in positives if p not in actions]
    if unknown:
        raise ValueError(f"positive action '{unknown[0]}' is not in the vocabulary {actions}")
    pos_ids = np.array([actions.index(p) for p in positives])
    out: dict = {"meta": meta, "positives": list(positives), "splits": {}}
    for split in fmt.SPLITS:
        hist_len = np.zeros(meta["max_history"] + 1, np.int64)
        slate_len = np.zeros(1, np.int64)
        hist_actions = np.zeros(len(actions), np.int64)
        slate_actions = np.zeros(len(actions), np.int64)
        rows = empty_history = 0
        for batch in iter_split(ex, split, columns=["history", "slate"]):
            h = pc.list_value_length(batch.column("history")).to_numpy()
            s = pc.list_value_length(batch.column("slate")).to_numpy()
            if len(h) and h.max() >= len(hist_len):
                hist_len = np.pad(hist_len, (0, int(h.max()) + 1 - len(hist_len)))
            if len(s) and s.max() >= len(slate_len):
                slate_len = np.pad(slate_len, (0, int(s.max()) + 1 - len(slate_len)))
            hist_len += np.bincount(h, minlength=len(hist_len))
            slate_len += np.bincount(s, minlength=len(slate_len))
            ha = pc.struct_field(pc.list_flatten(batch.column("history")), "action").to_numpy()
            sa = pc.struct_field(pc.list_flatten(batch.column("slate")), "action").to_numpy()
            hist_actions += np.bincount(ha, minlength=len(actions))[: len(actions)]
            slate_actions += np.bincount(sa, minlength=len(actions))[: len(actions)]
            rows += batch.num_rows
            empty_history += int((h == 0).sum())
        n_slate = int(slate_actions.sum())
        out["splits"][split] = {
            "examples": rows,
            "history_length": _quantiles(hist_len),
            "history_at_max": int(hist_len[meta["max_history"]:].sum()),
            "empty_history": empty_history,
            "slate_size": _quantiles(slate_len),
            "history_actions": dict(zip(actions, hist_actions.tolist())),
            "slate_actions": dict(zip(actions, slate_actions.tolist())),
            "slate_items": n_slate,
            "positive_rate": float(slate_actions[pos_ids].sum() / n_slate) if n_slate else 0.0,
        }
    return out


def format_stats(stats: dict) -> str:
    """A readable plain-text table."""
    meta, splits = stats["meta"], stats["splits"]
    names = list(fmt.SPLITS)
    lines = [
        f"examples: {meta.get('source')}  L={meta.get('max_history')}  S={meta.get('slate_size')}  "
        f"impressions={meta.get('has_impressions')}  items={meta.get('num_items')}  users={meta.get('num_users')}",
        f"positives = {', '.join(stats['positives'])}",
        "",
        f"{'':28}" + "".join(f"{n:>16}" for n in names),
    ]

    def row(label: str, values) -> None:
        lines.append(f"{label:28}" + "".join(f"{v:>16}" for v in values))

    row("examples", [f"{splits[n]['examples']:,}" for n in names])
    for key in ("mean", "min", "p50", "p90", "max"):
        row(f"history length {key}", [f"{splits[n]['history_length'][key]:.1f}" if key == "mean"
                                      else splits[n]['history_length'][key] for n in names])
    row("history at max L", [f"{splits[n]['history_at_max']:,}" for n in names])
    row("empty history", [f"{splits[n]['empty_history']:,}" for n in names])
    for key in ("mean", "min", "max"):
        row(f"slate size {key}", [f"{splits[n]['slate_size'][key]:.2f}" if key == "mean"
                                  else splits[n]['slate_size'][key] for n in names])
    row("slate items", [f"{splits[n]['slate_items']:,}" for n in names])
    row("positive rate (slate)", [f"{splits[n]['positive_rate']:.2%}" for n in names])
    lines.append("")
    lines.append("action mix (share of slate items | of history actions)")
    for a in meta["actions"]:
        vals = []
        for n in names:
            s, h = splits[n], splits[n]
            ts = s["slate_items"] or 1
            th = sum(h["history_actions"].values()) or 1
            vals.append(f"{s['slate_actions'][a] / ts:6.1%} |{h['history_actions'][a] / th:6.1%}")
        row(f"  {a}", vals)
    return "\n".join(lines)
