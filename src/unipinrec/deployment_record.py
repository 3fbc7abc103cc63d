"""The deployment record: which model version is live, and what happened before. The only
module that reads or writes it; the gate, the local hot swap (`release`) and the Kubernetes
rollout (`deploy.rollout.release_model`) all go through `DeploymentRecord`.

    DEPLOY/current.json            the deployed version: model, archive, feature repo, evaluation, previous
    DEPLOY/history.jsonl           one line per gate decision and per deployment
    DEPLOY/models/<version>/       model folders (the gate evaluates the deployed one)
    DEPLOY/features/<version>/     feature repos; features/current -> the deployed one
    DEPLOY/model_store/unipinrec-<version>.mar
    DEPLOY/server/                 a local TorchServe started on this folder (`release.serve_deployed`)

A deployment is two steps: `stage` copies the model (and archive, feature repo) into the
folder while the old version still serves; `commit` makes it current once it is live, logs
it and drops versions older than the previous one (kept for a manual rollback). A reader
never sees a half-copied folder or a half-written current.json.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .serving.registry import MODEL_NAME

CURRENT, HISTORY = "current.json", "history.jsonl"


class RecordError(RuntimeError):
    pass


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_model_version(model_dir: str | Path) -> str:
    """The model_version in MODEL/meta.json."""
    path = Path(model_dir) / "meta.json"
    if not path.is_file():
        raise RecordError(f"model_dir: {path} not found (a model folder from `unipinrec train`)")
    return json.loads(path.read_text())["model_version"]


def mar_name(version: str, model_name: str = MODEL_NAME) -> str:
    return f"{model_name}-{version}.mar"


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


@dataclass(frozen=True)
class Staged:
    """A version copied into the deployment folder, not yet current."""
    model_version: str
    model_dir: Path
    mar: Path  # in DEPLOY/model_store
    feature_repo: Path | None


class DeploymentRecord:
    def __init__(self, root: str | Path, *, model_name: str = MODEL_NAME):
        self.root, self.model_name = Path(root), model_name

    @property
    def model_store(self) -> Path:
        return self.root / "model_store"

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    def current(self) -> dict | None:
        """The current.json record of the deployed model, or None when nothing is deployed."""
        path = self.root / CURRENT
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: not valid JSON ({e})") from e

    def history(self) -> list[dict]:
        path = self.root / HISTORY
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def last(self, event: str) -> dict | None:
        """The newest history entry of kind `event` ("gate", "deploy", ...), or None."""
        return next((e for e in reversed(self.history()) if e.get("event") == event), None)

    def log(self, event: str, **fields) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / HISTORY, "a") as f:
            f.write(json.dumps({"at": _now(), "event": event, **fields}, default=str) + "\n")

    def stage(self, model_dir: str | Path, mar: str | Path, *, feature_repo: str | Path | None = None) -> Staged:
        """Copy the model folder, its archive and (optionally) its feature repo into the folder;
        features/current then points at the new repo (the packaged server reads it there)."""
        model_dir, mar = Path(model_dir), Path(mar)
        version = read_model_version(model_dir)
        if not mar.is_file():
            raise RecordError(f"mar: {mar} is not a file")
        for sub in ("models", "features", "model_store"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        _copy_tree(model_dir, self.root / "models" / version)
        features = None
        if feature_repo is not None:
            features = self.root / "features" / version
            _copy_tree(Path(feature_repo), features)
            _point(self.root / "features" / "current", version)
        store_mar = self.model_store / mar_name(version, self.model_name)
        if not store_mar.exists():
            tmp = store_mar.with_name(f".{store_mar.name}.tmp")
            shutil.copyfile(mar, tmp)
            os.replace(tmp, store_mar)
        return Staged(version, self.root / "models" / version, store_mar, features)

    def commit(self, staged: Staged, *, target: str, evaluation: dict | None = None, **event) -> dict:
        """Make a staged version current (it is live on `target`: local | kubernetes), log the
        deployment with `event`'s fields, keep only it and the previous version."""
        previous = self.current()
        prev_v = previous["model_version"] if previous else None
        record = {"model_version": staged.model_version, "model_name": self.model_name, "mar": staged.mar.name,
                  "model_dir": str(staged.model_dir.resolve()),
                  "feature_repo": str(staged.feature_repo.resolve()) if staged.feature_repo else None,
                  "target": target, "evaluation": evaluation, "deployed_at": _now(), "previous": prev_v}
        tmp = self.root / f".{CURRENT}.tmp"
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, self.root / CURRENT)
        self._prune(keep={staged.model_version, prev_v} - {None})
        self.log("deploy", model_version=staged.model_version, previous=prev_v, target=target, **event)
        return record

    def _prune(self, keep: set[str]) -> None:
        for sub in ("models", "features"):
            for p in (self.root / sub).iterdir():
                if p.name not in keep and p.name != "current" and not p.name.startswith(".") and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
        for p in self.model_store.glob(f"{self.model_name}-*.mar"):
            if p.name not in {mar_name(v, self.model_name) for v in keep}:
                p.unlink(missing_ok=True)
