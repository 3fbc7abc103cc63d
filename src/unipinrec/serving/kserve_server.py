"""A local KServe model server: start it on 127.0.0.1 over a model store, wait until ready, stop.

The server is its own process (`python -m unipinrec.serving.kserve_model`); this module only
launches it and never imports KServe, like serving/torchserve.py for TorchServe. Each server
gets a run folder: state.json (what `stop` reads), logs/server.log, work/ (unpacked archives)
and, with token auth on, the token file (mode 0600) clients send as `Authorization: Bearer`.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .torchserve import STATE, RunState, ServeError, _alive, wait_models



@dataclass
class KServeInfo(RunState):
    inference: str  # base URL: POST {inference}/v1/models/NAME:predict, {inference}/v2/models/NAME/infer
    models: list
    pid: int | None = None
    token_file: str | None = None

    STARTED_BY = "`unipinrec serve --runtime kserve`"

    def headers(self) -> dict:
        if not self.token_file:
            return {}
        return {"Authorization": f"Bearer {Path(self.token_file).read_text().strip()}"}


def _models(store: Path, models: list[str] | None) -> dict[str, Path]:
    if not store.is_dir():
        raise ServeError(f"--model-store {store} is not a folder")
    specs = models if models is not None else [f"{p.stem}={p.name}" for p in sorted(store.glob("*.mar"))]
    if not specs:
        raise ServeError(f"no .mar archives in {store} (build one with `unipinrec package`)")
    out = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ServeError(f"--model: expected NAME=FILE.mar, got {spec!r}")
        path = store / file
        if not path.exists():
            raise ServeError(f"--model {spec}: {path} not found")
        out[name] = path
    return out


def start(model_store: str | Path, run_dir: str | Path, *, models: list[str] | None = None, port: int = 8080,
          host: str = "127.0.0.1", token_auth: bool = True, timeout_s: float = 180.0, batch_size: int | None = None,
          max_batch_delay_ms: float | None = None, workers: int | None = None) -> KServeInfo:
    """Start KServe's model server with the store's archives (or `models`, NAME=FILE) and wait
    until every model is ready."""
    archives = _models(Path(model_store).resolve(), models)
    run = Path(run_dir).resolve()
    if (run / STATE).exists():
        old = KServeInfo.load(run)
        if old.pid and _alive(old.pid):
            raise ServeError(f"a server from {run} is still running (pid {old.pid}): "
                             "`unipinrec serve --runtime kserve --stop` first")
    (run / "logs").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "unipinrec.serving.kserve_model", "--host", host, "--http-port", str(port),
           "--work-dir", str(run / "work"), *[f"--model={n}={p}" for n, p in archives.items()]]
    token_file = None
    if token_auth:
        token_file = run / "token"
        token_file.touch(mode=0o600, exist_ok=True)
        token_file.chmod(0o600)
        token_file.write_text(secrets.token_urlsafe(32) + "\n")
        cmd += ["--token-file", str(token_file)]
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    if max_batch_delay_ms is not None:
        cmd += ["--max-batch-delay", str(max_batch_delay_ms)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    with open(run / "logs" / "server.log", "ab") as log:
        proc = subprocess.Popen(cmd, cwd=run, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    info = KServeInfo(str(run), f"http://{host}:{port}", list(archives), proc.pid,
                      str(token_file) if token_file else None)
    info.save()
    try:
        wait_ready(info, timeout_s, proc)
    except ServeError:
        stop(run)
        raise
    return info


def wait_ready(info: KServeInfo, timeout_s: float = 180.0, proc: subprocess.Popen | None = None) -> None:
    logs = Path(info.run_dir) / "logs"

    def failure(_pending: list[str]) -> str | None:
        if (proc is not None and proc.poll() is not None) or (info.pid and not _alive(info.pid)):
            return f"the KServe model server exited; see {logs / 'server.log'}"
        return None

    wait_models(list(info.models), lambda name: _model_ready(info, name), failure, timeout_s, 0.3, logs)


def _model_ready(info: KServeInfo, name: str) -> bool:
    with urllib.request.urlopen(f"{info.inference}/v2/models/{name}/ready", timeout=2) as r:
        return r.status == 200


def stop(run_dir: str | Path, timeout_s: float = 30.0) -> bool:
    """SIGTERM the server of `run_dir` (uvicorn drains in-flight requests), SIGKILL after
    `timeout_s`. Returns False when none was recorded."""
    run = Path(run_dir).resolve()
    try:
        info = KServeInfo.load(run)
    except ServeError:
        return False
    if info.pid and _alive(info.pid):
        os.kill(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(info.pid) and time.monotonic() < deadline:
            try:  # reap it when it is our own child
                os.waitpid(info.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        if _alive(info.pid):
            os.kill(info.pid, signal.SIGKILL)
    (run / STATE).unlink(missing_ok=True)
    return info.pid is not None
