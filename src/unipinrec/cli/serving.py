"""CLI commands: `index build`, `package`, `serve`. Thin glue over unipinrec.index and
unipinrec.serving.torchserve; heavy imports happen inside the commands."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import List, Optional

import typer

from .common import check_ports, fail, stop_server, user_errors

index_app = typer.Typer(help="The faiss item index over a model's item vectors.", no_args_is_help=True)

DEFAULT_RUN_DIR = Path("runs/torchserve")


def _model_dir(option: str, path: Path) -> Path:
    if not (path / "meta.json").exists():
        fail(f"{option}: {path} is not a model folder (no meta.json); train one with `unipinrec train`")
    return path


@index_app.command("build")
def index_build(
    model: Path = typer.Option(..., "--model", help="Model folder (unified or retrieval_only)."),
    out: Path = typer.Option(..., "--out", help="Index folder to write (index.faiss, ids.npy, meta.json)."),
    kind: str = typer.Option("auto", "--kind", help="auto (exact up to 200k items, else IVF-PQ) | flat | hnsw | ivfpq."),
    examples: Optional[Path] = typer.Option(None, "--examples", help="Examples folder: held-out queries from its "
                                            "test histories and a popularity list for cold starts."),
    k: int = typer.Option(100, "--k", help="K of the recall@K that is tuned and reported."),
    target_recall: float = typer.Option(0.97, "--target-recall", help="Tune the search until recall@K reaches this."),
    queries: int = typer.Option(1000, "--queries", help="Held-out queries (half tune, half measure)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Export item vectors and build the faiss index; prints recall@K against exact search."""
    from ..index import KINDS, build_index_for_model

    _model_dir("--model", model)
    if kind not in KINDS:
        fail(f"--kind: {kind!r} is not one of {', '.join(KINDS)}")
    if k <= 0 or queries < 2:
        fail("--k must be positive and --queries at least 2")
    if not 0 < target_recall <= 1:
        fail(f"--target-recall must be in (0, 1], got {target_recall}")
    if examples is not None and not (examples / "test").exists():
        fail(f"--examples: {examples} has no test/ split; build it with `unipinrec examples build`")
    if out.exists() and not out.is_dir():
        fail(f"--out: {out} exists and is not a folder")
    with user_errors(ValueError, KeyError):
        report = build_index_for_model(model, out, examples_dir=examples, kind=kind, k=k,
                                       target_recall=target_recall, num_queries=queries, progress=progress)
    typer.echo(f"wrote {out}: {report.kind} ({report.factory}) over {report.num_items:,} items x {report.dim}, "
               f"recall@{report.k} {report.recall_at_k:.4f} vs exact, {report.query_ms_per_query:.3f} ms/query "
               f"(exact {report.exact_query_ms_per_query:.3f}), params {report.params}")


