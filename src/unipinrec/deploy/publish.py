"""Publish a model version into the model registry (the pipeline's deploy step, with the
registry volume mounted). The layout, and the serving pod's fetch, are `unipinrec.serving.registry`.

Versions are immutable: publishing different bytes under an existing version is an error.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..serving.registry import MODEL_NAME, atomic_write, sha256_of, version_dir
from .api import DeployError
from .render import check_model_version
from .torchserve_config import torchserve_config

KSERVE_MODEL_STORE = "/mnt/models/model-store"  # where KServe's storage initializer puts storageUri


def publish_model(mar_path: str | Path, registry_dir: str | Path, model_version: str,
                  model_name: str = MODEL_NAME) -> Path:
    """Copy an archive into the registry under `model_version`; returns the version directory."""
    mar = Path(mar_path)
    if not mar.is_file():
        raise DeployError(f"mar_path: {mar} is not a file (build it with `unipinrec package`)")
    check_model_version(model_version)  # as a DeployError
    root = Path(version_dir(registry_dir, model_version, model_name))
    dest = root / "model-store" / f"{model_name}.mar"
    digest = sha256_of(mar)
    if dest.exists():
        if sha256_of(dest) != digest:
            raise DeployError(f"model_version: {model_version} is already published with a different archive "
                              f"({dest}); versions are immutable, publish under a new version")
    else:
        with open(mar, "rb") as src:
            atomic_write(dest, lambda f: shutil.copyfileobj(src, f, 1 << 20))
    atomic_write(dest.with_name(dest.name + ".sha256"), lambda f: f.write(f"{digest}  {dest.name}\n".encode()))
    config = torchserve_config(KSERVE_MODEL_STORE, model_name=model_name)
    atomic_write(root / "config" / "config.properties", lambda f: f.write(config.encode()))
    return root
