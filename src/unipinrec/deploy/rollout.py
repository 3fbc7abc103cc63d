"""Plan, apply, wait, smoke-test and roll back one model version of the serving Deployment.

`deploy_model` is the rollout: the CLI (`unipinrec deploy`) calls it, and `release_model`, the
Kubeflow `deploy` step in kubernetes mode, publishes the archive, calls it and records the
result in the deployment record (`unipinrec.deployment_record`). Decisions, in order:

1. plan: render the overlay, stamp the version, compare with the live objects, and remember
   the live serving pod template (the rollback target) and its model version;
2. apply every object with server-side apply (kustomize's order: config before workloads);
3. wait for the Deployment rollout (what `kubectl rollout status` checks), failing early on
   `ProgressDeadlineExceeded`;
4. send smoke requests through the Service with the inference token from its Secret; the
   answer must be 200 JSON with `items`, naming the new `model_version`;
5. if 3 or 4 fails and a previous version was live, re-apply the previous pod template, wait
   again and check that the live Deployment is back on the previous version.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from ..deployment_record import DeploymentRecord, read_model_version
from .api import DeployError, KubeApi, Obj, ObjectRef
from .publish import publish_model
from .render import (SERVICE_ANNOTATION, TOKEN_SECRET_ANNOTATION, UNSET, VERSION_ANNOTATION, find_target,
                     model_version_of, render, with_model_version)

FIELD_MANAGER = "unipinrec-deploy"
Action = Literal["create", "update", "unchanged"]


@dataclass(frozen=True)
class PlannedChange:
    ref: ObjectRef
    action: Action


@dataclass
class Plan:
    objects: list[Obj]
    changes: list[PlannedChange]
    target: ObjectRef
    new_version: str
    previous_version: str | None
    previous_template: Obj | None  # the live pod template before this deploy

    def summary(self) -> str:
        prev = self.previous_version or "none (first deploy)"
        lines = [f"{self.target}: model version {prev} -> {self.new_version}"]
        lines += [f"  {c.action:9s} {c.ref}" for c in self.changes]
        return "\n".join(lines)


@dataclass(frozen=True)
class SmokeRequest:
    """What the smoke test sends through the Service, and what it expects back."""
    body: dict[str, Any] = field(default_factory=lambda: {"user_id": 1, "history": [], "k": 5})
    path: str = "/predictions/unipinrec"
    port: int = 8080
    attempts: int = 3  # requests spread over the Service's endpoints
    check_version: bool = True


@dataclass
class DeployResult:
    status: Literal["deployed", "rolled_back", "failed", "planned"]
    requested_version: str
    live_version: str | None  # the version the Deployment is on at the end
    previous_version: str | None
    plan: Plan
    message: str
    log: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("deployed", "planned")


def is_subset(want: Any, have: Any) -> bool:
    """True when every field of `want` is in `have` with the same value (the API adds defaults)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and is_subset(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(is_subset, want, have))
    return want == have or (isinstance(want, (int, float)) and str(want) == str(have))


def plan_deploy(objects: list[Obj], model_version: str, api: KubeApi) -> Plan:
    versioned = with_model_version(objects, model_version)
    target = ObjectRef.of(find_target(versioned))
    changes = []
    for obj in versioned:
        live = api.get(ObjectRef.of(obj))
        action: Action = "create" if live is None else ("unchanged" if is_subset(obj, live) else "update")
        changes.append(PlannedChange(ObjectRef.of(obj), action))
    live_target = api.get(target)
    prev_template = copy.deepcopy(live_target["spec"]["template"]) if live_target else None
    prev_version = model_version_of(live_target) if live_target else None
    return Plan(versioned, changes, target, model_version, prev_version, prev_template)


@dataclass(frozen=True)
class RolloutState:
    done: bool
    failed: bool
    message: str


