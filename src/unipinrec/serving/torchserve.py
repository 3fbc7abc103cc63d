"""Model archives and a local TorchServe: build `.mar` files, start, wait until ready, stop.

TorchServe runs as its own processes (a Java frontend and Python workers); this module only
launches them (`torchserve` and `torch-model-archiver` executables beside the interpreter) and
never imports TorchServe. Each server gets a run folder holding its config.properties, logs,
pid file (TorchServe keeps it in $TMPDIR, so each run folder has its own) and a state.json
that `stop` reads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from .handler_support import SERVING_JSON

REPO_SERVING_DIR = Path(__file__).resolve().parents[3] / "serving"
STATE = "state.json"


class ServeError(RuntimeError):
    pass


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise ServeError(f"{name} not found: install the platform extra (pip install -e '.[platform]')")
    return found


SERVING_FILES = ("handler.py", "config.properties", "model-config.yaml", "metrics.yaml", "log4j2.xml")


def serving_dir(path: str | Path | None = None) -> Path:
    """The serving/ folder: the given one, else the repository's (editable install), else
    ./serving in the working directory (the images install the package non-editable and copy
    serving/ beside their working directory)."""
    candidates = [Path(path)] if path else [REPO_SERVING_DIR, Path.cwd() / "serving"]
    for d in candidates:
        missing = [name for name in SERVING_FILES if not (d / name).exists()]
        if not missing:
            return d
    raise ServeError(f"{candidates[0] / missing[0]} is missing (the serving/ folder of the repository; "
                     "run from a directory that holds serving/)")


def _copy_model(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for name in ("model.safetensors", "config.yaml", "items.parquet", "meta.json"):
        if not (src / name).exists():
            raise FileNotFoundError(f"{src / name} not found: is {src} a unipinrec model folder?")
        shutil.copy2(src / name, dst / name)


def build_archive(model_dir: str | Path, index_dir: str | Path, store_dir: str | Path, *, name: str = "unipinrec",
                  ranking_dir: str | Path | None = None, engine: dict | None = None,
                  histories: str | Path | None = None, store: dict | None = None,
                  batch_size: int | None = None, max_batch_delay_ms: int | None = None,
                  workers: int | None = None, torch_threads: int | None = None,
                  serving: str | Path | None = None) -> Path:
    """Write STORE/NAME.mar holding handler, model(s), index and serving.json.

    `workers` sets min/maxWorkers (more than one breaks the split flow: handles are per
    worker); `torch_threads` sets each worker's intra-op threads (default: torch's).
    `histories`: an examples folder whose test split is packed as the in-memory online store
    (each user's latest history), for requests that carry no history; `store` instead names an
    external store ({"factory": "module:function", "kwargs": {...}}).

    Checks before packing what a worker would otherwise find at load time: the index belongs
    to the (retrieval) model, and the heads fit (one model with both; or a retrieval + a ranking model).
    """
    from .engine import EngineConfig

    model_dir, index_dir, store_dir = Path(model_dir), Path(index_dir), Path(store_dir)
    meta = _checked_models(model_dir, index_dir, ranking_dir)
    EngineConfig(**(engine or {})).validate()
    sdir = serving_dir(serving)
    store_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="unipinrec-mar-") as tmp:
        stage = Path(tmp) / "files"
        _copy_model(model_dir, stage / "model")
        if ranking_dir is not None:
            _copy_model(Path(ranking_dir), stage / "ranking")
        shutil.copytree(index_dir, stage / "index")
        if histories is not None:
            shutil.copytree(Path(histories) / "test", stage / "store" / "test")
            store = {"kind": "examples", "path": "store", "split": "test"}
        spec = {"engine": engine or {}, "ranking": ranking_dir is not None, "store": store, "torch_threads": torch_threads,
                "model_version": meta["model_version"], "kind": meta["kind"]}
        (stage / SERVING_JSON).write_text(json.dumps(spec, indent=2) + "\n")
        cfg_path = _model_config(sdir, Path(tmp), batch_size, max_batch_delay_ms, workers)
        cmd = [_bin("torch-model-archiver"), "--model-name", name, "--version", meta["model_version"],
               "--handler", str(sdir / "handler.py"), "--extra-files", str(stage), "--config-file", str(cfg_path),
               "--export-path", str(store_dir), "--force"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise ServeError(f"torch-model-archiver failed: {res.stderr.strip() or res.stdout.strip()}")
    return store_dir / f"{name}.mar"


def _checked_models(model_dir: Path, index_dir: Path, ranking_dir) -> dict:
    """The model's meta.json, once the index belongs to it and the heads fit (one model with
    both; or a retrieval + a ranking model)."""
    from ..model_config import ModelConfig

    meta = json.loads((model_dir / "meta.json").read_text()) if (model_dir / "meta.json").exists() else None
    if meta is None:
        raise FileNotFoundError(f"{model_dir / 'meta.json'} not found: is {model_dir} a unipinrec model folder?")
    idx_meta_path = index_dir / "meta.json"
    if not idx_meta_path.exists():
        raise FileNotFoundError(f"{idx_meta_path} not found: build the index with `unipinrec index build`")
    idx_version = json.loads(idx_meta_path.read_text()).get("model_version")
    if idx_version != meta["model_version"]:
        raise ValueError(f"index {index_dir} was built for model_version {idx_version!r}, the model is "
                         f"{meta['model_version']!r}: rebuild the index")
    heads = ModelConfig(kind=meta["kind"])  # what the kind's heads are, from meta.json alone
    if ranking_dir is None and not (heads.has_retrieval_head and heads.has_ranking_head):
        raise ValueError(f"{model_dir} is a {meta['kind']} model: serving one model needs a unified one "
                         "(or give a ranking model for the two-model baseline)")
    if ranking_dir is not None:
        rmeta = json.loads((Path(ranking_dir) / "meta.json").read_text())
        if not heads.has_retrieval_head or not ModelConfig(kind=rmeta["kind"]).has_ranking_head:
            raise ValueError(f"two-model serving needs a retrieval model and a ranking model, got "
                             f"{meta['kind']} and {rmeta['kind']}")
    return meta


def _model_config(sdir: Path, tmp: Path, batch_size, max_batch_delay_ms, workers) -> Path:
    """The serving folder's model-config.yaml with the given batching and workers -> its path."""
    import yaml

    mcfg = yaml.safe_load((sdir / "model-config.yaml").read_text()) or {}
    if batch_size is not None:
        mcfg["batchSize"] = batch_size
    if max_batch_delay_ms is not None:
        mcfg["maxBatchDelay"] = max_batch_delay_ms
    if workers is not None:
        mcfg["minWorkers"] = mcfg["maxWorkers"] = workers
    cfg_path = tmp / "model-config.yaml"
    cfg_path.write_text(yaml.safe_dump(mcfg, sort_keys=False))
    return cfg_path


