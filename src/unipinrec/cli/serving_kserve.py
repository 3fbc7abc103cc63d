"""`unipinrec serve --runtime kserve`: KServe's model server on 127.0.0.1 (thin glue over
unipinrec.serving.kserve_server; `serve` in cli/serving.py hands over to `serve_kserve`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .common import check_ports, stop_server, user_errors

DEFAULT_RUN_DIR = Path("runs/kserve")


def serve_kserve(model_store: Optional[Path], stop: bool, run_dir: Path, models: Optional[List[str]], port: int,
                 token_auth: bool, timeout: float) -> None:
    from ..serving import kserve_server as ks

    if stop:
        return stop_server(ks.stop, ks.ServeError, run_dir, "KServe model server")
    check_ports(model_store, port=port)
    with user_errors(ks.ServeError, ValueError):
        info = ks.start(model_store, run_dir, models=models, port=port, token_auth=token_auth, timeout_s=timeout)
    for name in info.models:
        typer.echo(f"{name}: POST {info.inference}/v1/models/{name}:predict  (the TorchServe body; "
                   f"Content-Type: application/json)")
        typer.echo(f"{name}: POST {info.inference}/v2/models/{name}/infer  (Open Inference Protocol v2)")
    typer.echo(f"ready: {info.inference}/v2/models/<name>/ready   metrics: {info.inference}/metrics")
    if info.token_file:
        typer.echo(f"token auth is on: token in {info.token_file} (send 'Authorization: Bearer <token>')")
    typer.echo(f"logs: {Path(info.run_dir) / 'logs'}; stop with `unipinrec serve --runtime kserve --stop "
               f"--run-dir {run_dir}`")
    typer.echo(json.dumps({"inference": info.inference, "runtime": "kserve"}))