def rollout_state(dep: Obj | None) -> RolloutState:
    """The checks of `kubectl rollout status` on one Deployment object."""
    if dep is None:
        return RolloutState(False, True, "the Deployment does not exist")
    meta, spec, status = dep.get("metadata", {}), dep.get("spec", {}), dep.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return RolloutState(False, True, f"rollout exceeded its progress deadline: {cond.get('message', '')}")
    if status.get("observedGeneration", 0) < meta.get("generation", 0):
        return RolloutState(False, False, "waiting for the controller to observe the new spec")
    want = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    if updated < want:
        return RolloutState(False, False, f"{updated} of {want} replicas updated")
    if status.get("replicas", 0) > updated:
        return RolloutState(False, False, f"{status.get('replicas', 0) - updated} old replicas pending termination")
    if status.get("availableReplicas", 0) < updated:
        return RolloutState(False, False, f"{status.get('availableReplicas', 0)} of {updated} updated replicas available")
    return RolloutState(True, False, f"{updated} replicas updated and available")


def wait_for_rollout(api: KubeApi, ref: ObjectRef, timeout_s: float, poll_s: float = 2.0,
                     clock: Callable[[], float] | None = None,
                     sleep: Callable[[float], None] | None = None) -> RolloutState:
    clock, sleep = clock or time.monotonic, sleep or time.sleep
    deadline = clock() + timeout_s
    while True:
        state = rollout_state(api.get(ref))
        if state.done or state.failed:
            return state
        if clock() >= deadline:
            return RolloutState(False, True, f"rollout not complete after {timeout_s:.0f} s: {state.message}")
        sleep(poll_s)


def smoke_test(api: KubeApi, target: Obj, expect_version: str, request: SmokeRequest) -> tuple[bool, str]:
    """Send `request.attempts` requests through the Service; (passed, message)."""
    meta = target["metadata"]
    ns, ann = meta.get("namespace", "default"), meta.get("annotations") or {}
    service, secret = ann.get(SERVICE_ANNOTATION), ann.get(TOKEN_SECRET_ANNOTATION)
    if not service or not secret:
        raise DeployError(f"{ObjectRef.of(target)} lacks the {SERVICE_ANNOTATION} / {TOKEN_SECRET_ANNOTATION} annotations")
    token = next((t.strip() for t in api.read_secret(ns, secret, "token").splitlines() if t.strip()), "")
    if not token:
        raise DeployError(f"Secret {ns}/{secret} key 'token' is empty")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    body = json.dumps(request.body).encode()
    for i in range(request.attempts):
        try:
            reply = api.service_request(ns, service, request.port, "POST", request.path, body, headers)
        except Exception as e:  # noqa: BLE001 - a network error is a failed smoke test, not a crash
            return False, f"smoke request {i + 1}: {type(e).__name__}: {e}"
        if reply.status != 200:
            return False, f"smoke request {i + 1}: HTTP {reply.status}: {reply.body[:300]!r}"
        try:
            answer = json.loads(reply.body)
        except ValueError:
            return False, f"smoke request {i + 1}: the answer is not JSON: {reply.body[:300]!r}"
        if not isinstance(answer, dict) or not isinstance(answer.get("items"), list):
            return False, f"smoke request {i + 1}: the answer has no 'items' list"
        if request.check_version and answer.get("model_version") != expect_version:
            return False, (f"smoke request {i + 1}: served model_version {answer.get('model_version')!r}, "
                           f"expected {expect_version!r}")
    return True, f"{request.attempts} smoke requests answered by model_version {expect_version}"


def _apply_all(api: KubeApi, objects: list[Obj], log: list[str]) -> None:
    for obj in objects:
        api.apply(obj, field_manager=FIELD_MANAGER)
        log.append(f"applied {ObjectRef.of(obj)}")