# --- a local server ----------------------------------------------------------------------------


@dataclass
class RunState:
    """A local server's state.json in its run folder: what `stop` and clients read."""

    run_dir: str

    STARTED_BY = "`unipinrec serve`"

    def save(self) -> None:
        (Path(self.run_dir) / STATE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: str | Path):
        p = Path(run_dir) / STATE
        if not p.exists():
            raise ServeError(f"no server state in {run_dir} (was it started with {cls.STARTED_BY}?)")
        return cls(**json.loads(p.read_text()))


@dataclass
class ServerInfo(RunState):
    inference: str
    management: str
    metrics: str
    models: list
    pid: int | None = None
    token_auth: bool = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(sdir: Path, run_dir: Path, ports: tuple[int, int, int]) -> Path:
    """config.properties for this run: our ports, an absolute metrics_config, and the gRPC
    endpoints (which TorchServe always starts; a taken port makes it exit) on free ports."""
    out = []
    keys = {"inference_address": ports[0], "management_address": ports[1], "metrics_address": ports[2]}
    for line in (sdir / "config.properties").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in keys:
            line = f"{key}=http://127.0.0.1:{keys[key]}"
        elif key == "metrics_config":
            line = f"metrics_config={(sdir / 'metrics.yaml').resolve()}"
        if key.startswith("grpc_"):
            continue
        out.append(line)
    out += ["grpc_inference_address=127.0.0.1", f"grpc_inference_port={free_port()}",
            "grpc_management_address=127.0.0.1", f"grpc_management_port={free_port()}"]
    path = run_dir / "config.properties"
    path.write_text("\n".join(out) + "\n")
    return path