def package_cmd(
    model: Path = typer.Option(..., "--model", help="Unified model folder."),
    index: Path = typer.Option(..., "--index", help="Index folder built for --model."),
    out: Path = typer.Option(..., "--out", help="Model store folder to write the .mar archives into."),
    baseline_retrieval: Optional[Path] = typer.Option(None, "--baseline-retrieval",
                                                      help="retrieval_only model: also package the two-model baseline."),
    baseline_ranking: Optional[Path] = typer.Option(None, "--baseline-ranking",
                                                    help="ranking_only model of the two-model baseline."),
    baseline_index: Optional[Path] = typer.Option(None, "--baseline-index",
                                                  help="Index of the baseline retrieval model (default: built now)."),
    recompute: bool = typer.Option(False, "--recompute/--no-recompute",
                                   help="Also package unipinrec_recompute.mar: unified, history re-encoded for ranking."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="TorchServe batchSize (default: serving/model-config.yaml)."),
    max_batch_delay: Optional[int] = typer.Option(
        None, "--max-batch-delay", help="TorchServe maxBatchDelay in ms (at least 1: at 0 TorchServe 0.12 holds "
                                        "each request about 100 ms, bench/torchserve_floor.py)."),
    kv_cache_mb: Optional[int] = typer.Option(None, "--kv-cache-mb", help="Cross-request KV cache size (0 = off)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Workers per model (default 1; more breaks the "
                                          "split retrieve/rank flow, whose handles live in one worker)."),
    torch_threads: Optional[int] = typer.Option(None, "--torch-threads", help="torch intra-op threads per worker "
                                                "(default: torch's; 1 with one worker per core)."),
    store_examples: Optional[Path] = typer.Option(None, "--store-examples",
                                                  help="Examples folder packed as the in-memory online store "
                                                       "(latest test history per user) for requests without a history."),
) -> None:
    """Build unipinrec.mar (weights, index, item table, config) with torch-model-archiver."""
    from ..serving import torchserve as ts

    _model_dir("--model", model)
    if (baseline_retrieval is None) != (baseline_ranking is None):
        fail("--baseline-retrieval and --baseline-ranking go together")
    for option, value in (("--batch-size", batch_size), ("--max-batch-delay", max_batch_delay), ("--workers", workers),
                          ("--torch-threads", torch_threads)):
        if value is not None and value <= 0:
            fail(f"{option} must be positive, got {value}")
    if kv_cache_mb is not None and kv_cache_mb < 0:
        fail(f"--kv-cache-mb must be >= 0, got {kv_cache_mb}")
    engine = {} if kv_cache_mb is None else {"kv_cache_bytes": kv_cache_mb * 2**20}
    if store_examples is not None and not (store_examples / "test").exists():
        fail(f"--store-examples: {store_examples} has no test/ split")
    common = dict(batch_size=batch_size, max_batch_delay_ms=max_batch_delay, workers=workers, torch_threads=torch_threads)
    with user_errors(ValueError, KeyError, ts.ServeError):
        with tempfile.TemporaryDirectory() as tmp:
            written = [ts.build_archive(model, index, out, engine=engine, histories=store_examples, **common)]
            if recompute:
                written.append(ts.build_archive(model, index, out, name="unipinrec_recompute",
                                                engine={**engine, "share_kv": False}, histories=store_examples,
                                                **common))
            if baseline_retrieval is not None:
                _model_dir("--baseline-retrieval", baseline_retrieval)
                _model_dir("--baseline-ranking", baseline_ranking)
                b_index = baseline_index
                if b_index is None:
                    from ..index import build_index_for_model

                    b_index = Path(tmp) / "baseline-index"
                    build_index_for_model(baseline_retrieval, b_index)
                written.append(ts.build_archive(baseline_retrieval, b_index, out, name="unipinrec_baseline",
                                                ranking_dir=baseline_ranking, engine={**engine, "share_kv": False},
                                                histories=store_examples, **common))
    for path in written:
        typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def serve_cmd(
    model_store: Optional[Path] = typer.Option(None, "--model-store", help="Folder of .mar archives (`unipinrec package`)."),
    stop: bool = typer.Option(False, "--stop", help="Stop the server started from --run-dir."),
    run_dir: Path = typer.Option(DEFAULT_RUN_DIR, "--run-dir", help="Server state, config and logs."),
    models: Optional[List[str]] = typer.Option(None, "--model", help="NAME=FILE.mar to load (repeatable; default: all)."),
    port: int = typer.Option(8080, "--port", help="Inference port."),
    management_port: int = typer.Option(8081, "--management-port", help="Management port."),
    metrics_port: int = typer.Option(8082, "--metrics-port", help="Prometheus metrics port."),
    token_auth: bool = typer.Option(True, "--token-auth/--no-token-auth",
                                    help="TorchServe token auth (on by default; keys in RUN_DIR/key_file.json)."),
    timeout: float = typer.Option(180.0, "--timeout", help="Seconds to wait for the models to be ready."),
    runtime: str = typer.Option("torchserve", "--runtime", help="torchserve | kserve (KServe's model server: v1 "
                                "and Open Inference Protocol v2 on --port, no Java)."),
) -> None:
    """Start TorchServe (or, with --runtime kserve, KServe's model server) on 127.0.0.1 with the
    store's archives, wait until ready, print the URLs (or, with --stop, stop it)."""
    from ..serving import torchserve as ts

    if runtime not in ("torchserve", "kserve"):
        fail(f"--runtime must be torchserve or kserve, got {runtime!r}")
    if runtime == "kserve":
        from .serving_kserve import DEFAULT_RUN_DIR as KSERVE_RUN_DIR, serve_kserve

        return serve_kserve(model_store, stop, KSERVE_RUN_DIR if run_dir == DEFAULT_RUN_DIR else run_dir, models,
                            port, token_auth, timeout)
    if stop:
        return stop_server(ts.stop, ts.ServeError, run_dir, "TorchServe")
    check_ports(model_store, port=port, management_port=management_port, metrics_port=metrics_port)
    with user_errors(ts.ServeError):
        info = ts.start(model_store, run_dir, models=models, ports=(port, management_port, metrics_port),
                        token_auth=token_auth, timeout_s=timeout)
    for name in info.models:
        typer.echo(f"{name}: POST {info.inference}/predictions/{name}  (Content-Type: application/json)")
    typer.echo(f"management: {info.management}/models   metrics: {info.metrics}/metrics")
    if token_auth:
        typer.echo(f"token auth is on: keys in {Path(info.run_dir) / 'key_file.json'} (send 'Authorization: Bearer <key>')")
    typer.echo(f"logs: {Path(info.run_dir) / 'logs'}; stop with `unipinrec serve --stop --run-dir {run_dir}`")
    typer.echo(json.dumps({"inference": info.inference, "management": info.management, "metrics": info.metrics}))


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
    app.command("package")(package_cmd)
    app.command("serve")(serve_cmd)
