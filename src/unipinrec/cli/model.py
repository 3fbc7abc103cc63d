"""CLI commands: `train` and `evaluate`. Thin glue over unipinrec.train / unipinrec.evaluate."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .common import fail, user_errors

KIND_HELP = "Model kind: unified (default), retrieval_only (SASRec-style), ranking_only, interleaved (2L tokens)."


def train_cmd(
    config: Path = typer.Option(..., "--config", help="Experiment YAML (configs/*.yaml)."),
    overrides: List[str] = typer.Option([], "--set", help="Override a config field: section.key=value, "
                                        "the value YAML (e.g. --set train.lr=2e-3 --set model.dropout=0.1); repeatable."),
    examples: Path = typer.Option(..., "--examples", help="Examples folder from `unipinrec examples build`."),
    out: Path = typer.Option(..., "--out", help="Model folder to write; re-running resumes from its checkpoint."),
    kind: Optional[str] = typer.Option(None, "--kind", help=KIND_HELP),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default: the config's)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Same as --set train.epochs=E (applied last)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Same as --set train.max_steps=N (applied last)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train one model in one stage (loss = retrieval + alpha * ranking); CPU, one GPU, or torchrun DDP."""
    from ..config import load_config
    from ..model_config import KINDS

    if kind is not None and kind not in KINDS:
        fail(f"--kind: {kind!r} is not one of {', '.join(KINDS)}")
    if device is not None and not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        fail(f"--device: {device!r} is not auto, cpu, cuda or cuda:N")
    if not (examples / "meta.json").exists():
        fail(f"--examples: {examples} has no meta.json; build it with `unipinrec examples build`")
    if out.exists() and not out.is_dir():
        fail(f"--out: {out} exists and is not a folder")
    with user_errors(ValueError):
        shortcuts = [f"train.{k}={v}" for k, v in (("epochs", epochs), ("max_steps", max_steps)) if v is not None]
        cfg = load_config(config, [*overrides, *shortcuts])
        from ..train import train

        summary = train(cfg, examples, out, kind=kind, device=device, progress=progress)
    if "model_version" in summary:
        typer.echo(f"wrote {out}: model_version {summary['model_version']}, {summary['steps']} steps, "
                   f"{summary['tokens_per_s']:,.0f} tokens/s on {summary['device']}")


def evaluate_cmd(
    model: Path = typer.Option(..., "--model", help="Model folder from `unipinrec train`."),
    examples: Path = typer.Option(..., "--examples", help="Examples folder to evaluate on."),
    out: Path = typer.Option(..., "--out", help="Metrics JSON to write (a curves PNG is written beside it)."),
    split: Optional[str] = typer.Option(None, "--split", help="train | valid | test (default: the config's)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Retrieval HR/NDCG@K by full ranking, ranking AUC / grouped AUC per task, oracle and popularity references."""
    from ..evaluate import evaluate, plot_curves, write_metrics

    if split is not None and split not in ("train", "valid", "test"):
        fail(f"--split: {split!r} is not one of train, valid, test")
    if not (examples / "meta.json").exists():
        fail(f"--examples: {examples} has no meta.json; build it with `unipinrec examples build`")
    with user_errors(ValueError, KeyError):
        metrics = evaluate(model, examples, split=split, device=device, progress=progress)
    write_metrics(metrics, out)
    if (model / "train_log.csv").exists():
        plot_curves(model, out.with_suffix(".png"))
    r = metrics.get("retrieval", {})
    line = ", ".join(f"{k} {r[k]:.4f}" for k in ("HR@10", "NDCG@10", "recall@100") if k in r)
    for task, m in (metrics.get("ranking") or {}).items():
        if m.get("auc") is not None:
            line += f", AUC[{task}] {m['auc']:.4f}"
    typer.echo(f"wrote {out}: {line}")
    typer.echo(json.dumps({"model_version": metrics["model_version"], "kind": metrics["kind"]}))


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("evaluate")(evaluate_cmd)