def _env(run_dir: Path) -> dict:
    env = dict(os.environ)
    tmp = run_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    # TorchServe's pid file lives in $TMPDIR: one per run folder, so servers never collide.
    env.update(TMPDIR=str(tmp), LOG_LOCATION=str(run_dir / "logs"), METRICS_LOCATION=str(run_dir / "logs"))
    # serving/log4j2.xml: the rotated files hold everything; the console (launcher.log) nothing
    env.setdefault("UNIPINREC_CONSOLE_LOG_LEVEL", "off")
    return env


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def start(model_store: str | Path, run_dir: str | Path, *, models: list[str] | None = None,
          ports: tuple[int, int, int] = (8080, 8081, 8082), token_auth: bool = True,
          serving: str | Path | None = None, timeout_s: float = 180.0) -> ServerInfo:
    """Start TorchServe on 127.0.0.1 with every `.mar` of the store (or `models`, NAME=FILE),
    wait until each model has a READY worker, and return the URLs."""
    store = Path(model_store).resolve()
    if not store.is_dir():
        raise ServeError(f"--model-store {store} is not a folder")
    if models is None:
        models = [f"{p.stem}={p.name}" for p in sorted(store.glob("*.mar"))]
    if not models:
        raise ServeError(f"no .mar archives in {store} (build one with `unipinrec package`)")
    run = Path(run_dir).resolve()
    if (run / STATE).exists():
        try:
            old = ServerInfo.load(run)
            if old.pid and _alive(old.pid):
                raise ServeError(f"a server from {run} is still running (pid {old.pid}): `unipinrec serve --stop` first")
        except (ValueError, TypeError):
            pass
    run.mkdir(parents=True, exist_ok=True)
    (run / "logs").mkdir(exist_ok=True)
    sdir = serving_dir(serving)
    cfg = render_config(sdir, run, ports)
    cmd = [_bin("torchserve"), "--start", "--ncs", "--model-store", str(store), "--models", *models,
           "--ts-config", str(cfg), "--log-config", str((sdir / "log4j2.xml").resolve()), "--enable-model-api"]
    if not token_auth:
        cmd.append("--disable-token-auth")
    log = open(run / "logs" / "launcher.log", "ab")
    log_from = _size(run / "logs" / "ts_log.log")  # a reused run folder keeps earlier runs' lines
    subprocess.run(cmd, cwd=run, env=_env(run), stdout=log, stderr=subprocess.STDOUT, check=False, timeout=60)
    pid_file = run / "tmp" / ".model_server.pid"
    pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
    info = ServerInfo(str(run), f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}",
                      f"http://127.0.0.1:{ports[2]}", [m.split("=", 1)[0] for m in models], pid, token_auth)
    info.save()
    try:
        wait_ready(info, timeout_s, log_from=log_from)
    except ServeError:
        stop(run)
        raise
    return info


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (our own child, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _headers(info: ServerInfo) -> dict:
    if not info.token_auth:
        return {}
    key_file = Path(info.run_dir) / "key_file.json"
    if not key_file.exists():
        return {}
    keys = json.loads(key_file.read_text())
    return {"Authorization": f"Bearer {keys['management']['key']}"}


def wait_ready(info: ServerInfo, timeout_s: float = 180.0, log_from: int | None = None) -> None:
    """Until each model has a READY worker; a ServeError as soon as TorchServe exits, or its log
    (from byte `log_from`, default its end now) says a model could not be registered or its
    worker failed to load it (TorchServe would retry that worker forever)."""
    logs = Path(info.run_dir) / "logs"
    path = logs / "ts_log.log"
    log = _LogTail(path, _size(path) if log_from is None else log_from)

    def failure(pending: list[str]) -> str | None:
        if info.pid and not _alive(info.pid):
            return f"TorchServe exited; see {logs}"
        return _load_failure(log.new_lines(), pending, logs)

    wait_models(list(info.models), lambda name: _worker_ready(info, name), failure, timeout_s, 0.5, logs)


def _worker_ready(info: "ServerInfo", name: str) -> bool:
    req = urllib.request.Request(f"{info.management}/models/{name}", headers=_headers(info))
    with urllib.request.urlopen(req, timeout=2) as r:
        desc = json.loads(r.read())
    return any(w.get("status") == "READY" for m in desc for w in m.get("workers", []))


def wait_models(pending: list[str], probe, failure, timeout_s: float, interval_s: float, logs) -> None:
    """Poll until `probe(name) -> bool` finds every model of `pending` ready (a connection error
    counts as not ready); a ServeError as soon as `failure(still pending)` names one, or at the
    timeout. The one wait of both servers (TorchServe's workers, KServe's models)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        why = failure(pending)
        if why:
            raise ServeError(why)
        pending = [name for name in pending if not _probe(probe, name)]
        if not pending:
            return
        time.sleep(interval_s)
    raise ServeError(f"models {pending} not ready after {timeout_s:.0f} s; see {logs}")


def _probe(probe, name: str) -> bool:
    try:
        return bool(probe(name))
    except (urllib.error.URLError, OSError, ValueError):
        return False


class _LogTail:
    """The complete lines a log file gained since the last call (from the start after a rotation)."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset = path, offset

    def new_lines(self) -> list[str]:
        try:
            if self.path.stat().st_size < self.offset:
                self.offset = 0
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(4 * 2**20)
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].decode("utf-8", errors="replace").splitlines()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


