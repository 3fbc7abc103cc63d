"""The model registry as the serving pod reads it; the layout shared by the TorchServe
Deployment and the KServe InferenceService:

    REGISTRY/unipinrec/<model_version>/model-store/unipinrec.mar
    REGISTRY/unipinrec/<model_version>/model-store/unipinrec.mar.sha256
    REGISTRY/unipinrec/<model_version>/config/config.properties   (KServe's storageUri layout)

`fetch_model` is the serving pod's init container (`python -m unipinrec.serving.registry`): it
copies one version into the pod's model store and checks the SHA-256, so a pod never serves a
half-written or swapped archive. The pipeline side writes versions (immutable) with
`unipinrec.deploy.publish.publish_model`. REGISTRY is a directory (a PVC) or, with the
matching fsspec filesystem installed, a URL (`gs://bucket/models`, `s3://...`).
Standard library only: the init container imports nothing else.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

MODEL_NAME = "unipinrec"  # TorchServe's model name: POST /predictions/unipinrec
# A label value: the version also becomes a pod label, so it obeys the label rules.
_VERSION_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


class RegistryError(ValueError):
    """A version that is not valid, not published, or not what was published."""


def check_model_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise RegistryError(
            f"model_version: {version!r} is not a valid version (1-63 characters of letters, digits, "
            "'-', '_' or '.', starting and ending with a letter or digit)")
    return version


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def version_dir(registry: str | Path, model_version: str, model_name: str = MODEL_NAME) -> str:
    check_model_version(model_version)
    return f"{str(registry).rstrip('/')}/{model_name}/{model_version}"


def atomic_write(dest: Path, write) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open(url: str, mode: str = "rb"):
    if "://" not in url or url.startswith("file://"):
        return open(url.removeprefix("file://"), mode)
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec ships with the platform extras
        raise RegistryError(f"registry: {url} needs fsspec and its filesystem package") from e
    try:
        return fsspec.open(url, mode).open()
    except (ImportError, ValueError) as e:
        raise RegistryError(f"registry: cannot open {url}: {e} (install the fsspec filesystem for this scheme)") from e


def fetch_model(registry: str, model_version: str, dest_dir: str | Path, model_name: str = MODEL_NAME) -> Path:
    """Copy one published archive into `dest_dir` and verify its SHA-256; returns the copy."""
    src = f"{version_dir(registry, model_version, model_name)}/model-store/{model_name}.mar"
    dest = Path(dest_dir) / f"{model_name}.mar"
    try:
        with _open(src + ".sha256", "rb") as f:
            expected = f.read().decode().split()[0]
        with _open(src, "rb") as f:
            atomic_write(dest, lambda out: shutil.copyfileobj(f, out, 1 << 20))
    except FileNotFoundError as e:
        raise RegistryError(f"model_version: {model_version} is not published in {registry} ({e.filename or src})") from e
    got = sha256_of(dest)
    if got != expected:
        dest.unlink()
        raise RegistryError(f"{src}: SHA-256 {got} does not match the published {expected}")
    return dest


def main(argv: list[str] | None = None) -> int:
    """Init-container entry point: fetch MODEL_VERSION from the registry into the model store."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m unipinrec.serving.registry",
                                description="Copy one published model version into a TorchServe model store.")
    p.add_argument("--registry", required=True, help="registry directory (PVC mount) or URL")
    p.add_argument("--model-version", required=True)
    p.add_argument("--dest", required=True, type=Path, help="the pod's model store (an emptyDir)")
    args = p.parse_args(argv)
    try:
        out = fetch_model(args.registry, args.model_version, args.dest)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"fetched {out} ({out.stat().st_size} bytes, SHA-256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
