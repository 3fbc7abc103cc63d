"""The deployment record: stage, commit, history; only the deployed and the previous version stay."""
from __future__ import annotations

import json

import pytest

from unipinrec.deployment_record import DeploymentRecord, RecordError


def _version(root, version):
    model = root / f"model-{version}"
    model.mkdir()
    (model / "meta.json").write_text(json.dumps({"model_version": version}))
    features = root / f"features-{version}"
    features.mkdir()
    (features / "feature_meta.json").write_text("{}")
    mar = root / f"{version}.mar"
    mar.write_bytes(version.encode())
    return model, mar, features


def test_commit_makes_a_staged_version_current_and_keeps_one_previous(tmp_path):
    record = DeploymentRecord(tmp_path / "deploy")
    assert record.current() is None and record.history() == [] and record.last("deploy") is None
    for v in ("v1", "v2", "v3"):
        model, mar, features = _version(tmp_path, v)
        staged = record.stage(model, mar, feature_repo=features)
        assert record.current() is None or record.current()["model_version"] != v  # staged is not current
        record.commit(staged, target="local", evaluation={"model_version": v}, hot_swapped=False)
    current = record.current()
    assert current["model_version"] == "v3" and current["previous"] == "v2" and current["target"] == "local"
    assert sorted(p.name for p in (tmp_path / "deploy/models").iterdir()) == ["v2", "v3"]
    assert sorted(p.name for p in record.model_store.iterdir()) == ["unipinrec-v2.mar", "unipinrec-v3.mar"]
    assert (tmp_path / "deploy/features/current").resolve() == (tmp_path / "deploy/features/v3").resolve()
    assert [e["model_version"] for e in record.history()] == ["v1", "v2", "v3"]
    assert record.last("deploy")["previous"] == "v2" and record.last("deploy")["hot_swapped"] is False


def test_bad_inputs_are_named_and_write_nothing(tmp_path):
    record = DeploymentRecord(tmp_path / "deploy")
    model, _, _ = _version(tmp_path, "v1")
    with pytest.raises(RecordError, match="mar"):
        record.stage(model, tmp_path / "missing.mar")
    with pytest.raises(RecordError, match="model_dir"):
        record.stage(tmp_path, tmp_path / "v1.mar")
    assert not (tmp_path / "deploy").exists()
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy/current.json").write_text("{not json")
    with pytest.raises(RecordError, match="current.json"):
        record.current()