_REGISTER_FAILED = re.compile(r"Failed to load model: (\S+)")
_WORKER_FAILED = re.compile(r"Load model failed: ([^,\s]+), error: (.*)")
_PY_ERROR = re.compile(r"MODEL_LOG - ((?:\w+\.)*\w*(?:Error|Exception)\b.*)$")


def _load_failure(lines: list[str], pending: list[str], logs: Path) -> str | None:
    """What TorchServe's log says went wrong with a model we wait for, or None."""
    for i, line in enumerate(lines):
        if m := _REGISTER_FAILED.search(line):
            cause = lines[i + 1].strip() if i + 1 < len(lines) else "see the log"
            return f"TorchServe could not register {m.group(1)}: {cause}; see {logs / 'ts_log.log'}"
        if (m := _WORKER_FAILED.search(line)) and m.group(1) in pending:
            return (f"model {m.group(1)}: its worker failed to load it ({m.group(2).strip()}): "
                    f"{_last_python_error(logs / 'model_log.log') or 'no Python error logged'}; "
                    f"see {logs / 'model_log.log'}")
    return None


def _last_python_error(path: Path, wait_s: float = 15.0) -> str | None:
    """The last 'SomeError: message' line the workers logged (their traceback's last line),
    waiting up to `wait_s` for it: the frontend's log can say a worker died before the worker's
    own log has its traceback (two appenders, each flushed on its own), and on a loaded machine
    TorchServe stopped reading a dying worker's stderr before its traceback, which then comes
    only from the retry it starts a second later (seen in the full suite on 2 cores)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 2**16))
                tail = f.read().decode("utf-8", errors="replace").splitlines()
        except OSError:
            tail = []
        errors = [m.group(1) for line in tail if (m := _PY_ERROR.search(line))]
        if errors or time.monotonic() >= deadline:
            return errors[-1] if errors else None
        time.sleep(0.1)


def stop(run_dir: str | Path, timeout_s: float = 60.0) -> bool:
    """Stop the server of `run_dir` and wait until its frontend and workers are gone.
    Returns False when none was running."""
    run = Path(run_dir).resolve()
    try:
        info = ServerInfo.load(run)
    except ServeError:
        return False
    workers = _children(info.pid) if info.pid else []
    subprocess.run([_bin("torchserve"), "--stop"], cwd=run, env=_env(run), capture_output=True, timeout=60)
    deadline = time.monotonic() + timeout_s
    for pid in ([info.pid] if info.pid else []) + workers:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    was_running = info.pid is not None
    (run / STATE).unlink(missing_ok=True)
    return was_running


def _children(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001  (psutil missing or process gone)
        return []
