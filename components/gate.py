from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def gate(
    evaluation: Input[Artifact],
    examples: Input[Dataset],
    decision: Output[Metrics],
    report: Output[HTML],
    deploy_dir: str,
    metrics: str = "retrieval.HR@10,ranking.*.auc",
    tolerance: float = 0.01,
    force: bool = False,
) -> bool:
    """Promotes the candidate only if it is not worse than the deployed model on the same examples.

    The deployed model (recorded in deploy_dir/current.json) is evaluated here on the
    candidate's examples, so both are scored on exactly the same evaluation set.

    Args:
        evaluation: The candidate's evaluation artifact (evaluation.json) from evaluate.
        examples: The examples the candidate was evaluated on.
        decision: Output metrics: promote (0/1) and the guarded metrics of both models.
        report: Output HTML table of the comparison.
        deploy_dir: The deployment record folder (local path or a mounted volume); empty = none deployed.
        metrics: Comma-separated dotted metric paths to guard (`*` matches one level).
        tolerance: Largest allowed drop per metric (absolute).
        force: Promote even when the gate says keep.

    Returns:
        Whether to build, package and deploy the candidate (the reason is in the report and
        in deploy_dir/history.jsonl). A single output: kfp's local runner resolves a nested
        condition on a task's `Output`, not on a named output.
    """
    import json
    import os

    from unipinrec import steps
    from unipinrec.reports import gate_html

    with open(os.path.join(evaluation.path, "evaluation.json")) as f:
        candidate = json.load(f)
    out = steps.gate(candidate, examples.path, deploy_dir, metrics=metrics, tolerance=tolerance, force=force)
    d = out["decision"]
    with open(report.path, "w") as f:
        f.write(gate_html(d))
    decision.log_metric("promote", int(d["promote"]))
    for c in d["comparisons"]:
        for side in ("candidate", "deployed"):
            if c[side] is not None:
                decision.log_metric(f"{side}_{c['metric']}", c[side])
    report.metadata["reason"] = d["reason"]
    steps.save_metrics(decision)
    print(out["text"])
    return bool(d["promote"])
