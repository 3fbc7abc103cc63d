"""The promotion gate: may a candidate model replace the deployed one?

Pure decisions over two evaluation dicts scored on the SAME evaluation set (the pipeline's gate
step re-scores the deployed model on the candidate's examples, `steps.gate`): promote only when
no guarded metric is worse by more than `tolerance` (absolute). Deploying is elsewhere
(`release`, `deploy`); the decision is logged in the deployment record (`deployment_record`).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field

DEFAULT_GATE_METRICS = ("retrieval.HR@10", "ranking.*.auc")


def parse_metrics(text: str) -> tuple[str, ...]:
    """Comma-separated metric patterns (the pipeline parameter); empty = the defaults."""
    return tuple(m.strip() for m in text.split(",") if m.strip()) or DEFAULT_GATE_METRICS


def metric_values(metrics: dict, pattern: str) -> dict[str, float | None]:
    """Values of a dotted metric path in a nested metrics dict; `*` matches one level.

    metric_values(m, "ranking.*.auc") -> {"ranking.engaged.auc": 0.71, "ranking.saved.auc": ...}
    """
    found: dict[str, float | None] = {}

    def walk(node, parts: list[str], path: list[str]) -> None:
        if not parts:
            if node is None or isinstance(node, (int, float)) and not isinstance(node, bool):
                found[".".join(path)] = None if node is None or not math.isfinite(node) else float(node)
            return
        if not isinstance(node, dict):
            return
        for key in sorted(node):
            if fnmatch.fnmatchcase(str(key), parts[0]):
                walk(node[key], parts[1:], path + [str(key)])

    walk(metrics, pattern.split("."), [])
    return found


@dataclass
class GateDecision:
    promote: bool
    reason: str
    candidate_version: str | None
    deployed_version: str | None
    tolerance: float
    comparisons: list[dict] = field(default_factory=list)  # metric, candidate, deployed, delta, ok

    def to_dict(self) -> dict:
        return asdict(self)

    def render_text(self) -> str:
        lines = [f"gate: {'PROMOTE' if self.promote else 'KEEP'} ({self.reason})"]
        for c in self.comparisons:
            dep = "-" if c["deployed"] is None else f"{c['deployed']:.4f}"
            cand = "-" if c["candidate"] is None else f"{c['candidate']:.4f}"
            lines.append(f"  {c['metric']:<28} candidate {cand}  deployed {dep}  {c['status']}")
        return "\n".join(lines)


def gate(candidate: dict, deployed: dict | None, *, metrics: tuple[str, ...] | list[str] = DEFAULT_GATE_METRICS,
         tolerance: float = 0.01) -> GateDecision:
    """Decide whether `candidate` (an evaluation dict) may replace `deployed` (same eval set).

    Promote when there is no deployed model, or when every guarded metric the two share
    satisfies candidate >= deployed - tolerance. A guarded metric the candidate lacks blocks.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    cand_v = candidate.get("model_version")
    if deployed is None:
        return GateDecision(True, "no deployed model", cand_v, None, tolerance)
    dep_v = deployed.get("model_version")
    if cand_v is not None and cand_v == dep_v:
        return GateDecision(False, f"model {cand_v} is already deployed", cand_v, dep_v, tolerance)
    comparisons, worse, missing = [], [], []
    for pattern in metrics:
        cand_vals = metric_values(candidate, pattern)
        dep_vals = metric_values(deployed, pattern)
        if not cand_vals:
            missing.append(pattern)
        for name in sorted(set(cand_vals) | set(dep_vals)):
            c, d = cand_vals.get(name), dep_vals.get(name)
            if name not in cand_vals:
                status = "MISSING in candidate"
                worse.append(name)
            elif c is None or d is None:
                status = "not compared (undefined or absent on one side)"
            elif c >= d - tolerance:
                status = "ok" if c >= d else f"ok (within tolerance {tolerance:g})"
            else:
                status = f"WORSE by {d - c:.4f} (> {tolerance:g})"
                worse.append(name)
            comparisons.append({"metric": name, "candidate": c, "deployed": d,
                                "delta": None if c is None or d is None else c - d,
                                "ok": not status.startswith(("WORSE", "MISSING")), "status": status})
    if missing:
        return GateDecision(False, f"candidate has no value for {', '.join(missing)}", cand_v, dep_v, tolerance,
                            comparisons)
    if not any(c["delta"] is not None for c in comparisons):
        return GateDecision(False, "no guarded metric could be compared", cand_v, dep_v, tolerance, comparisons)
    if worse:
        return GateDecision(False, f"worse than the deployed model on {', '.join(worse)}", cand_v, dep_v,
                            tolerance, comparisons)
    return GateDecision(True, f"not worse than {dep_v} within {tolerance:g}", cand_v, dep_v, tolerance, comparisons)
