"""An in-memory `KubeApi` with a toy Deployment controller, for testing the deploy decisions.

Each `get` of a Deployment advances its rollout by one step, the way a real controller
would between polls: first it observes the new generation, then it replaces one replica per
step. Pods of a version listed in `crashing` never become available; with
`deadline_after=N` the controller reports `ProgressDeadlineExceeded` after N stuck steps.
Smoke requests are answered by `answer(version)` for the version whose pods serve: during a
finished rollout, the Deployment's version.

TrainJobs get a toy Trainer controller too (`_step_trainjob`): the first `get` creates the node
pods (with JobSet's labels) and runs `trainjob_executor(job)` when one is given, which decides
the outcome and node-0's log; otherwise the job ends with `trainjob_outcome` after
`trainjob_after` gets (None: it never ends). `calls` records every (verb, API group, resource)
used, for checking RBAC against what the code really does.
"""
from __future__ import annotations

import copy
import json
from typing import Callable

from unipinrec.deploy.api import DeployError, HttpReply, Obj, ObjectRef
from unipinrec.deploy.render import TARGET_ANNOTATION, model_version_of


def ok_answer(version: str) -> HttpReply:
    body = {"items": [{"item_id": 7, "score": 0.9}], "model_version": version, "timings_ms": {}}
    return HttpReply(200, json.dumps(body).encode())


class FakeKube:
    def __init__(self, *, crashing: set[str] = frozenset(), deadline_after: int | None = None,
                 answer=ok_answer, secrets: dict | None = None, replicas: int = 2,
                 fail_apply_kind: str | None = None, trainjob_outcome: tuple[str, str, str] | None = (
                     "Complete", "JobSetCompleted", "jobset completed successfully"), trainjob_after: int = 2,
                 trainjob_executor: Callable[[Obj], tuple[bool, str]] | None = None):
        self.objects: dict[tuple, Obj] = {}
        self.crashing, self.deadline_after, self.answer = set(crashing), deadline_after, answer
        self.secrets = {("ns", "unipinrec-inference-token"): {"token": "s3cret\nold-token\n"}} if secrets is None else secrets
        self.replicas, self.fail_apply_kind = replicas, fail_apply_kind
        self.applied: list[tuple[str, str]] = []  # (ref, field manager), in order
        self.requests: list[dict] = []
        self._stuck: dict[tuple, int] = {}
        self.trainjob_outcome, self.trainjob_after, self.trainjob_executor = \
            trainjob_outcome, trainjob_after, trainjob_executor
        self.calls: list[tuple[str, str, str]] = []  # (verb, API group, resource)
        self.logs: dict[tuple[str, str], list[str]] = {}  # (namespace, pod) -> log lines
        self._gets: dict[tuple, int] = {}
        self._clock = 0

    def _call(self, verb: str, api_version: str, kind: str) -> None:
        group = api_version.rpartition("/")[0]
        self.calls.append((verb, group, kind.lower() + "s"))

    @staticmethod
    def _key(ref: ObjectRef) -> tuple:
        return (ref.api_version, ref.kind, ref.namespace, ref.name)

    # -- KubeApi ---------------------------------------------------------------------------
    def get(self, ref: ObjectRef) -> Obj | None:
        self._call("get", ref.api_version, ref.kind)
        obj = self.objects.get(self._key(ref))
        if obj is not None and obj["kind"] == "Deployment":
            self._step(obj)
        if obj is not None and obj["kind"] == "TrainJob":
            self._step_trainjob(obj)
        return copy.deepcopy(obj)

    def apply(self, obj: Obj, *, field_manager: str) -> Obj:
        ref = ObjectRef.of(obj)
        if obj["kind"] == self.fail_apply_kind:
            raise RuntimeError(f"admission webhook denied {ref}")
        key = self._key(ref)
        live = self.objects.get(key)
        self._call("patch", ref.api_version, ref.kind)
        if live is None:
            self._call("create", ref.api_version, ref.kind)  # server-side apply of a new object
        elif obj["kind"] == "TrainJob" and obj["spec"].get("trainer") != live["spec"].get("trainer"):
            raise DeployError(f"{ref}: spec.trainer: Invalid value: field is immutable")
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

    def delete(self, ref: ObjectRef) -> bool:
        self._call("delete", ref.api_version, ref.kind)
        obj = self.objects.pop(self._key(ref), None)
        if obj is not None and obj["kind"] == "TrainJob":  # garbage collection of its pods
            for key in [k for k, o in self.objects.items() if o["kind"] == "Pod" and o["metadata"]["labels"].get(
                    "jobset.sigs.k8s.io/jobset-name") == ref.name and k[2] == ref.namespace]:
                del self.objects[key]
        return obj is not None

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[Obj]:
        self._call("list", api_version, kind)
        want = dict(pair.split("=", 1) for pair in label_selector.split(",") if pair)
        return [copy.deepcopy(o) for k, o in self.objects.items() if k[:3] == (api_version, kind, namespace)
                and all(o["metadata"].get("labels", {}).get(a) == b for a, b in want.items())]

    def pod_log(self, namespace: str, name: str, *, container: str, tail_lines: int) -> str:
        self.calls.append(("get", "", "pods/log"))
        return "\n".join(self.logs.get((namespace, name), [])[-tail_lines:])

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

    def _step_trainjob(self, job: Obj) -> None:
        meta, key = job["metadata"], self._key(ObjectRef.of(job))
        self._gets[key] = n = self._gets.get(key, 0) + 1
        if (job.get("status") or {}).get("conditions"):
            return
        if n == 1:
            self._create_node_pods(job)
        pod0 = (meta["namespace"], f"{meta['name']}-node-0-0-fake0")
        if self.trainjob_executor is not None and n == 1:
            ok, log = self.trainjob_executor(job)
            self._log(pod0, log.splitlines())
            outcome = ("Complete", "JobSetCompleted", "jobset completed successfully") if ok else \
                ("Failed", "FailedJobs", "jobset failed due to one or more job failures")
        elif self.trainjob_outcome is None or n < self.trainjob_after:
            self._log(pod0, [f"step {n}: training"])
            return
        else:
            outcome = self.trainjob_outcome
        job["status"] = {"conditions": [{"type": outcome[0], "status": "True", "reason": outcome[1],
                                         "message": outcome[2], "lastTransitionTime": "2026-12-01T00:00:00Z"}]}

    def _create_node_pods(self, job: Obj) -> None:
        meta = job["metadata"]
        for i in range(job["spec"]["trainer"].get("numNodes", 1)):
            name = f"{meta['name']}-node-0-{i}-fake{i}"
            labels = {"jobset.sigs.k8s.io/jobset-name": meta["name"], "jobset.sigs.k8s.io/replicatedjob-name": "node",
                      "batch.kubernetes.io/job-completion-index": str(i)}
            self.objects[("v1", "Pod", meta["namespace"], name)] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": meta["namespace"], "labels": labels,
                             "creationTimestamp": "2026-12-01T00:00:00Z"}}

    def _log(self, pod: tuple[str, str], lines: list[str]) -> None:
        for line in lines:
            self._clock += 1
            self.logs.setdefault(pod, []).append(f"2026-12-01T00:{self._clock // 60:02d}:{self._clock % 60:02d}.000000Z {line}")


