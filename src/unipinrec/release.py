"""Promotion gate and local deployment: what the pipeline's `gate` and `deploy` steps do.

The gate compares a candidate model's metrics with the deployed model's metrics on the SAME
evaluation set and promotes only when no guarded metric is worse by more than `tolerance`
(absolute). The local deployment is a folder that outlives pipeline runs:

    DEPLOY/current.json            the deployed version: model, archive, feature repo, metrics
    DEPLOY/history.jsonl           one line per gate decision and per deployment
    DEPLOY/models/<version>/       model folders (the gate evaluates the deployed one)
    DEPLOY/features/<version>/     feature repos; features/current -> the deployed one
    DEPLOY/model_store/unipinrec-<version>.mar
    DEPLOY/server/                 a TorchServe started on this folder (`serve_deployed`)

`deploy_local` hot-swaps a running TorchServe through its management API: the new version is
registered and loaded while the old one keeps answering, made the default, and the old one is
unregistered once its queue is empty, so no request is dropped.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

MODEL_NAME = "unipinrec"
DEFAULT_GATE_METRICS = ("retrieval.HR@10", "ranking.*.auc")
CURRENT = "current.json"


class ReleaseError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# The gate

def metric_values(metrics: dict, pattern: str) -> dict[str, float | None]:
    """Values of a dotted metric path in a nested metrics dict; `*` matches one level.

    metric_values(m, "ranking.*.auc") -> {"ranking.engaged.auc": 0.71, "ranking.saved.auc": ...}
    """
    found: dict[str, float | None] = {}

    def walk(node, parts: list[str], path: list[str]) -> None:
        if not parts:
            if node is None or isinstance(node, (int, float)) and not isinstance(node, bool):
                found[".".join(path)] = None if node is None or not math.isfinite(node) else float(node)
            return
        if not isinstance(node, dict):
            return
        for key in sorted(node):
            if fnmatch.fnmatchcase(str(key), parts[0]):
                walk(node[key], parts[1:], path + [str(key)])

    walk(metrics, pattern.split("."), [])
    return found


@dataclass
class GateDecision:
    promote: bool
    reason: str
    candidate_version: str | None
    deployed_version: str | None
    tolerance: float
    comparisons: list[dict] = field(default_factory=list)  # metric, candidate, deployed, delta, ok

    def to_dict(self) -> dict:
        return asdict(self)

    def render_text(self) -> str:
        lines = [f"gate: {'PROMOTE' if self.promote else 'KEEP'} ({self.reason})"]
        for c in self.comparisons:
            dep = "-" if c["deployed"] is None else f"{c['deployed']:.4f}"
            cand = "-" if c["candidate"] is None else f"{c['candidate']:.4f}"
            lines.append(f"  {c['metric']:<28} candidate {cand}  deployed {dep}  {c['status']}")
        return "\n".join(lines)


def gate(candidate: dict, deployed: dict | None, *, metrics: tuple[str, ...] | list[str] = DEFAULT_GATE_METRICS,
         tolerance: float = 0.01) -> GateDecision:
    """Decide whether `candidate` (an evaluation dict) may replace `deployed` (same eval set).

    Promote when there is no deployed model, or when every guarded metric the two share
    satisfies candidate >= deployed - tolerance. A guarded metric the candidate lacks blocks.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    cand_v = candidate.get("model_version")
    if deployed is None:
        return GateDecision(True, "no deployed model", cand_v, None, tolerance)
    dep_v = deployed.get("model_version")
    if cand_v is not None and cand_v == dep_v:
        return GateDecision(False, f"model {cand_v} is already deployed", cand_v, dep_v, tolerance)
    comparisons, worse, missing = [], [], []
    for pattern in metrics:
        cand_vals = metric_values(candidate, pattern)
        dep_vals = metric_values(deployed, pattern)
        if not cand_vals:
            missing.append(pattern)
        for name in sorted(set(cand_vals) | set(dep_vals)):
            c, d = cand_vals.get(name), dep_vals.get(name)
            if name not in cand_vals:
                status = "MISSING in candidate"
                worse.append(name)
            elif c is None or d is None:
                status = "not compared (undefined or absent on one side)"
            elif c >= d - tolerance:
                status = "ok" if c >= d else f"ok (within tolerance {tolerance:g})"
            else:
                status = f"WORSE by {d - c:.4f} (> {tolerance:g})"
                worse.append(name)
            comparisons.append({"metric": name, "candidate": c, "deployed": d,
                                "delta": None if c is None or d is None else c - d,
                                "ok": not status.startswith(("WORSE", "MISSING")), "status": status})
    if missing:
        return GateDecision(False, f"candidate has no value for {', '.join(missing)}", cand_v, dep_v, tolerance,
                            comparisons)
    if not any(c["delta"] is not None for c in comparisons):
        return GateDecision(False, "no guarded metric could be compared", cand_v, dep_v, tolerance, comparisons)
    if worse:
        return GateDecision(False, f"worse than the deployed model on {', '.join(worse)}", cand_v, dep_v,
                            tolerance, comparisons)
    return GateDecision(True, f"not worse than {dep_v} within {tolerance:g}", cand_v, dep_v, tolerance, comparisons)


