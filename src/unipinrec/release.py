"""Local release: put a model version live in a TorchServe on this machine.

What the pipeline's `deploy` step does with deploy_mode local (the Kubernetes rollout is
`deploy.rollout.release_model`). The deployment folder and its record belong to
`deployment_record`; this module stages a version there, and when a TorchServe started on the
folder (`serve_deployed`, state in DEPLOY/server) is running, hot-swaps it in through the
management API: the new version is registered and loaded while the old one keeps answering,
made the default, and the old one is unregistered once its queue is empty, so no request is
dropped. Then the record is committed.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from .deployment_record import MODEL_NAME, DeploymentRecord


class ReleaseError(RuntimeError):
    pass


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
                 model_name: str = MODEL_NAME, timeout_s: float = 300.0) -> DeployOutcome:
    """Make `model_dir` (packed as `mar`) the deployed model of `deploy_dir`, hot-swapping it
    into the TorchServe running on that folder, if any."""
    t0 = time.perf_counter()
    record = DeploymentRecord(deploy_dir, model_name=model_name)
    staged = record.stage(model_dir, mar, feature_repo=feature_repo)
    server = running_server(record.server_dir)
    if server is not None:
        hot_swap(server, model_name, staged.mar.name, staged.model_version, timeout_s=timeout_s)
    prev_v = record.commit(staged, target="local", evaluation=evaluation, hot_swapped=server is not None)["previous"]
    msg = (f"deployed {staged.model_version}" + (f" (was {prev_v})" if prev_v else "")
           + (f"; hot-swapped into TorchServe at {server['management']}" if server else "; no TorchServe running"))
    return DeployOutcome(staged.model_version, prev_v, server is not None, server["management"] if server else None,
                         msg, time.perf_counter() - t0)


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

    record = DeploymentRecord(deploy_dir)
    current = record.current()
    if current is None:
        raise ReleaseError(f"nothing is deployed in {deploy_dir} (run the pipeline first)")
    if running_server(record.server_dir) is not None:
        return running_server(record.server_dir)
    info = torchserve.start(record.model_store, record.server_dir,
                            models=[f"{current['model_name']}={current['mar']}"], ports=ports,
                            token_auth=token_auth, timeout_s=timeout_s)
    return asdict(info)


def stop_deployed(deploy_dir: str | Path) -> bool:
    from .serving import torchserve

    return torchserve.stop(DeploymentRecord(deploy_dir).server_dir)


def recommend(deploy_dir: str | Path, body: dict, *, model_name: str = MODEL_NAME,
              timeout_s: float = 30.0) -> tuple[int, object, float]:
    """POST one request to the TorchServe of `deploy_dir`; returns (status, body, round-trip ms)."""
    server = running_server(DeploymentRecord(deploy_dir).server_dir)
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
