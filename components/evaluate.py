from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from ._image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    examples: Input[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    roc: Output[ClassificationMetrics],
    evaluation: Output[Artifact],
):
    """Evaluates retrieval (full ranking HR/NDCG/recall@K) and ranking (AUC, grouped AUC per task).

    Args:
        model: Model folder from train.
        examples: Examples folder; the config's eval split (test) is scored.
        metrics: Output scalar metrics, with the popularity and oracle references.
        report: Output HTML page with tables, ROC curves and training curves.
        roc: Output ROC curve of the first ranking task (from the predictions its AUC came from).
        evaluation: Output evaluation.json (every number, read by the gate).
    """
    import os
    import shutil
    import tempfile

    from unipinrec import steps

    with tempfile.TemporaryDirectory() as tmp:
        out = steps.evaluate(model.path, examples.path, tmp)
        shutil.copyfile(out["html"], report.path)
        os.makedirs(evaluation.path, exist_ok=True)
        for name in ("evaluation.json", "roc.json"):
            shutil.copyfile(os.path.join(tmp, name), os.path.join(evaluation.path, name))
    for key, value in steps.flat_metrics(out["evaluation"]).items():
        metrics.log_metric(key, value)
    for task, curve in out["roc"].items():
        if curve["fpr"]:
            roc.log_roc_curve(curve["fpr"], curve["tpr"], curve["threshold"])
            roc.metadata["task"] = task
            break
    steps.save_metrics(metrics, roc)
    evaluation.metadata["model_version"] = out["evaluation"]["model_version"]