def rollback(api: KubeApi, plan: Plan, timeout_s: float, poll_s: float, log: list[str],
             clock: Callable[[], float] | None = None,
             sleep: Callable[[float], None] | None = None) -> tuple[bool, str]:
    """Re-apply the previous pod template and wait; (back on the previous version, message)."""
    if plan.previous_template is None:
        return False, "no previous version to roll back to (first deploy)"
    if plan.previous_version in (None, UNSET):
        return False, ("no previous version to roll back to (the live Deployment was applied without a model "
                       "version, e.g. by `kubectl apply -k`)")
    dep = copy.deepcopy(find_target(plan.objects))
    dep["spec"]["template"] = copy.deepcopy(plan.previous_template)
    dep["metadata"].setdefault("annotations", {})[VERSION_ANNOTATION] = plan.previous_version or ""
    try:
        api.apply(dep, field_manager=FIELD_MANAGER)
    except Exception as e:  # noqa: BLE001 - report, do not mask the original failure
        return False, f"rollback apply failed: {type(e).__name__}: {e}"
    log.append(f"rollback: re-applied the pod template of version {plan.previous_version}")
    state = wait_for_rollout(api, plan.target, timeout_s, poll_s, clock, sleep)
    live = model_version_of(api.get(plan.target) or {})
    if not state.done:
        return False, f"rollback to {plan.previous_version} did not complete: {state.message}"
    if live != plan.previous_version:
        return False, f"after rollback the Deployment is on {live!r}, not {plan.previous_version!r}"
    return True, f"rolled back to {plan.previous_version}: {state.message}"


def deploy_model(overlay_dir: str | Path | None, model_version: str, api: KubeApi, *,
                 objects: list[Obj] | None = None, timeout_s: float = 600.0, poll_s: float = 2.0,
                 smoke_request: SmokeRequest | None = None, plan_only: bool = False,
                 clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None) -> DeployResult:
    """Deploy `model_version` from a kustomize overlay (or pre-rendered `objects`) and verify it.

    Returns a `DeployResult`; `status` is "deployed", "rolled_back" (the new version failed and
    the previous one is live again), "failed" (no previous version, or the rollback failed
    too) or "planned" (`plan_only`, nothing applied).
    """
    if objects is None:
        if overlay_dir is None:
            raise DeployError("overlay_dir: give a kustomize overlay directory or rendered objects")
        objects = render(overlay_dir)
    smoke_request = smoke_request or SmokeRequest()
    plan = plan_deploy(objects, model_version, api)
    log = [plan.summary()]
    if plan_only:
        return DeployResult("planned", model_version, plan.previous_version, plan.previous_version, plan,
                            "plan only: nothing applied", log)

    def result(status, live, message):
        log.append(message)
        return DeployResult(status, model_version, live, plan.previous_version, plan, message, log)

    try:
        _apply_all(api, plan.objects, log)
        state = wait_for_rollout(api, plan.target, timeout_s, poll_s, clock, sleep)
        if state.done:
            log.append(f"rollout complete: {state.message}")
            passed, why = smoke_test(api, find_target(plan.objects), model_version, smoke_request)
        else:
            passed, why = False, f"rollout failed: {state.message}"
    except Exception as e:  # noqa: BLE001 - once anything is applied, every error leads to a rollback
        passed, why = False, f"{type(e).__name__}: {e}"
    if passed:
        return result("deployed", model_version, f"deployed {model_version}: {why}")
    log.append(why)
    ok, rb = rollback(api, plan, timeout_s, poll_s, log, clock, sleep)
    if ok:
        return result("rolled_back", plan.previous_version, f"{model_version} failed ({why}); {rb}")
    live = model_version_of(api.get(plan.target) or {})
    return result("failed", live, f"{model_version} failed ({why}); {rb}")


def release_model(mar: str | Path, model_dir: str | Path, registry_dir: str | Path, overlay_dir: str | Path | None,
                  api: KubeApi, *, record: DeploymentRecord | None = None, evaluation: dict | None = None,
                  **deploy_kw) -> DeployResult:
    """The pipeline's kubernetes deploy: publish the archive to the model registry, roll it out
    (`deploy_model`, keywords passed on) and, once it is live, make it current in the
    deployment `record` (the next gate evaluates it); a failed rollout is logged there."""
    version = read_model_version(model_dir)
    publish_model(mar, registry_dir, version)
    result = deploy_model(overlay_dir, version, api, **deploy_kw)
    if record is not None and result.status == "deployed":
        record.commit(record.stage(model_dir, mar), target="kubernetes", evaluation=evaluation)
    elif record is not None:
        record.log("deploy failed", model_version=version, target="kubernetes", status=result.status,
                   live_version=result.live_version, message=result.message)
    return result
