"""HTML reports of the pipeline (standalone pages: inline CSS, plots as inline PNG, no scripts),
shown by Kubeflow as `Output[HTML]` artifacts and opened from disk after a local run.

- `validation_html(reports)`: the raw-data contracts (events, items) on one page.
- `evaluation_html(evaluation, ...)`: retrieval and ranking metrics against the popularity and
  oracle references, ROC curves per task, training curves.
- `roc_curves(predictions)` / `roc_curve`: ROC points of the predictions `evaluate` returned (the
  ones its AUC table was computed from), plotted on the page and logged as a Kubeflow
  ClassificationMetrics ROC. Reports render; they never run the model.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .evaluate import RankingPredictions

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #1a7f37; } .fail { color: #cf222e; } .muted { color: #666; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
"""


def _page(title: str, body: str, extra_style: str = "") -> str:
    e = html.escape
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{_STYLE}{extra_style}</style></head><body>\n{body}\n</body></html>\n")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return f"<img src=\"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}\">"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


# ---------------------------------------------------------------------------------------------
# Data validation

def validation_html(reports: list, title: str = "Raw data validation") -> str:
    """One page for several `contracts.ValidationReport`s: a summary, then each full report."""
    e = html.escape
    ok = all(r.success for r in reports)
    rows = "".join(
        f"<tr><td><code>{e(r.contract)}</code></td><td class='{'pass' if r.success else 'fail'}'>"
        f"{'PASSED' if r.success else 'FAILED'}</td><td class='num'>{r.rows_validated:,}</td>"
        f"<td>{e(', '.join(f.rule for f in r.failed)) or '-'}</td></tr>" for r in reports)
    body = [f"<h1>{e(title)}: <span class='{'pass' if ok else 'fail'}'>{'PASSED' if ok else 'FAILED'}</span></h1>",
            "<p class='muted'>" + ("Training runs on this data." if ok else
                                   "The pipeline stopped here: nothing was trained or deployed.") + "</p>",
            "<table><tr><th>contract</th><th>result</th><th>rows</th><th>failed expectations</th></tr>",
            rows, "</table>"]
    style = ""
    for r in reports:
        page = r.render_html()
        m = re.search(r"<body>(.*)</body>", page, re.S)
        s = re.search(r"<style>(.*?)</style>", page, re.S)
        if s and not style:
            style = s.group(1)
        body.append("<hr>" + (m.group(1) if m else e(r.render_text())))
    return _page(title, "\n".join(body), style)


# ---------------------------------------------------------------------------------------------
# Evaluation

def roc_curve(labels: np.ndarray, scores: np.ndarray, max_points: int = 101) -> dict[str, list[float]]:
    """ROC points (fpr, tpr, threshold), thinned to at most `max_points` thresholds."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return {"fpr": [], "tpr": [], "threshold": []}
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    tpr, fpr, thr = np.r_[0.0, tps / pos], np.r_[0.0, fps / neg], np.r_[1.0, s[last]]
    if len(thr) > max_points:
        keep = np.unique(np.r_[np.linspace(0, len(thr) - 1, max_points).round().astype(int)])
        tpr, fpr, thr = tpr[keep], fpr[keep], thr[keep]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "threshold": np.clip(thr, 0.0, 1.0).tolist()}


def roc_curves(predictions: RankingPredictions | None, max_points: int = 101) -> dict[str, dict[str, list[float]]]:
    """ROC points per task of the predictions `evaluate` scored ({} when it ranked nothing)."""
    if predictions is None:
        return {}
    return {t: roc_curve(predictions.labels[:, j], predictions.probs[:, j], max_points)
            for j, t in enumerate(predictions.tasks)}


def _retrieval_rows(evaluation: dict) -> tuple[list[str], dict, dict]:
    model = evaluation.get("retrieval") or {}
    pop = evaluation.get("popularity") or {}
    keys = [k for k in model if "@" in k]
    return keys, model, pop


def evaluation_html(evaluation: dict, *, model_dir: str | Path | None = None, roc: dict | None = None,
                    title: str = "Model evaluation") -> str:
    """The evaluation page: metric tables (model vs popularity vs oracle) and plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = html.escape
    parts = [f"<h1>{e(title)}</h1>",
             f"<p>model <code>{e(str(evaluation.get('model_version')))}</code> ({e(str(evaluation.get('kind')))}) on "
             f"<code>{e(str(evaluation.get('split')))}</code> of <code>{e(str(evaluation.get('examples')))}</code>: "
             f"{evaluation.get('num_examples', 0):,} examples, {evaluation.get('num_items', 0):,} items "
             f"(source {e(str(evaluation.get('source')))}).</p>"]
    parts += _retrieval_section(evaluation, plt)
    parts += _ranking_section(evaluation, roc, plt)
    parts += _training_section(evaluation, model_dir)
    return _page(title, "\n".join(parts))


