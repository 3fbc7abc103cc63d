"""unipinrec.kfp_client's submit_run (the CLI's `pipeline submit` and the retraining CronJob's
command) against a recording stand-in for kfp.Client.

The stand-in mirrors the kfp 2.17 Client methods submit_run uses, with their signatures, and a
test checks those signatures against the installed kfp so the two cannot drift apart.
"""
from __future__ import annotations

import inspect
import json
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from unipinrec.kfp_client import KfpError, RunRequest, parse_params, submit_run


def RetrainRequest(**kw) -> RunRequest:  # noqa: N802 - what the CronJob's arguments ask for
    return RunRequest(**{"experiment": "unipinrec-retraining", "pipeline_name": "unipinrec", **kw})


class RecordingClient:
    def __init__(self, experiments=(), pipelines=None):
        self.experiments = dict(experiments)
        self.pipelines = pipelines or {}
        self.calls = []

    def get_experiment(self, experiment_id=None, experiment_name=None, namespace=None):
        if experiment_name not in self.experiments:
            raise ValueError(f"No experiment is found with name {experiment_name}.")
        return SimpleNamespace(experiment_id=self.experiments[experiment_name])

    def create_experiment(self, name, description=None, namespace=None):
        self.calls.append(("create_experiment", name, namespace))
        self.experiments[name] = f"exp-{len(self.experiments) + 1}"
        return SimpleNamespace(experiment_id=self.experiments[name])

    def list_pipelines(self, page_token="", page_size=10, sort_by="", filter=None, namespace=None):
        """pipelines: name -> (id, versions newest first[, namespace]); without a namespace: shared."""
        name = json.loads(filter)["predicates"][0]["stringValue"]
        self.calls.append(("list_pipelines", name, namespace))
        entry = self.pipelines.get(name)
        hit = entry is not None and (entry[2] if len(entry) > 2 else None) == namespace
        return SimpleNamespace(pipelines=[SimpleNamespace(pipeline_id=entry[0])] if hit else None)

    def list_pipeline_versions(self, pipeline_id, page_token="", page_size=10, sort_by="", filter=None):
        self.calls.append(("list_pipeline_versions", pipeline_id, page_size, sort_by))
        versions = next(entry[1] for entry in self.pipelines.values() if entry[0] == pipeline_id)
        return SimpleNamespace(pipeline_versions=[SimpleNamespace(pipeline_version_id=v) for v in versions[:page_size]])

    def run_pipeline(self, experiment_id, job_name, pipeline_package_path=None, params=None, pipeline_id=None,
                     version_id=None, pipeline_root=None, enable_caching=None, cache_key=None, service_account=None):
        self.calls.append(("run_pipeline", dict(experiment_id=experiment_id, job_name=job_name,
                                               pipeline_package_path=pipeline_package_path, params=params,
                                               pipeline_id=pipeline_id, version_id=version_id,
                                               enable_caching=enable_caching, service_account=service_account)))
        return SimpleNamespace(run_id="run-1")


NOW = datetime(2026, 3, 2, 3, 0, 0, tzinfo=timezone.utc)


def test_stand_in_matches_the_installed_kfp_client():
    kfp_client = pytest.importorskip("kfp.client").Client
    for name in ("get_experiment", "create_experiment", "list_pipelines", "list_pipeline_versions", "run_pipeline"):
        ours = list(inspect.signature(getattr(RecordingClient, name)).parameters)
        theirs = list(inspect.signature(getattr(kfp_client, name)).parameters)
        assert ours == theirs, name


def test_runs_the_newest_version_of_the_uploaded_pipeline():
    client = RecordingClient(experiments={"unipinrec-retraining": "exp-9"},
                             pipelines={"unipinrec": ("pipe-1", ["ver-newest", "ver-older"])})
    run_id = submit_run(client, RetrainRequest(namespace="team", params={"epochs": 3}), now=NOW)
    assert run_id == "run-1"
    assert ("list_pipeline_versions", "pipe-1", 1, "created_at desc") in client.calls
    run = [c for c in client.calls if c[0] == "run_pipeline"][0][1]
    assert run["experiment_id"] == "exp-9" and run["pipeline_id"] == "pipe-1" and run["version_id"] == "ver-newest"
    assert run["job_name"] == "unipinrec-retraining-20260302-030000" and run["params"] == {"epochs": 3}
    assert run["pipeline_package_path"] is None
    assert run["enable_caching"] is None  # each step keeps its own caching setting (gate, deploy: off)


def test_creates_the_experiment_when_missing_and_runs_a_package(tmp_path):
    client = RecordingClient()
    pkg = tmp_path / "pipeline.yaml"
    pkg.write_text("{}")
    submit_run(client, RetrainRequest(pipeline_name=None, package_path=str(pkg), namespace="team"), now=NOW)
    assert ("create_experiment", "unipinrec-retraining", "team") in client.calls
    run = [c for c in client.calls if c[0] == "run_pipeline"][0][1]
    assert run["pipeline_package_path"] == str(pkg) and run["experiment_id"] == "exp-1"


def test_finds_a_pipeline_uploaded_into_the_profile_namespace_or_shared():
    client = RecordingClient(experiments={"unipinrec-retraining": "e"}, pipelines={"unipinrec": ("p-ns", ["v1"], "team")})
    submit_run(client, RetrainRequest(namespace="team"), now=NOW)
    assert ("list_pipelines", "unipinrec", "team") in client.calls
    shared = RecordingClient(experiments={"unipinrec-retraining": "e"}, pipelines={"unipinrec": ("p-shared", ["v1"], None)})
    submit_run(shared, RetrainRequest(namespace="team"), now=NOW)
    assert [c for c in shared.calls if c[0] == "list_pipelines"] == [("list_pipelines", "unipinrec", "team"),
                                                                      ("list_pipelines", "unipinrec", None)]
    assert [c for c in shared.calls if c[0] == "run_pipeline"][0][1]["pipeline_id"] == "p-shared"


def test_missing_pipeline_is_a_clear_error():
    with pytest.raises(KfpError, match="no pipeline named 'unipinrec'"):
        submit_run(RecordingClient(experiments={"unipinrec-retraining": "e"}), RetrainRequest(), now=NOW)


def test_exactly_one_source():
    with pytest.raises(KfpError, match="exactly one"):
        submit_run(RecordingClient(), RetrainRequest(pipeline_name="a", package_path="b.yaml"))
    with pytest.raises(KfpError, match="exactly one"):
        submit_run(RecordingClient(), RetrainRequest(pipeline_name=None))


def test_params_parse_json_values_and_name_bad_ones():
    assert parse_params(["epochs=3", "lr=0.001", "source=synthetic", "dry=true", "tags=[1,2]"]) == \
        {"epochs": 3, "lr": 0.001, "source": "synthetic", "dry": True, "tags": [1, 2]}
    with pytest.raises(KfpError, match="param: expected key=value"):
        parse_params(["oops"])
