"""Render a kustomize overlay to objects and stamp the model version on the serving Deployment.

The serving Deployment (or, for KServe, the InferenceService) is the object annotated
`unipinrec.io/deploy-target: "true"`.
Setting a model version touches exactly three places on it: the annotation
`unipinrec.io/model-version` (Deployment and pod template), the pod label
`app.kubernetes.io/version`, and the `MODEL_VERSION` env var of every container and init
container (the init container fetches that version's archive from the model registry).
"""
from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Iterable

import yaml

from ..serving import registry
from .api import DeployError, Obj

TARGET_ANNOTATION = "unipinrec.io/deploy-target"
VERSION_ANNOTATION = "unipinrec.io/model-version"
SERVICE_ANNOTATION = "unipinrec.io/service"
TOKEN_SECRET_ANNOTATION = "unipinrec.io/token-secret"
VERSION_LABEL = "app.kubernetes.io/version"
VERSION_ENV = "MODEL_VERSION"
UNSET = "unset"  # the placeholder version in the committed manifests (never deployed)


def check_model_version(version: str) -> str:
    """The registry's version rule (a label value), as a DeployError."""
    try:
        return registry.check_model_version(version)
    except registry.RegistryError as e:
        raise DeployError(str(e)) from None


def kustomize_binary() -> list[str]:
    """`kubectl kustomize` where kubectl exists, else a standalone `kustomize build`."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    raise DeployError("neither kubectl nor kustomize is on PATH: install kubectl >= 1.27 to render manifests")


def render(kustomization_dir: str | Path, timeout_s: float = 120.0) -> list[Obj]:
    """`kubectl kustomize DIR`, parsed into objects (in kustomize's apply order)."""
    path = Path(kustomization_dir)
    if not (path / "kustomization.yaml").is_file():
        raise DeployError(f"overlay: {path} has no kustomization.yaml")
    cmd = [*kustomize_binary(), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise DeployError(f"overlay: `{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    return parse_objects(proc.stdout)


def parse_objects(text: str) -> list[Obj]:
    objects = [doc for doc in yaml.safe_load_all(text) if doc]
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
            raise DeployError(f"rendered object #{i} has no kind/apiVersion")
    return objects


def dump_objects(objects: Iterable[Obj]) -> str:
    return "---\n".join(yaml.safe_dump(o, sort_keys=False) for o in objects)


def _targets(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if o["kind"] in ("Deployment", "InferenceService")
            and (o.get("metadata", {}).get("annotations") or {}).get(TARGET_ANNOTATION) == "true"]


def find_target(objects: list[Obj]) -> Obj:
    """The serving Deployment (exactly one Deployment carries the deploy-target annotation)."""
    found = [o for o in _targets(objects) if o["kind"] == "Deployment"]
    if len(found) != 1:
        kinds = sorted({o["kind"] for o in _targets(objects)})
        hint = " (the KServe variant is applied with `--dry-run | kubectl apply -f -`)" if kinds == ["InferenceService"] else ""
        raise DeployError(f"expected exactly one Deployment annotated {TARGET_ANNOTATION}=true, found {len(found)}{hint}")
    return found[0]


def model_version_of(obj: Obj) -> str | None:
    if obj.get("kind") == "InferenceService":
        return (obj.get("metadata", {}).get("annotations") or {}).get(VERSION_ANNOTATION)
    template_meta = obj.get("spec", {}).get("template", {}).get("metadata", {})
    return (template_meta.get("annotations") or {}).get(VERSION_ANNOTATION)


def _set_env(containers: list[Obj], version: str) -> None:
    for c in containers:
        env = [e for e in c.get("env", []) if e.get("name") != VERSION_ENV]
        c["env"] = [{"name": VERSION_ENV, "value": version}, *env]


def with_model_version(objects: list[Obj], version: str) -> list[Obj]:
    """A copy of `objects` with every deploy target (Deployment or InferenceService) set to `version`.

    An InferenceService also gets the last segment of `predictor.model.storageUri` (or of a
    custom predictor container's STORAGE_URI) replaced (the registry's version folder).
    """
    check_model_version(version)
    out = copy.deepcopy(objects)
    targets = _targets(out)
    if not targets:
        raise DeployError(f"no Deployment or InferenceService is annotated {TARGET_ANNOTATION}=true")
    for obj in targets:
        obj["metadata"].setdefault("annotations", {})[VERSION_ANNOTATION] = version
        if obj["kind"] == "InferenceService":
            pred = obj["spec"]["predictor"]
            # a runtime's model has storageUri; a custom predictor container has it as STORAGE_URI
            specs = [pred["model"]] if "model" in pred else pred.get("containers", [])
            for spec in specs:
                if "storageUri" in spec:
                    spec["storageUri"] = spec["storageUri"].rstrip("/").rsplit("/", 1)[0] + "/" + version
                for e in spec.get("env", []):
                    if e["name"] == "STORAGE_URI":
                        e["value"] = e["value"].rstrip("/").rsplit("/", 1)[0] + "/" + version
            _set_env(specs, version)
            continue
        tmeta = obj["spec"]["template"].setdefault("metadata", {})
        tmeta.setdefault("annotations", {})[VERSION_ANNOTATION] = version
        tmeta.setdefault("labels", {})[VERSION_LABEL] = version
        pod = obj["spec"]["template"]["spec"]
        _set_env([*pod.get("initContainers", []), *pod.get("containers", [])], version)
    return out
