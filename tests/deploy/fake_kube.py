"""An in-memory `KubeApi` with a toy Deployment controller, for testing the deploy decisions.

Each `get` of a Deployment advances its rollout by one step, the way a real controller
would between polls: first it observes the new generation, then it replaces one replica per
step. Pods of a version listed in `crashing` never become available; with
`deadline_after=N` the controller reports `ProgressDeadlineExceeded` after N stuck steps.
Smoke requests are answered by `answer(version)` for the version whose pods serve: during a
finished rollout, the Deployment's version.
"""
from __future__ import annotations

import copy
import json

from unipinrec.deploy.api import DeployError, HttpReply, Obj, ObjectRef
from unipinrec.deploy.render import TARGET_ANNOTATION, model_version_of


def ok_answer(version: str) -> HttpReply:
    body = {"items": [{"item_id": 7, "score": 0.9}], "model_version": version, "timings_ms": {}}
    return HttpReply(200, json.dumps(body).encode())


class FakeKube:
    def __init__(self, *, crashing: set[str] = frozenset(), deadline_after: int | None = None,
                 answer=ok_answer, secrets: dict | None = None, replicas: int = 2,
                 fail_apply_kind: str | None = None):
        self.objects: dict[tuple, Obj] = {}
        self.crashing, self.deadline_after, self.answer = set(crashing), deadline_after, answer
        self.secrets = {("ns", "unipinrec-inference-token"): {"token": "s3cret\nold-token\n"}} if secrets is None else secrets
        self.replicas, self.fail_apply_kind = replicas, fail_apply_kind
        self.applied: list[tuple[str, str]] = []  # (ref, field manager), in order
        self.requests: list[dict] = []
        self._stuck: dict[tuple, int] = {}

    @staticmethod
    def _key(ref: ObjectRef) -> tuple:
        return (ref.api_version, ref.kind, ref.namespace, ref.name)

    # -- KubeApi ---------------------------------------------------------------------------
    def get(self, ref: ObjectRef) -> Obj | None:
        obj = self.objects.get(self._key(ref))
        if obj is not None and obj["kind"] == "Deployment":
            self._step(obj)
        return copy.deepcopy(obj)

    def apply(self, obj: Obj, *, field_manager: str) -> Obj:
        ref = ObjectRef.of(obj)
        if obj["kind"] == self.fail_apply_kind:
            raise RuntimeError(f"admission webhook denied {ref}")
        key = self._key(ref)
        live = self.objects.get(key)
        new = copy.deepcopy(obj)
        if live is None:
            new["metadata"]["generation"] = 1
            if obj["kind"] == "Deployment":
                new["spec"].setdefault("replicas", self.replicas)
                new["status"] = {"observedGeneration": 0, "replicas": 0, "updatedReplicas": 0, "availableReplicas": 0}
        else:
            spec_changed = {k: v for k, v in obj.get("spec", {}).items()} != {
                k: v for k, v in live.get("spec", {}).items() if k in obj.get("spec", {})}
            new["metadata"]["generation"] = live["metadata"]["generation"] + int(spec_changed)
            if "status" in live:
                new["status"] = live["status"]
            if obj["kind"] == "Deployment":
                new["spec"].setdefault("replicas", live["spec"]["replicas"])  # owned by the HPA, not us
                if spec_changed:
                    new["_old_version"] = live.get("_serving_version")
        if obj["kind"] == "Deployment":
            new.setdefault("_serving_version", (live or {}).get("_serving_version"))
        self.objects[key] = new
        self.applied.append((str(ref), field_manager))
        return copy.deepcopy(new)

    def read_secret(self, namespace: str, name: str, key: str) -> str:
        try:
            return self.secrets[(namespace, name)][key]
        except KeyError:
            raise DeployError(f"cannot read Secret {namespace}/{name} key {key}") from None

    def service_request(self, namespace, service, port, method, path, body=None, headers=None, timeout_s=30.0):
        self.requests.append({"namespace": namespace, "service": service, "port": port, "method": method,
                              "path": path, "body": json.loads(body) if body else None, "headers": dict(headers or {})})
        dep = next((o for o in self.objects.values() if o["kind"] == "Deployment"
                    and o["metadata"].get("annotations", {}).get(TARGET_ANNOTATION) == "true"), None)
        if dep is None or not dep["status"].get("availableReplicas"):
            return HttpReply(503, b"no endpoints")
        return self.answer(dep["_serving_version"])

    # -- the toy controller ------------------------------------------------------------------
    def _step(self, dep: Obj) -> None:
        st, gen, want = dep["status"], dep["metadata"]["generation"], dep["spec"]["replicas"]
        version = model_version_of(dep)
        if st["observedGeneration"] < gen:  # observe the new spec: every replica is now "old"
            st["observedGeneration"] = gen
            st["updatedReplicas"] = 0
            st.pop("conditions", None)
            return
        key = (dep["metadata"]["namespace"], dep["metadata"]["name"])
        if version in self.crashing:
            # One surge pod is created but never becomes available; the old pods keep serving.
            st["updatedReplicas"] = 1
            st["replicas"] = want + 1
            st["availableReplicas"] = min(st.get("availableReplicas", 0), want)
            self._stuck[key] = self._stuck.get(key, 0) + 1
            if self.deadline_after is not None and self._stuck[key] >= self.deadline_after:
                st["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                     "message": f'ReplicaSet has timed out progressing ({version} crash-looping)'}]
            return
        self._stuck.pop(key, None)
        if st["updatedReplicas"] < want:
            st["updatedReplicas"] += 1
        st["replicas"] = want + (1 if st["updatedReplicas"] < want else 0)  # the surge pod
        st["availableReplicas"] = want
        if st["updatedReplicas"] == want:
            dep["_serving_version"] = version
