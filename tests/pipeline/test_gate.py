"""The promotion gate: decisions on metric dicts, and the gate component on real models scored on
the same examples (a worse candidate is blocked; a better one is promoted)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from unipinrec.deployment_record import DeploymentRecord
from unipinrec.gate import gate, metric_values


def ev(version, hr, aucs):
    return {"model_version": version, "retrieval": {"HR@10": hr, "NDCG@10": hr / 3},
            "ranking": {t: {"auc": a, "gauc": a} for t, a in aucs.items()}}


def test_metric_paths_with_wildcards():
    m = ev("a", 0.3, {"engaged": 0.7, "saved": None})
    assert metric_values(m, "retrieval.HR@10") == {"retrieval.HR@10": 0.3}
    assert metric_values(m, "ranking.*.auc") == {"ranking.engaged.auc": 0.7, "ranking.saved.auc": None}
    assert metric_values(m, "ranking.nope.auc") == {}


def test_gate_decisions():
    deployed = ev("old", 0.30, {"engaged": 0.70})
    first = gate(ev("new", 0.1, {"engaged": 0.5}), None)
    assert first.promote and first.reason == "no deployed model"
    within = gate(ev("new", 0.295, {"engaged": 0.695}), deployed, tolerance=0.01)
    assert within.promote, within.render_text()
    worse = gate(ev("new", 0.25, {"engaged": 0.71}), deployed, tolerance=0.01)
    assert not worse.promote and "retrieval.HR@10" in worse.reason
    assert [c["ok"] for c in worse.comparisons] == [False, True]
    auc_worse = gate(ev("new", 0.40, {"engaged": 0.60}), deployed, tolerance=0.05)
    assert not auc_worse.promote and "ranking.engaged.auc" in auc_worse.reason
    same = gate(ev("old", 0.5, {"engaged": 0.9}), deployed)
    assert not same.promote and "already deployed" in same.reason
    missing = gate({"model_version": "new", "ranking": {"engaged": {"auc": 0.9}}}, deployed)
    assert not missing.promote and "no value for retrieval.HR@10" in missing.reason
    # an AUC that could not be computed (one class only) is not compared, not a failure
    undefined = gate(ev("new", 0.31, {"engaged": None}), deployed)
    assert undefined.promote
    with pytest.raises(ValueError, match="tolerance"):
        gate(deployed, deployed, tolerance=-1)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_config_text, tiny_builder):
    """A trained model and a barely trained one (1 step), on the same tiny examples."""
    from unipinrec import steps
    root = tmp_path_factory.mktemp("gate")
    cfg = steps.parse_config(tiny_config_text)
    tiny_builder(root, cfg.data)
    good = steps.train(root / "ex", root / "good", config_yaml=tiny_config_text, epochs=8)
    bad_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=1))
    bad = steps.train(root / "ex", root / "bad", config_yaml=json.dumps(_plain(bad_cfg)))
    evals = {name: steps.evaluate(root / name, root / "ex", root / f"{name}-eval")["evaluation"]
             for name in ("good", "bad")}
    assert good["model_version"] != bad["model_version"]
    return root, evals


def _plain(cfg):
    from unipinrec.config import to_dict

    return to_dict(cfg)


def _deploy(root, name, evaluation):
    from unipinrec.release import deploy_local

    d = root / f"deploy-{name}"
    mar = root / f"{name}.mar"
    mar.write_bytes(b"archive bytes")  # the gate reads the model folder, not the archive
    deploy_local(mar, root / name, d, evaluation=evaluation)
    return d


def _run_gate(root, candidate, deploy_dir, metrics):
    from kfp.dsl import HTML, Artifact, Dataset, Metrics

    from components import gate as gate_component

    out = root / f"gate-{candidate}-{deploy_dir.name}"
    decision, report = Metrics(uri=str(out / "decision")), HTML(uri=str(out / "report.html"))
    out.mkdir()
    promote = gate_component.python_func(
        evaluation=Artifact(uri=str(root / f"{candidate}-eval")), examples=Dataset(uri=str(root / "ex")),
        decision=decision, report=report, deploy_dir=str(deploy_dir), metrics=metrics, tolerance=0.01)
    return promote, decision, (out / "report.html").read_text()


def test_gate_blocks_a_worse_model(two_models):
    root, evals = two_models
    assert evals["bad"]["retrieval"]["HR@10"] < evals["good"]["retrieval"]["HR@10"] - 0.01
    deploy_dir = _deploy(root, "good", evals["good"])
    before = (deploy_dir / "current.json").read_text()
    promote, decision, html = _run_gate(root, "bad", deploy_dir, "retrieval.HR@10,ranking.*.auc")
    assert promote is False
    assert decision.metadata["promote"] == 0
    assert "KEEP" in html and "retrieval.HR@10" in html and "WORSE" in html
    # the deployed model was re-scored on the candidate's examples: the same number as its own evaluation
    assert decision.metadata["deployed_retrieval.HR@10"] == pytest.approx(evals["good"]["retrieval"]["HR@10"])
    assert (deploy_dir / "current.json").read_text() == before
    last = json.loads((deploy_dir / "history.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "gate" and last["promote"] is False


def test_gate_promotes_a_better_model(two_models):
    root, evals = two_models
    deploy_dir = _deploy(root, "bad", evals["bad"])
    promote, _, html = _run_gate(root, "good", deploy_dir, "retrieval.HR@10")
    assert promote is True and "PROMOTE" in html
    assert DeploymentRecord(deploy_dir).current()["model_version"] == evals["bad"]["model_version"]  # the gate deploys nothing
