"""`unipinrec deploy | publish-model | pipeline submit --pipeline-name` through the real typer app."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

import unipinrec.deploy as deploy_pkg
import unipinrec.cli.pipeline as cli_pipeline
import unipinrec.kfp_client as kfp_client_mod
from unipinrec.cli import app

from .conftest import MANIFESTS
from .fake_kube import FakeKube
from .test_kfp_client import RecordingClient

runner = CliRunner()
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the overlays")


def invoke(*args):
    return runner.invoke(app, list(args))


@pytest.fixture
def no_cluster(monkeypatch):
    def refuse(**kw):
        raise AssertionError("--dry-run must not connect to a cluster")
    monkeypatch.setattr(deploy_pkg, "KubernetesApi", refuse)


@needs_kubectl
def test_dry_run_prints_the_rendered_objects_with_the_version(no_cluster):
    r = invoke("deploy", "--overlay", "prod", "--model-version", "3f2a9c1e", "--dry-run", "--manifests", str(MANIFESTS))
    assert r.exit_code == 0, r.output
    objs = [d for d in yaml.safe_load_all(r.stdout) if d]
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "unipinrec-serving")
    assert dep["metadata"]["namespace"] == "unipinrec"
    assert dep["spec"]["template"]["metadata"]["annotations"]["unipinrec.io/model-version"] == "3f2a9c1e"
    assert dep["spec"]["template"]["spec"]["initContainers"][0]["env"][0] == {"name": "MODEL_VERSION", "value": "3f2a9c1e"}
    assert "unset" not in r.stdout


@needs_kubectl
def test_dry_run_of_the_kserve_variant_sets_the_storage_uri(no_cluster):
    r = invoke("deploy", "--overlay", str(MANIFESTS / "kserve"), "--model-version", "v7", "--dry-run")
    assert r.exit_code == 0, r.output
    isvc = next(o for o in yaml.safe_load_all(r.stdout) if o and o["kind"] == "InferenceService")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "pvc://unipinrec-model-registry/unipinrec/v7"


@needs_kubectl
def test_dry_run_of_the_native_kserve_variant_sets_storage_uri_and_version(no_cluster):
    r = invoke("deploy", "--overlay", str(MANIFESTS / "kserve" / "native"), "--model-version", "v7", "--dry-run")
    assert r.exit_code == 0, r.output
    isvc = next(o for o in yaml.safe_load_all(r.stdout) if o and o["kind"] == "InferenceService")
    env = {e["name"]: e["value"] for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    assert env["STORAGE_URI"] == "pvc://unipinrec-model-registry/unipinrec/v7" and env["MODEL_VERSION"] == "v7"


@needs_kubectl
def test_bad_input_names_the_field_and_exits_1(no_cluster):
    r = invoke("deploy", "--overlay", "prod", "--model-version", "../x", "--dry-run", "--manifests", str(MANIFESTS))
    assert r.exit_code == 1 and "model_version" in r.output
    r = invoke("deploy", "--overlay", "staging", "--model-version", "v1", "--dry-run", "--manifests", str(MANIFESTS))
    assert r.exit_code == 1 and "--overlay" in r.output


@needs_kubectl
def test_deploy_reports_success_and_rollback_by_exit_code(monkeypatch, tmp_path):
    fake = FakeKube(secrets={("unipinrec-dev", "unipinrec-inference-token"): {"token": "t0k"}})
    monkeypatch.setattr(deploy_pkg, "KubernetesApi", lambda **kw: fake)
    clock = SimpleNamespace(t=0.0)
    fake_time = SimpleNamespace(monotonic=lambda: clock.t, sleep=lambda dt: setattr(clock, "t", clock.t + dt))
    monkeypatch.setattr("unipinrec.deploy.rollout.time", fake_time)  # polls without sleeping
    r = invoke("deploy", "--overlay", "dev", "--model-version", "v1", "--manifests", str(MANIFESTS))
    assert r.exit_code == 0, r.output
    assert "deployed v1" in r.output and "applied Deployment/unipinrec-dev/unipinrec-serving" in r.output
    fake.crashing = {"v2"}
    r = invoke("deploy", "--overlay", "dev", "--model-version", "v2", "--manifests", str(MANIFESTS), "--timeout", "60")
    assert r.exit_code == 1 and "rolled_back" in r.output and "rolled back to v1" in r.output
    body = tmp_path / "req.json"
    body.write_text("{not json")
    r = invoke("deploy", "--overlay", "dev", "--model-version", "v3", "--manifests", str(MANIFESTS),
               "--smoke-request", str(body))
    assert r.exit_code == 1 and "--smoke-request" in r.output


def test_publish_model(tmp_path):
    mar = tmp_path / "unipinrec.mar"
    mar.write_bytes(b"archive")
    r = invoke("publish-model", "--mar", str(mar), "--registry", str(tmp_path / "reg"), "--model-version", "v1")
    assert r.exit_code == 0 and (tmp_path / "reg/unipinrec/v1/model-store/unipinrec.mar").exists()
    r = invoke("publish-model", "--mar", str(tmp_path / "missing.mar"), "--registry", str(tmp_path), "--model-version", "v1")
    assert r.exit_code == 1 and "mar_path" in r.output


def test_submit_retraining(monkeypatch):
    client = RecordingClient(experiments={"unipinrec-retraining": "e1"}, pipelines={"unipinrec": ("p1", ["v9"])})
    seen = {}

    def make_client(host, namespace, existing_token=None):
        seen.update(host=host, namespace=namespace)
        return client
    monkeypatch.setattr(kfp_client_mod, "make_client", make_client)
    # the retraining CronJob's command: the newest uploaded version runs, the image's missing pipelines/ is not needed
    monkeypatch.setattr(cli_pipeline, "_pipelines", lambda: pytest.fail("submit --pipeline-name imported pipelines/"))
    r = invoke("pipeline", "submit", "--host", "http://ml-pipeline.kubeflow:8888", "--namespace", "team",
               "--pipeline-name", "unipinrec", "--experiment", "unipinrec-retraining", "--param", "epochs=2")
    assert r.exit_code == 0 and "submitted run run-1" in r.output, r.output
    assert seen == {"host": "http://ml-pipeline.kubeflow:8888", "namespace": "team"}
    assert client.calls[-1][1]["params"] == {"epochs": 2} and client.calls[-1][1]["version_id"] == "v9"
    r = invoke("pipeline", "submit", "--pipeline-name", "unipinrec", "--param", "nokey")
    assert r.exit_code == 1 and "key=value" in r.output