# ---------------------------------------------------------------------------------------------
# The local deployment folder

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def deployed_model(deploy_dir: str | Path) -> dict | None:
    """The current.json record of the deployed model, or None when nothing is deployed."""
    path = Path(deploy_dir) / CURRENT
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReleaseError(f"{path}: not valid JSON ({e})") from e


def log_event(deploy_dir: str | Path, event: dict) -> None:
    d = Path(deploy_dir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "history.jsonl", "a") as f:
        f.write(json.dumps({"at": _now(), **event}, default=str) + "\n")


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a folder into place atomically (a reader never sees half of it); keep an existing one."""
    if dst.exists():
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, symlinks=False)
    os.replace(tmp, dst)


def _point(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic: readers follow either the old or the new target


def mar_name(version: str, model_name: str = MODEL_NAME) -> str:
    return f"{model_name}-{version}.mar"


@dataclass
class DeployOutcome:
    model_version: str
    previous_version: str | None
    hot_swapped: bool
    server: str | None
    message: str
    seconds: float


def deploy_local(mar: str | Path, model_dir: str | Path, deploy_dir: str | Path, *,
                 feature_repo: str | Path | None = None, evaluation: dict | None = None,
                 model_name: str = MODEL_NAME, server_dir: str | Path | None = None,
                 timeout_s: float = 300.0) -> DeployOutcome:
    """Make `model_dir` (packed as `mar`) the deployed model of `deploy_dir`.

    When a TorchServe started on this deployment (`server_dir`, default DEPLOY/server) is
    running, the new version is hot-swapped in through its management API.
    """
    t0 = time.perf_counter()
    deploy, model_dir, mar = Path(deploy_dir), Path(model_dir), Path(mar)
    meta = json.loads((model_dir / "meta.json").read_text())
    version = meta["model_version"]
    if not mar.is_file():
        raise ReleaseError(f"mar: {mar} is not a file")
    for sub in ("models", "features", "model_store"):
        (deploy / sub).mkdir(parents=True, exist_ok=True)
    previous = deployed_model(deploy)
    prev_v = previous["model_version"] if previous else None

    _copy_tree(model_dir, deploy / "models" / version)
    if feature_repo is not None:
        _copy_tree(Path(feature_repo), deploy / "features" / version)
        _point(deploy / "features" / "current", version)
    store_mar = deploy / "model_store" / mar_name(version, model_name)
    if not store_mar.exists():
        tmp = store_mar.with_name(f".{store_mar.name}.tmp")
        shutil.copyfile(mar, tmp)
        os.replace(tmp, store_mar)

    server = running_server(server_dir or deploy / "server")
    swapped = False
    if server is not None:
        hot_swap(server, model_name, store_mar.name, version, timeout_s=timeout_s)
        swapped = True
    record = {"model_version": version, "model_name": model_name, "mar": store_mar.name,
              "model_dir": str((deploy / "models" / version).resolve()),
              "feature_repo": str((deploy / "features" / version).resolve()) if feature_repo is not None else None,
              "evaluation": evaluation, "deployed_at": _now(), "previous": prev_v}
    _atomic_json(deploy / CURRENT, record)
    _prune(deploy, keep={version, prev_v} - {None}, model_name=model_name)
    msg = (f"deployed {version}" + (f" (was {prev_v})" if prev_v else "")
           + (f"; hot-swapped into TorchServe at {server['management']}" if swapped else "; no TorchServe running"))
    log_event(deploy, {"event": "deploy", "model_version": version, "previous": prev_v, "hot_swapped": swapped})
    return DeployOutcome(version, prev_v, swapped, server["management"] if server else None, msg,
                         time.perf_counter() - t0)


def _prune(deploy: Path, keep: set[str], model_name: str) -> None:
    """Keep the deployed and the previous version (for a manual rollback); drop older ones."""
    for sub in ("models", "features"):
        for p in (deploy / sub).iterdir():
            if p.name not in keep and p.name != "current" and not p.name.startswith(".") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
    for p in (deploy / "model_store").glob(f"{model_name}-*.mar"):
        if p.name not in {mar_name(v, model_name) for v in keep}:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# TorchServe management API

def running_server(server_dir: str | Path) -> dict | None:
    """The state of a live TorchServe started in `server_dir` (serving's state.json), or None."""
    from .serving.torchserve import STATE, _alive

    path = Path(server_dir) / STATE
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    if not info.get("pid") or not _alive(int(info["pid"])):
        return None
    return info


def _auth(server: dict, which: str = "management") -> dict:
    if not server.get("token_auth"):
        return {}
    key_file = Path(server["run_dir"]) / "key_file.json"
    if not key_file.exists():
        raise ReleaseError(f"{key_file} not found: TorchServe runs with token auth but its key file is missing")
    return {"Authorization": f"Bearer {json.loads(key_file.read_text())[which]['key']}"}


def _call(server: dict, method: str, path: str, timeout: float = 60.0) -> tuple[int, object]:
    req = urllib.request.Request(server["management"] + path, method=method, headers=_auth(server))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(errors="replace"), e.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def versions(server: dict, model_name: str = MODEL_NAME) -> list[dict]:
    """Every registered version of `model_name`: [{"modelVersion", "default"?, "workers", ...}]."""
    status, body = _call(server, "GET", f"/models/{model_name}/all")
    if status == 404:
        return []
    if status != 200:
        raise ReleaseError(f"describe {model_name}: HTTP {status}: {body}")
    return body if isinstance(body, list) else [body]


def _default_version(server: dict, model_name: str) -> str | None:
    status, body = _call(server, "GET", f"/models/{model_name}")
    if status != 200 or not body:
        return None
    return body[0].get("modelVersion")


def hot_swap(server: dict, model_name: str, mar_file: str, version: str, *, timeout_s: float = 300.0,
             drain_s: float = 1.0) -> None:
    """Register `mar_file` (in the server's model store) as `version`, make it the default,
    then unregister the other versions once nothing is queued on them."""
    registered = {v.get("modelVersion") for v in versions(server, model_name)}
    if version not in registered:
        q = urllib.parse.urlencode({"url": mar_file, "model_name": model_name, "initial_workers": 1,
                                    "synchronous": "true"})
        status, body = _call(server, "POST", f"/models?{q}", timeout=timeout_s)
        if status != 200:
            raise ReleaseError(f"register {mar_file}: HTTP {status}: {body}")
    status, body = _call(server, "PUT", f"/models/{model_name}/{version}/set-default")
    if status != 200:
        raise ReleaseError(f"set-default {model_name}/{version}: HTTP {status}: {body}")
    if _default_version(server, model_name) != version:
        raise ReleaseError(f"{model_name}/{version} is not the default after set-default")
    for old in sorted(registered - {version, None}):
        _drain(server, model_name, old, timeout_s)
        time.sleep(drain_s)  # a request routed just before set-default may still be in the frontend
        status, body = _call(server, "DELETE", f"/models/{model_name}/{old}", timeout=timeout_s)
        if status not in (200, 404):
            raise ReleaseError(f"unregister {model_name}/{old}: HTTP {status}: {body}")


def _drain(server: dict, model_name: str, version: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = _call(server, "GET", f"/models/{model_name}/{version}")
        if status != 200 or not body:
            return
        pending = (body[0].get("jobQueueStatus") or {}).get("pendingRequests", 0)
        if not pending:
            return
        time.sleep(0.2)


def serve_deployed(deploy_dir: str | Path, *, ports: tuple[int, int, int] = (8080, 8081, 8082),
                   token_auth: bool = True, timeout_s: float = 180.0) -> dict:
    """Start TorchServe on the deployed model of `deploy_dir` (server state in DEPLOY/server)."""
    from .serving import torchserve

    current = deployed_model(deploy_dir)
    if current is None:
        raise ReleaseError(f"nothing is deployed in {deploy_dir} (run the pipeline first)")
    deploy = Path(deploy_dir)
    if running_server(deploy / "server") is not None:
        return running_server(deploy / "server")
    info = torchserve.start(deploy / "model_store", deploy / "server",
                            models=[f"{current['model_name']}={current['mar']}"], ports=ports,
                            token_auth=token_auth, timeout_s=timeout_s)
    return asdict(info)


def stop_deployed(deploy_dir: str | Path) -> bool:
    from .serving import torchserve

    return torchserve.stop(Path(deploy_dir) / "server")


def recommend(deploy_dir: str | Path, body: dict, *, model_name: str = MODEL_NAME,
              timeout_s: float = 30.0) -> tuple[int, object, float]:
    """POST one request to the TorchServe of `deploy_dir`; returns (status, body, round-trip ms)."""
    server = running_server(Path(deploy_dir) / "server")
    if server is None:
        raise ReleaseError(f"no TorchServe is running for {deploy_dir} (`unipinrec pipeline serve --deploy-dir ...`)")
    headers = {"Content-Type": "application/json", **_auth(server, "inference")}
    req = urllib.request.Request(f"{server['inference']}/predictions/{model_name}", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode(errors="replace")
    ms = (time.perf_counter() - t0) * 1000
    try:
        return status, json.loads(text), ms
    except ValueError:
        return status, text, ms
