"""The deploy step's decisions (plan, apply, wait, smoke, rollback) through the fake KubeApi.

The objects are the real manifests/base files (read with PyYAML, no kubectl needed), put in
namespace "ns". Time is a fake clock: no test sleeps.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from unipinrec.deploy import DeployError, SmokeRequest, deploy_model, rollout_state
from unipinrec.deploy.api import HttpReply, ObjectRef
from unipinrec.deploy.render import VERSION_ANNOTATION, model_version_of
from unipinrec.deploy.rollout import FIELD_MANAGER, is_subset

from .fake_kube import FakeKube, ok_answer

BASE = Path(__file__).resolve().parents[2] / "manifests" / "base"
DEP = ObjectRef("apps/v1", "Deployment", "unipinrec-serving", "ns")


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    out = []
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((BASE / name).read_text()):
            doc["metadata"]["namespace"] = "ns"
            out.append(doc)
    return out


class Clock:
    def __init__(self):
        self.t = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt
        self.sleeps += 1


def run(api, objects, version, **kw):
    clock = Clock()
    kw.setdefault("timeout_s", 120)
    result = deploy_model(None, version, api, objects=objects, poll_s=2, clock=clock, sleep=clock.sleep, **kw)
    return result, clock


def live_version(api) -> str | None:
    return model_version_of(api.objects[FakeKube._key(DEP)])


def env_version(api) -> list[str]:
    pod = api.objects[FakeKube._key(DEP)]["spec"]["template"]["spec"]
    return [next(e["value"] for e in c["env"] if e["name"] == "MODEL_VERSION")
            for c in [*pod["initContainers"], *pod["containers"]]]


def test_first_deploy_creates_everything_and_smoke_tests_through_the_service(objects):
    api = FakeKube()
    result, _ = run(api, objects, "v1")
    assert result.status == "deployed" and result.ok, result.message
    assert result.previous_version is None and result.live_version == "v1"
    assert {c.action for c in result.plan.changes} == {"create"}
    assert len(api.applied) == len(objects) and {m for _, m in api.applied} == {FIELD_MANAGER}
    assert live_version(api) == "v1" and env_version(api) == ["v1", "v1"]
    # three smoke requests through the Service's inference port, with the first token of the Secret
    assert len(api.requests) == 3
    req = api.requests[0]
    assert (req["service"], req["port"], req["method"], req["path"]) == ("unipinrec-serving", 8080, "POST",
                                                                          "/predictions/unipinrec")
    assert req["headers"]["Authorization"] == "Bearer s3cret"


def test_upgrade_plans_only_the_deployment_as_changed(objects):
    api = FakeKube()
    run(api, objects, "v1")
    result, _ = run(api, objects, "v2")
    assert result.status == "deployed", result.message
    actions = {str(c.ref): c.action for c in result.plan.changes}
    assert actions.pop("Deployment/ns/unipinrec-serving") == "update"
    assert set(actions.values()) == {"unchanged"}
    assert result.previous_version == "v1" and live_version(api) == "v2"
    assert "v1 -> v2" in result.plan.summary()


def test_failed_rollout_ends_on_the_previous_version(objects):
    api = FakeKube(crashing={"v2"})
    run(api, objects, "v1")
    before = copy.deepcopy(api.objects[FakeKube._key(DEP)]["spec"]["template"])
    result, clock = run(api, objects, "v2", timeout_s=60)
    assert result.status == "rolled_back" and not result.ok
    assert result.live_version == "v1" and live_version(api) == "v1"
    assert env_version(api) == ["v1", "v1"]
    assert api.objects[FakeKube._key(DEP)]["spec"]["template"] == before  # the exact previous pod template
    assert "rollout not complete after 60 s" in result.message and "rolled back to v1" in result.message
    assert clock.t >= 60
    # the previous version serves again, and no smoke request ever reached the broken version
    assert api.objects[FakeKube._key(DEP)]["_serving_version"] == "v1"
    assert len(api.requests) == 3  # only v1's own smoke test


def test_progress_deadline_fails_fast_without_waiting_for_the_timeout(objects):
    api = FakeKube(crashing={"v2"}, deadline_after=3)
    run(api, objects, "v1")
    result, clock = run(api, objects, "v2", timeout_s=600)
    assert result.status == "rolled_back" and live_version(api) == "v1"
    assert "progress deadline" in result.message
    assert clock.t < 600 / 10


@pytest.mark.parametrize("answer, why", [
    (lambda v: HttpReply(500, b'{"code": 500, "type": "InternalServerException"}'), "HTTP 500"),
    (lambda v: HttpReply(200, b"<html>oops</html>"), "not JSON"),
    (lambda v: HttpReply(200, json.dumps({"model_version": v}).encode()), "no 'items' list"),
    (lambda v: ok_answer("v1"), "served model_version 'v1', expected 'v2'"),
])
def test_failed_smoke_request_rolls_back(objects, answer, why):
    api = FakeKube()
    run(api, objects, "v1")
    api.answer = lambda v: answer(v) if v == "v2" else ok_answer(v)
    result, _ = run(api, objects, "v2")
    assert result.status == "rolled_back", result.message
    assert why in result.message
    assert live_version(api) == "v1" and api.objects[FakeKube._key(DEP)]["_serving_version"] == "v1"


def test_missing_token_secret_counts_as_a_failed_smoke_test(objects):
    api = FakeKube()
    run(api, objects, "v1")
    api.secrets = {}
    result, _ = run(api, objects, "v2")
    assert result.status == "rolled_back" and "cannot read Secret ns/unipinrec-inference-token" in result.message


def test_apply_error_after_changes_rolls_back(objects):
    api = FakeKube()
    run(api, objects, "v1")
    api.fail_apply_kind = "HorizontalPodAutoscaler"  # applied after the Deployment
    result, _ = run(api, objects, "v2")
    assert result.status == "rolled_back" and "admission webhook denied" in result.message
    assert live_version(api) == "v1"


def test_first_deploy_failure_has_nothing_to_roll_back_to(objects):
    api = FakeKube(crashing={"v1"})
    result, _ = run(api, objects, "v1", timeout_s=30)
    assert result.status == "failed" and result.previous_version is None
    assert "no previous version to roll back to" in result.message


def test_a_bootstrap_deployment_without_a_version_is_not_a_rollback_target(objects):
    api = FakeKube(crashing={"v1", "unset"})
    for obj in objects:  # `kubectl apply -k` of the committed manifests: version "unset"
        api.apply(obj, field_manager="kubectl")
    result, clock = run(api, objects, "v1", timeout_s=30)
    assert result.status == "failed" and result.previous_version == "unset"
    assert "applied without a model version" in result.message
    assert clock.t < 60  # no second wait for a rollback that cannot succeed


def test_rollback_that_cannot_complete_is_reported_as_failed(objects):
    api = FakeKube()
    run(api, objects, "v1")
    api.crashing = {"v1", "v2"}  # e.g. the node pool lost the old image too
    result, _ = run(api, objects, "v2", timeout_s=30)
    assert result.status == "failed"
    assert "rollback to v1 did not complete" in result.message


def test_plan_only_applies_nothing(objects):
    api = FakeKube()
    result, _ = run(api, objects, "v1", plan_only=True)
    assert result.status == "planned" and api.applied == [] and api.requests == []


def test_bad_version_is_refused_before_anything_is_applied(objects):
    api = FakeKube()
    with pytest.raises(DeployError, match="model_version"):
        run(api, objects, "v1/../../etc")
    assert api.applied == []


def test_smoke_request_body_and_attempts_are_configurable(objects):
    api = FakeKube()
    body = {"user_id": 42, "history": [{"item_id": 7, "action": 2, "ts": 1700000000}], "k": 3}
    result, _ = run(api, objects, "v1", smoke_request=SmokeRequest(body=body, attempts=1))
    assert result.ok and len(api.requests) == 1 and api.requests[0]["body"] == body


def _dep(gen=2, observed=2, want=3, updated=3, total=3, available=3, conditions=()):
    return {"metadata": {"generation": gen}, "spec": {"replicas": want},
            "status": {"observedGeneration": observed, "updatedReplicas": updated, "replicas": total,
                       "availableReplicas": available, "conditions": list(conditions)}}


@pytest.mark.parametrize("dep, done, failed, words", [
    (_dep(), True, False, "3 replicas updated and available"),
    (_dep(observed=1), False, False, "observe"),
    (_dep(updated=1), False, False, "1 of 3 replicas updated"),
    (_dep(total=4), False, False, "1 old replicas pending termination"),
    (_dep(available=2), False, False, "2 of 3 updated replicas available"),
    (_dep(conditions=[{"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "m"}]), False, True,
     "progress deadline"),
    (None, False, True, "does not exist"),
])
def test_rollout_state_matches_kubectl_rollout_status(dep, done, failed, words):
    state = rollout_state(dep)
    assert (state.done, state.failed) == (done, failed) and words in state.message


def test_is_subset_ignores_server_defaults_but_not_changes():
    want = {"spec": {"ports": [{"port": 8080}], "type": "ClusterIP"}}
    have = {"spec": {"ports": [{"port": 8080, "protocol": "TCP"}], "type": "ClusterIP", "clusterIP": "10.0.0.1"}}
    assert is_subset(want, have)
    assert not is_subset({"spec": {"ports": [{"port": 8081}]}}, have)
    assert not is_subset({"spec": {"ports": [{"port": 8080}, {"port": 8082}]}}, have)
    assert is_subset({"cpu": 2}, {"cpu": "2"})  # the API returns quantities as strings


def test_version_annotation_is_what_rollback_restores(objects):
    api = FakeKube(crashing={"v3"})
    run(api, objects, "v1")
    run(api, objects, "v2")
    result, _ = run(api, objects, "v3")
    dep = api.objects[FakeKube._key(DEP)]
    assert result.status == "rolled_back" and result.live_version == "v2"
    assert dep["metadata"]["annotations"][VERSION_ANNOTATION] == "v2" and env_version(api) == ["v2", "v2"]


def _model_dir(root: Path, version: str) -> Path:
    d = root / f"model-{version}"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"model_version": version}))
    (root / f"{version}.mar").write_bytes(f"archive {version}".encode())
    return d


def test_release_model_publishes_rolls_out_and_records_only_what_went_live(objects, tmp_path):
    from unipinrec.deploy import release_model
    from unipinrec.deployment_record import DeploymentRecord

    api, record, clock = FakeKube(crashing={"v2"}), DeploymentRecord(tmp_path / "deployment"), Clock()

    def release(version):
        return release_model(tmp_path / f"{version}.mar", _model_dir(tmp_path, version), tmp_path / "registry", None,
                             api, record=record, evaluation={"model_version": version}, objects=objects,
                             timeout_s=30, poll_s=2, clock=clock, sleep=clock.sleep)

    assert release("v1").status == "deployed"
    assert (tmp_path / "registry/unipinrec/v1/model-store/unipinrec.mar").read_bytes() == b"archive v1"
    current = record.current()
    assert current["model_version"] == "v1" and current["target"] == "kubernetes" and current["previous"] is None
    assert Path(current["model_dir"], "meta.json").is_file()  # what the next gate evaluates
    assert release("v2").status == "rolled_back" and live_version(api) == "v1"
    assert record.current()["model_version"] == "v1"  # the failed version never became current
    failed = record.last("deploy failed")
    assert failed["model_version"] == "v2" and failed["status"] == "rolled_back" and failed["live_version"] == "v1"
    assert [e["event"] for e in record.history()] == ["deploy", "deploy failed"]
