"""CLI commands: `deploy`, `publish-model`. Thin glue over unipinrec.deploy (a retraining run is
`unipinrec pipeline submit`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import fail, user_errors


def _overlay_dir(overlay: str, manifests: Path) -> Path:
    path = Path(overlay)
    if path.is_dir():
        return path
    named = manifests / "overlays" / overlay
    if named.is_dir():
        return named
    fail(f"--overlay: {overlay!r} is neither a folder nor an overlay under {manifests / 'overlays'}")
    raise AssertionError  # fail() exits


def deploy(
    overlay: str = typer.Option(..., "--overlay", help="Overlay name (dev, prod: manifests/overlays/NAME) or a kustomization folder."),
    model_version: str = typer.Option(..., "--model-version", help="The model_version to serve (MODEL/meta.json; published with `unipinrec publish-model`)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the rendered objects with the version set; touch no cluster."),
    plan: bool = typer.Option(False, "--plan", help="Connect, print what would change, apply nothing."),
    manifests: Path = typer.Option(Path("manifests"), "--manifests", help="The manifests folder holding overlays/."),
    context: Optional[str] = typer.Option(None, "--context", help="kubeconfig context (default: in-cluster, else current)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for each rollout."),
    smoke_request: Optional[Path] = typer.Option(None, "--smoke-request", help="JSON file: the request body for the smoke test."),
    smoke_attempts: int = typer.Option(3, "--smoke-attempts", help="Smoke requests sent through the Service."),
    check_version: bool = typer.Option(True, "--check-version/--no-check-version", help="Require answers to name the new model_version."),
) -> None:
    """Deploy a model version: server-side apply, wait for the rollout, smoke-test through the
    Service, roll back to the previous version on failure. Exit 0 only when the new version is live."""
    from ..deploy import DeployError, KubernetesApi, SmokeRequest, deploy_model, dump_objects, render, with_model_version

    if timeout <= 0 or smoke_attempts < 1:
        fail("--timeout must be positive and --smoke-attempts at least 1")
    overlay_dir = _overlay_dir(overlay, manifests)
    with user_errors(DeployError):
        objects = render(overlay_dir)
        if dry_run:
            typer.echo(dump_objects(with_model_version(objects, model_version)), nl=False)
            return
        body = None
        if smoke_request is not None:
            try:
                body = json.loads(smoke_request.read_text())
            except ValueError as e:
                fail(f"--smoke-request: {smoke_request} is not JSON: {e}")
        smoke = SmokeRequest(attempts=smoke_attempts, check_version=check_version,
                             **({"body": body} if body is not None else {}))
        result = deploy_model(None, model_version, KubernetesApi(context=context), objects=objects,
                              timeout_s=timeout, smoke_request=smoke, plan_only=plan)
    for line in result.log:
        typer.echo(line)
    if not result.ok:
        fail(f"{result.status}: {result.message}")


def publish_model(
    mar: Path = typer.Option(..., "--mar", help="The archive from `unipinrec package` (unipinrec.mar)."),
    registry: Path = typer.Option(..., "--registry", help="Registry folder (the model-registry PVC, mounted)."),
    model_version: str = typer.Option(..., "--model-version", help="Version to publish under (immutable)."),
) -> None:
    """Publish an archive to the model registry: model-store/unipinrec.mar (+ SHA-256) and the
    KServe config/config.properties under REGISTRY/unipinrec/VERSION/."""
    from ..deploy import DeployError
    from ..deploy import publish_model as publish

    with user_errors(DeployError):
        out = publish(mar, registry, model_version)
    typer.echo(f"published {model_version} at {out}")


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy)
    app.command("publish-model")(publish_model)