class LocalTrainJobExecutor:
    """Stands in for the Trainer and its pods: runs a TrainJob's command here, once per node, as
    the torch runtime would (PET_* rendezvous variables, the trainer's env), with every PVC the
    job mounts mapped to a local folder (`volumes`: claim name -> folder). `torchrun` is this
    Python's torch.distributed.run; `unipinrec` is the one beside this Python."""

    def __init__(self, volumes: dict[str, "Path"], *, timeout_s: float = 300.0):
        self.volumes, self.timeout_s = volumes, timeout_s
        self.commands: list[list[str]] = []

    def __call__(self, job: Obj) -> tuple[bool, str]:
        import os
        import socket
        import subprocess
        import sys
        from pathlib import Path

        trainer = job["spec"]["trainer"]
        cmd = [self._host_path(job, a) for a in trainer["command"] + trainer.get("args", [])]
        if cmd[0] == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
        with socket.socket() as s:  # a free port for node 0's rendezvous store
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        repo_src = str(Path(__file__).resolve().parents[2] / "src")
        base = {**os.environ, **{e["name"]: e["value"] for e in trainer.get("env", [])},
                "PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": repo_src, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
        self.commands.append(cmd)
        nodes = [subprocess.Popen(cmd, env={**base, "PET_NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for rank in range(trainer["numNodes"])]
        logs = [p.communicate(timeout=self.timeout_s)[0] for p in nodes]
        return all(p.returncode == 0 for p in nodes), logs[0]

    def _host_path(self, job: Obj, arg: str) -> str:
        for patch in job["spec"].get("runtimePatches", []):
            for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                pod = rj["template"]["spec"]["template"]["spec"]
                claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                          if "persistentVolumeClaim" in v}
                for c in pod.get("containers", []):
                    for m in c.get("volumeMounts", []):
                        if m["name"] in claims and (arg == m["mountPath"] or arg.startswith(m["mountPath"] + "/")):
                            return str(self.volumes[claims[m["name"]]]) + arg[len(m["mountPath"]):]
        return arg