def _retrieval_section(evaluation: dict, plt) -> list[str]:
    e = html.escape
    keys, model, pop = _retrieval_rows(evaluation)
    if not keys:
        return []
    parts = ["<h2>Retrieval (full ranking over all items)</h2><table><tr><th>metric</th><th>model</th>"
             "<th>popularity</th></tr>" + "".join(
                 f"<tr><td>{e(k)}</td><td class='num'>{_fmt(model.get(k))}</td>"
                 f"<td class='num'>{_fmt(pop.get(k))}</td></tr>" for k in keys) + "</table>"]
    hr = [k for k in keys if k.startswith(("HR@", "NDCG@"))]
    if hr:
        fig, ax = plt.subplots(figsize=(7, 3))
        x = np.arange(len(hr))
        ax.bar(x - 0.2, [model.get(k) or 0 for k in hr], 0.4, label="model")
        ax.bar(x + 0.2, [pop.get(k) or 0 for k in hr], 0.4, label="popularity")
        ax.set_xticks(x, hr, fontsize=8)
        ax.set_title("retrieval"), ax.legend()
        parts.append(_png(fig))
        plt.close(fig)
    return parts


def _ranking_section(evaluation: dict, roc: dict | None, plt) -> list[str]:
    e = html.escape
    parts = []
    ranking = evaluation.get("ranking") or {}
    oracle = evaluation.get("oracle") or {}
    if ranking:
        parts.append("<h2>Ranking (slates)</h2><table><tr><th>task</th><th>AUC</th><th>grouped AUC</th>"
                     "<th>oracle AUC</th><th>impressions</th><th>positive rate</th></tr>" + "".join(
                         f"<tr><td>{e(t)}</td><td class='num'>{_fmt(m.get('auc'))}</td>"
                         f"<td class='num'>{_fmt(m.get('gauc'))}</td>"
                         f"<td class='num'>{_fmt((oracle.get(t) or {}).get('auc'))}</td>"
                         f"<td class='num'>{m.get('num_impressions', 0):,}</td>"
                         f"<td class='num'>{_fmt(m.get('positive_rate'))}</td></tr>" for t, m in ranking.items())
                     + "</table>")
    curves = {t: c for t, c in (roc or {}).items() if c.get("fpr")}
    if curves:
        fig, ax = plt.subplots(figsize=(4.2, 4))
        for t, c in curves.items():
            ax.plot(c["fpr"], c["tpr"], label=t)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("false positive rate"), ax.set_ylabel("true positive rate"), ax.set_title("ROC")
        ax.legend(fontsize=8)
        parts.append(_png(fig))
        plt.close(fig)
    return parts


def _training_section(evaluation: dict, model_dir) -> list[str]:
    e = html.escape
    parts = []
    if model_dir is not None and (Path(model_dir) / "train_log.csv").exists():
        from .evaluate import plot_curves

        png = Path(model_dir) / "curves.png"
        try:
            plot_curves(model_dir, png)
            data = base64.b64encode(png.read_bytes()).decode()
            parts.append(f"<h2>Training</h2><img src=\"data:image/png;base64,{data}\">")
        except (FileNotFoundError, ValueError, KeyError) as err:
            parts.append(f"<p class='muted'>training curves unavailable: {e(str(err))}</p>")
    train = evaluation.get("train") or {}
    if train:
        parts.append("<h2>Training summary</h2><pre>" + e(json.dumps(train, indent=2, default=str)) + "</pre>")
    return parts


def gate_html(decision: dict) -> str:
    e = html.escape
    ok = decision["promote"]
    rows = "".join(
        f"<tr><td>{e(c['metric'])}</td><td class='num'>{_fmt(c['candidate'])}</td><td class='num'>"
        f"{_fmt(c['deployed'])}</td><td class='num'>{_fmt(c['delta'])}</td>"
        f"<td class='{'pass' if c['ok'] else 'fail'}'>{e(c['status'])}</td></tr>" for c in decision["comparisons"])
    body = (f"<h1>Promotion gate: <span class='{'pass' if ok else 'fail'}'>{'PROMOTE' if ok else 'KEEP'}</span></h1>"
            f"<p>{e(decision['reason'])}<br>candidate <code>{e(str(decision['candidate_version']))}</code>, deployed "
            f"<code>{e(str(decision['deployed_version']))}</code>, tolerance {decision['tolerance']:g} (absolute), "
            "both evaluated on the same examples.</p>"
            + ("<table><tr><th>metric</th><th>candidate</th><th>deployed</th><th>delta</th><th></th></tr>"
               + rows + "</table>" if rows else ""))
    return _page("Promotion gate", body)
