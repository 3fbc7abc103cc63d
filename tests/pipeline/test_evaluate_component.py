"""The evaluate component on a tiny position-aware model: the AUC table, the ROC curves beside it
(roc.json, the HTML page) and the Kubeflow ClassificationMetrics come from one inference pass."""
from __future__ import annotations

import json

import numpy as np
import pytest
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Metrics, Model


@pytest.fixture(scope="module")
def positional_model(train_tiny):
    """A tiny model that ranks each impression at the slate position it was shown."""
    return train_tiny(slate_positions=10)  # configs/tiny.yaml's slate_size


def _area(fpr, tpr) -> float:
    return float(np.trapezoid(tpr, fpr))


def test_auc_table_equals_the_area_under_the_reported_roc(positional_model, tmp_path):
    from components import evaluate
    from unipinrec.checkpoint import load_model

    model_dir, ex = positional_model
    assert load_model(model_dir).model.config.slate_positions > 0
    out = {name: tmp_path / name for name in ("metrics", "report.html", "roc", "evaluation")}
    metrics, roc = Metrics(uri=str(out["metrics"])), ClassificationMetrics(uri=str(out["roc"]))
    evaluate.python_func(model=Model(uri=str(model_dir)), examples=Dataset(uri=str(ex)), metrics=metrics,
                         report=HTML(uri=str(out["report.html"])), roc=roc,
                         evaluation=Artifact(uri=str(out["evaluation"])))
    table = json.loads((out["evaluation"] / "evaluation.json").read_text())["ranking"]
    curves = json.loads((out["evaluation"] / "roc.json").read_text())
    assert set(table) == set(curves) == {"engaged", "saved", "hidden"}
    for task, row in table.items():
        assert row["auc"] is not None and row["num_impressions"] > 0
        assert _area(curves[task]["fpr"], curves[task]["tpr"]) == pytest.approx(row["auc"], abs=0.005), task
        assert metrics.metadata[f"auc_{task}"] == row["auc"]
    # the Kubeflow ROC (one curve: its task in the metadata) is the same curve
    points = roc.metadata["confidenceMetrics"]
    area = _area([p["falsePositiveRate"] for p in points], [p["recall"] for p in points])
    assert area == pytest.approx(table[roc.metadata["task"]]["auc"], abs=0.005)
    assert "data:image/png;base64" in out["report.html"].read_text()
