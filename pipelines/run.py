"""Compile and run locally the UniPinRec pipeline (used by `unipinrec pipeline`).

- `compile_pipeline(out)`: IR YAML the Kubeflow UI accepts (Pipelines > Upload).
- `run_local(...)`: kfp's SubprocessRunner in the current environment (use_venv=False), with
  kfp's file cache; a concise line per step on the terminal, everything else in a log file.

Submitting and scheduling runs on a KFP server is `unipinrec.kfp_client` (it takes the
package compiled here).
"""
from __future__ import annotations

import contextlib
import io
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, TextIO

from .pipeline import PIPELINE_NAME, make_pipeline

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ---------------------------------------------------------------------------------------------
# Compile

def compile_pipeline(out: str | Path, *, cluster: bool = False, image: str | None = None, gpus: int = 0,
                     config_yaml: str | None = None, registry_pvc: str = "unipinrec-model-registry") -> Path:
    """Write the pipeline as IR YAML; `image` replaces the project image in every step."""
    from kfp import compiler

    from components._image import PROJECT_IMAGE

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    func = make_pipeline(cluster=cluster, gpus=gpus, registry_pvc=registry_pvc, default_config=config_yaml,
                         image=image)
    compiler.Compiler().compile(func, str(out))
    if image and image != PROJECT_IMAGE:
        text = out.read_text()
        if f"image: {PROJECT_IMAGE}" not in text:
            raise RuntimeError(f"{out}: the project image {PROJECT_IMAGE} is not in the compiled YAML")
        out.write_text(text.replace(f"image: {PROJECT_IMAGE}", f"image: {image}"))
    return out


def component_names(package: str | Path) -> list[str]:
    """The component names in a compiled pipeline (as the Kubeflow UI lists them)."""
    import yaml

    docs = list(yaml.safe_load_all(Path(package).read_text()))
    spec = docs[0]
    return sorted(name.removeprefix("comp-") for name, comp in spec["components"].items()
                  if "executorLabel" in comp)


# ---------------------------------------------------------------------------------------------
# Local run

@dataclass
class StepTime:
    name: str
    status: str = "RUNNING"
    seconds: float = 0.0
    cached: bool = False


@dataclass
class LocalRun:
    status: str  # SUCCESS | FAILURE
    run_dir: Path | None
    log: Path
    seconds: float
    steps: dict[str, StepTime] = field(default_factory=dict)
    error: str | None = None

    def artifact(self, task: str, output: str) -> Path | None:
        if self.run_dir is None:
            return None
        p = self.run_dir / task / output
        return p if p.exists() else None

    def to_dict(self) -> dict:
        return {"status": self.status, "run_dir": str(self.run_dir) if self.run_dir else None, "log": str(self.log),
                "seconds": round(self.seconds, 1), "error": self.error,
                "steps": {k: {"status": v.status, "seconds": round(v.seconds, 1), "cached": v.cached}
                          for k, v in self.steps.items()}}


class _StepLog(io.TextIOBase):
    """Stands in for stdout during a local run: everything goes to the log file; the start and end
    of each task become one line on `echo` (with its wall time)."""

    _start = re.compile(r"Executing task '([^']+)'")
    _end = re.compile(r"Task '([^']+)' finished with status (\w+)")
    _cached = re.compile(r"Task '?([^' ]+)'? cache hit")
    _skipped = re.compile(r"Skipping (?:conditional )?task '?([^' ]+)'?")

    def __init__(self, log: TextIO, echo: Callable[[str], None] | None):
        self.log, self.echo = log, echo
        self.steps: dict[str, StepTime] = {}
        self._t0: dict[str, float] = {}
        self._buf = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.log.write(s)
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._line(_ANSI.sub("", line))
        return len(s)

    def flush(self) -> None:
        self.log.flush()

    def _say(self, text: str) -> None:
        if self.echo:
            self.echo(text)

    def _line(self, line: str) -> None:
        if m := self._start.search(line):
            self._t0[m.group(1)] = time.perf_counter()
            self.steps[m.group(1)] = StepTime(m.group(1))
        elif m := self._end.search(line):
            name, status = m.group(1), m.group(2)
            st = self.steps.setdefault(name, StepTime(name))
            st.status, st.seconds = status, time.perf_counter() - self._t0.get(name, time.perf_counter())
            self._say(f"  {name:<16} {status:<8} {st.seconds:6.1f} s")
        elif m := self._cached.search(line):
            name = m.group(1)
            self.steps[name] = StepTime(name, "SUCCESS", 0.0, cached=True)
            self._say(f"  {name:<16} {'CACHED':<8} {0.0:6.1f} s")
        elif m := self._skipped.search(line):
            name = m.group(1)
            if name not in self.steps:
                self.steps[name] = StepTime(name, "SKIPPED")


@contextlib.contextmanager
def _root_log_to(stream):
    """kfp's orchestrator logs some warnings through the root logger outside its own context."""
    import logging

    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # e.g. "Task ingest cache hit" is logged at INFO
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _newest_run_dir(root: Path, before: set[str]) -> Path | None:
    runs = [p for p in root.glob(f"{PIPELINE_NAME}-*") if p.is_dir() and p.name not in before]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def run_local(arguments: dict[str, Any], *, pipeline_root: str | Path, log_file: str | Path | None = None,
              caching: bool = True, echo: Callable[[str], None] | None = None) -> LocalRun:
    """Run the pipeline here with kfp's SubprocessRunner (no venv per task: this environment)."""
    from kfp import local

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_file) if log_file else root / f"run-{datetime.now():%Y%m%d-%H%M%S}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in root.glob(f"{PIPELINE_NAME}-*")}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True,
               enable_caching=caching, cache_root=str(root / ".kfp_cache"))
    pipeline = make_pipeline()
    t0 = time.perf_counter()
    status, error = "SUCCESS", None
    with open(log_path, "w") as log, warnings.catch_warnings():
        # the local runner warns that the project image and resource settings are not used here
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        tee = _StepLog(log, echo)
        with contextlib.redirect_stdout(tee), _root_log_to(tee):
            try:
                pipeline(**arguments)
            except RuntimeError as e:  # kfp.local raises when a task fails
                status, error = "FAILURE", _ANSI.sub("", str(e))
        tee.flush()
    return LocalRun(status, _newest_run_dir(root, before), log_path, time.perf_counter() - t0, tee.steps, error)
