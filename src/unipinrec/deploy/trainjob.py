"""A Kubeflow Trainer `TrainJob` (trainer.kubeflow.org/v1alpha1): render, create, wait, follow node-0, clean up.

The train step's `trainjob` launcher (unipinrec.training_launch) calls `render_trainjob` once and
`run_trainjob` with it. Everything goes through `JobApi`, the deploy step's `KubeApi` plus the three
calls a job needs (delete, list pods, read a pod's log); `KubernetesJobApi` (kube_jobs.py) is the
real one, tests use an in-memory fake.

The runtime (`torch-distributed`) runs `spec.trainer.command` in container `node` of every pod and
sets torchrun's `PET_NNODES`, `PET_NPROC_PER_NODE`, `PET_NODE_RANK`, `PET_MASTER_ADDR/PORT`, so the
command is a plain `torchrun ...` and must not set those itself. Volumes, the pods' identity and
security context reach the pods through `spec.runtimePatches` (the fields the Trainer lets a
TrainJob patch into its runtime).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, runtime_checkable

from .api import DeployError, KubeApi, Obj, ObjectRef

API_VERSION = "trainer.kubeflow.org/v1alpha1"
KIND = "TrainJob"
FIELD_MANAGER = "unipinrec-train"
PATCH_MANAGER = "unipinrec.io/train-step"
RUN_LABEL = "unipinrec.io/run-id"
KFP_RUN_LABEL = "pipeline/runid"  # the label Kubeflow Pipelines puts on the run's own pods
NODE = "node"  # the runtime's replicated job and container
NODE0_SELECTOR = "jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node," \
                 "batch.kubernetes.io/job-completion-index=0"
TORCHRUN_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}


@runtime_checkable
class JobApi(KubeApi, Protocol):
    def delete(self, ref: ObjectRef) -> bool:
        """Delete (foreground: dependents first); False when it did not exist."""

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[Obj]:
        """The objects of one kind in a namespace that match a label selector."""

    def pod_log(self, namespace: str, name: str, *, container: str, tail_lines: int) -> str:
        """The last lines of a container's log, each prefixed by its RFC 3339 timestamp; "" before it starts."""


@dataclass(frozen=True)
class TrainJobSpec:
    """Everything one TrainJob is rendered from."""
    name: str
    namespace: str
    image: str
    command: list[str]
    pvc: str  # mounted at mount_path in every node: examples in, model out
    mount_path: str = "/registry"
    num_nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0
    cpu: str = "4"
    memory: str = "16Gi"
    timeout_s: float = 86400.0
    runtime: str = "ClusterTrainingRuntime/torch-distributed"
    service_account: str = "unipinrec-trainer"
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    owner: dict | None = None  # the step's Pod {"name", "uid"}: the job goes when the run's pod goes


def job_name(run_id: str) -> str:
    """A stable, DNS-1035 name per pipeline run: a retried step finds its job (and checkpoint) again."""
    token = re.sub(r"[^a-z0-9]", "", run_id.lower())[:12]
    if not token:
        raise DeployError(f"run_id: {run_id!r} has no letters or digits to name a TrainJob after")
    return f"unipinrec-train-{token}"


def render_trainjob(spec: TrainJobSpec) -> Obj:
    reserved = TORCHRUN_ENV & set(spec.env)
    if reserved:
        raise DeployError(f"env: {sorted(reserved)} are set by the torch runtime, not by the TrainJob")
    kind, _, runtime = spec.runtime.partition("/")
    limits = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    labels = {"app.kubernetes.io/name": "unipinrec", "app.kubernetes.io/component": "training", **spec.labels}
    meta: Obj = {"name": spec.name, "namespace": spec.namespace, "labels": labels}
    if spec.owner:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": spec.owner["name"],
                                    "uid": spec.owner["uid"]}]
    trainer = {"image": spec.image, "command": list(spec.command), "numNodes": spec.num_nodes,
               "numProcPerNode": spec.procs_per_node,
               "resourcesPerNode": {"requests": {"cpu": spec.cpu, "memory": spec.memory}, "limits": limits},
               "env": [{"name": k, "value": v} for k, v in sorted(spec.env.items())]}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta,
            "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": kind, "name": runtime},
                     "activeDeadlineSeconds": max(1, int(spec.timeout_s)), "trainer": trainer,
                     "runtimePatches": [_pod_patch(spec, labels)]}}


def _pod_patch(spec: TrainJobSpec, labels: dict[str, str]) -> Obj:
    """Non-root pods as the trainer service account (no API token), the registry PVC, writable /tmp and /dev/shm."""
    volumes = [{"name": "registry", "persistentVolumeClaim": {"claimName": spec.pvc}},
               {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}]  # NCCL / DataLoader
    mounts = [{"name": "registry", "mountPath": spec.mount_path}, {"name": "tmp", "mountPath": "/tmp"},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    container = {"name": NODE, "volumeMounts": mounts,
                 "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                     "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}}
    pod = {"serviceAccountName": spec.service_account, "volumes": volumes, "containers": [container],
           "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                               "seccompProfile": {"type": "RuntimeDefault"}}}
    pod_labels = {k: v for k, v in labels.items() if k != KFP_RUN_LABEL}  # KFP's own pods keep that one
    job = {"name": NODE, "template": {"spec": {"template": {"metadata": {"labels": pod_labels}, "spec": pod}}}}
    return {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job]}}}}


