"""The model registry layout shared by the TorchServe Deployment and the KServe InferenceService.

    REGISTRY/unipinrec/<model_version>/model-store/unipinrec.mar
    REGISTRY/unipinrec/<model_version>/model-store/unipinrec.mar.sha256
    REGISTRY/unipinrec/<model_version>/config/config.properties   (KServe's storageUri layout)

`publish_model` writes a version (the pipeline's deploy component, with the registry PVC
mounted); versions are immutable: publishing different bytes under an existing version is an
error. `fetch_model` is the serving pod's init container: it copies one version into the pod's
model store and checks the SHA-256, so a pod never serves a half-written or swapped archive.
REGISTRY is a directory (a PVC) or, with the matching fsspec filesystem installed, a URL
(`gs://bucket/models`, `s3://...`).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .api import DeployError
from .render import check_model_version
from .torchserve_config import MODEL_NAME, torchserve_config

KSERVE_MODEL_STORE = "/mnt/models/model-store"  # where KServe's storage initializer puts storageUri


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def version_dir(registry: str | Path, model_version: str, model_name: str = MODEL_NAME) -> str:
    check_model_version(model_version)
    return f"{str(registry).rstrip('/')}/{model_name}/{model_version}"


def _atomic_write(dest: Path, write) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_model(mar_path: str | Path, registry_dir: str | Path, model_version: str,
                  model_name: str = MODEL_NAME) -> Path:
    """Copy an archive into the registry under `model_version`; returns the version directory."""
    mar = Path(mar_path)
    if not mar.is_file():
        raise DeployError(f"mar_path: {mar} is not a file (build it with `unipinrec package`)")
    root = Path(version_dir(registry_dir, model_version, model_name))
    dest = root / "model-store" / f"{model_name}.mar"
    digest = sha256_of(mar)
    if dest.exists():
        if sha256_of(dest) != digest:
            raise DeployError(f"model_version: {model_version} is already published with a different archive "
                              f"({dest}); versions are immutable, publish under a new version")
    else:
        with open(mar, "rb") as src:
            _atomic_write(dest, lambda f: shutil.copyfileobj(src, f, 1 << 20))
    _atomic_write(dest.with_name(dest.name + ".sha256"), lambda f: f.write(f"{digest}  {dest.name}\n".encode()))
    config = torchserve_config(KSERVE_MODEL_STORE, model_name=model_name)
    _atomic_write(root / "config" / "config.properties", lambda f: f.write(config.encode()))
    return root


def _open(url: str, mode: str = "rb"):
    if "://" not in url or url.startswith("file://"):
        return open(url.removeprefix("file://"), mode)
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec ships with the platform extras
        raise DeployError(f"registry: {url} needs fsspec and its filesystem package") from e
    try:
        return fsspec.open(url, mode).open()
    except (ImportError, ValueError) as e:
        raise DeployError(f"registry: cannot open {url}: {e} (install the fsspec filesystem for this scheme)") from e


def fetch_model(registry: str, model_version: str, dest_dir: str | Path, model_name: str = MODEL_NAME) -> Path:
    """Copy one published archive into `dest_dir` and verify its SHA-256; returns the copy."""
    src = f"{version_dir(registry, model_version, model_name)}/model-store/{model_name}.mar"
    dest = Path(dest_dir) / f"{model_name}.mar"
    try:
        with _open(src + ".sha256", "rb") as f:
            expected = f.read().decode().split()[0]
        with _open(src, "rb") as f:
            _atomic_write(dest, lambda out: shutil.copyfileobj(f, out, 1 << 20))
    except FileNotFoundError as e:
        raise DeployError(f"model_version: {model_version} is not published in {registry} ({e.filename or src})") from e
    got = sha256_of(dest)
    if got != expected:
        dest.unlink()
        raise DeployError(f"{src}: SHA-256 {got} does not match the published {expected}")
    return dest


def main(argv: list[str] | None = None) -> int:
    """Init-container entry point: fetch MODEL_VERSION from the registry into the model store."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m unipinrec.deploy.registry",
                                description="Copy one published model version into a TorchServe model store.")
    p.add_argument("--registry", required=True, help="registry directory (PVC mount) or URL")
    p.add_argument("--model-version", required=True)
    p.add_argument("--dest", required=True, type=Path, help="the pod's model store (an emptyDir)")
    args = p.parse_args(argv)
    try:
        out = fetch_model(args.registry, args.model_version, args.dest)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"fetched {out} ({out.stat().st_size} bytes, SHA-256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
