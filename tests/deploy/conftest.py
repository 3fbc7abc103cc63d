"""Render every kustomization under manifests/ once per session (kubectl kustomize, offline)."""
from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
# Every kustomization in the project; a test checks this list is complete.
KUSTOMIZATIONS = ["base", "feast", "retraining", "rbac", "kserve", "kserve/native", "training", "training/runtime",
                  "overlays/dev", "overlays/prod", "overlays/dev/admin", "overlays/prod/admin",
                  "overlays/gpu", "overlays/kserve-gpu"]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the manifests cannot be rendered (kubectl kustomize)")

    def render(name: str) -> list[dict]:
        proc = subprocess.run(["kubectl", "kustomize", str(MANIFESTS / name)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"kubectl kustomize manifests/{name} failed:\n{proc.stderr}"
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(KUSTOMIZATIONS, pool.map(render, KUSTOMIZATIONS)))


def pod_specs(obj: dict) -> list[dict]:
    """The pod spec(s) inside a workload object (Deployment, StatefulSet, Job, CronJob, a Trainer runtime)."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "Pod":
        return [spec]
    if kind in ("TrainingRuntime", "ClusterTrainingRuntime"):
        return [rj["template"]["spec"]["template"]["spec"] for rj in spec["template"]["spec"]["replicatedJobs"]]
    return []


def containers(obj: dict) -> list[tuple[str, dict, dict]]:
    """(role, container, pod spec) for every container and init container of a workload."""
    out = []
    for pod in pod_specs(obj):
        out += [("init", c, pod) for c in pod.get("initContainers", [])]
        out += [("main", c, pod) for c in pod.get("containers", [])]
    if obj["kind"] == "InferenceService":
        pred = obj["spec"]["predictor"]
        if "model" in pred:  # a ServingRuntime's model; a custom predictor has containers instead
            out.append(("main", pred["model"], pred))
        out += [("main", c, pred) for c in pred.get("containers", [])]
    if obj["kind"] == "ServingRuntime":
        out += [("main", c, obj["spec"]) for c in obj["spec"]["containers"]]
    return out