# ---------------------------------------------------------------------------------------------
# State

@dataclass(frozen=True)
class JobState:
    phase: Literal["Pending", "Suspended", "Complete", "Failed"]
    reason: str = ""
    message: str = ""

    @property
    def finished(self) -> bool:
        return self.phase in ("Complete", "Failed")

    def __str__(self) -> str:
        return self.phase + (f" ({self.reason}: {self.message})" if self.reason or self.message else "")


def job_state(job: Obj) -> JobState:
    """Complete / Failed / Suspended from the TrainJob's conditions (status True), else Pending."""
    conds = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}
    for phase in ("Failed", "Complete", "Suspended"):
        if phase in conds:
            return JobState(phase, conds[phase].get("reason", ""), conds[phase].get("message", ""))
    return JobState("Pending")


@dataclass
class JobOutcome:
    status: Literal["Complete", "Failed", "TimedOut"]
    name: str
    reason: str
    message: str
    seconds: float
    node0_pod: str | None
    deleted: bool

    @property
    def ok(self) -> bool:
        return self.status == "Complete"

    def describe(self) -> str:
        why = f"{self.reason}: {self.message}" if self.reason or self.message else "no reason given"
        verb = {"Complete": "completed", "Failed": "failed", "TimedOut": "timed out"}[self.status]
        return f"TrainJob {self.name} {verb} after {self.seconds:.0f} s ({why})"


# ---------------------------------------------------------------------------------------------
# Run

class NodeLogs:
    """Echoes node-0's log lines once each (by timestamp) while the job runs, and how to follow it."""

    def __init__(self, api: JobApi, namespace: str, name: str, echo: Callable[[str], None], tail_lines: int = 2000):
        self.api, self.namespace, self.name, self.echo, self.tail_lines = api, namespace, name, echo, tail_lines
        self.pod: str | None = None
        self._last = ""

    def poll(self) -> None:
        pods = self.api.list("v1", "Pod", self.namespace, NODE0_SELECTOR.format(name=self.name))
        if not pods:
            return
        newest = max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")["metadata"]["name"]
        if newest != self.pod:  # the first pod, or a replacement after a restart
            self.pod, self._last = newest, ""
            self.echo(f"[{self.name}] node-0 is pod {newest}: kubectl logs -n {self.namespace} -f {newest} -c {NODE}")
        for line in self.api.pod_log(self.namespace, newest, container=NODE, tail_lines=self.tail_lines).splitlines():
            stamp, _, text = line.partition(" ")
            if stamp > self._last:
                self._last = stamp
                self.echo(f"[node-0] {text}")


def run_trainjob(api: JobApi, job: Obj, *, timeout_s: float, poll_s: float = 10.0, keep: bool = False,
                 echo: Callable[[str], None] = print, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None) -> JobOutcome:
    """Create `job` (server-side apply), wait until it is Complete or Failed or `timeout_s` passes,
    echo node-0's log meanwhile, then delete it unless `keep`. A Failed job left by an earlier
    attempt of this step is deleted and created again (its trainer resumes from the checkpoint);
    a Complete one is taken as is."""
    clock, sleep = clock or time.monotonic, sleep or time.sleep
    ref = ObjectRef.of(job)
    _replace_failed(api, ref, echo, timeout_s, clock, sleep)
    api.apply(job, field_manager=FIELD_MANAGER)
    echo(f"applied {ref}: {job['spec']['trainer']['numNodes']} node(s) x "
         f"{job['spec']['trainer']['numProcPerNode']} process(es)")
    logs = NodeLogs(api, ref.namespace or "default", ref.name, echo)
    start, state, last = clock(), JobState("Pending"), None
    try:
        while True:
            live = api.get(ref)
            if live is None:
                raise DeployError(f"{ref} disappeared while the step waited for it")
            state = job_state(live)
            if str(state) != last:
                echo(f"{ref}: {state}")
                last = str(state)
            _poll_logs(logs, echo)
            if state.finished or clock() - start >= timeout_s:
                break
            sleep(poll_s)
    finally:
        deleted = not keep and api.delete(ref)
    if state.finished:
        outcome = JobOutcome("Complete" if state.phase == "Complete" else "Failed", ref.name, state.reason,
                             state.message, clock() - start, logs.pod, deleted)
    else:
        outcome = JobOutcome("TimedOut", ref.name, "Timeout", f"not finished within {timeout_s:.0f} s, last state "
                             f"{state}", clock() - start, logs.pod, deleted)
    echo(outcome.describe() + ("; deleted" if deleted else "; kept"))
    return outcome


def _poll_logs(logs: NodeLogs, echo: Callable[[str], None]) -> None:
    try:
        logs.poll()
    except Exception as e:  # noqa: BLE001 - logs are for people; never fail the job over them
        echo(f"(node-0 log unavailable: {type(e).__name__}: {e})")


def _replace_failed(api: JobApi, ref: ObjectRef, echo, timeout_s, clock, sleep) -> None:
    live = api.get(ref)
    if live is None or job_state(live).phase != "Failed":
        return
    echo(f"{ref} failed in an earlier attempt ({job_state(live)}): deleting it to start again")
    api.delete(ref)
    deadline = clock() + min(timeout_s, 600.0)
    while api.get(ref) is not None:
        if clock() >= deadline:
            raise DeployError(f"{ref}: the failed job from an earlier attempt is still being deleted")
        sleep(2.0)
