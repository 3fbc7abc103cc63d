"""CLI: `unipinrec data validate` (registered on the `data` group by cli/data.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import fail, user_errors

CONTRACT_NAMES = ("events", "items", "examples")


def validate_command(
    path: Path = typer.Argument(..., help="Table to validate: a folder of part-*.parquet shards, one shard, a RAW/EX "
                                          "folder holding events/ or items/, or an EX folder (examples: all splits)."),
    contract: str = typer.Option(..., "--contract", "-c", help="events | items | examples."),
    items: Optional[Path] = typer.Option(None, "--items", help="Items table for referential integrity "
                                         "(default: the items/ folder beside the data)."),
    actions: Optional[str] = typer.Option(None, "--actions", help="Action vocabulary: a source name (synthetic, "
                                          "movielens-1m) or comma-separated names by id (default: nearest meta.json)."),
    out: Path = typer.Option(Path("runs/validation"), "--out", help="Folder for <contract>_validation.json/.html "
                             "and GX's raw <contract>_gx_results.json."),
    sample_rows: Optional[int] = typer.Option(None, "--sample-rows", help="Validate about N rows (all rows of a "
                                              "hashed sample of users/items) instead of all."),
    chunk_rows: int = typer.Option(1_000_000, "--chunk-rows", help="Rows handed to GX at a time (bounds memory)."),
    suite: Optional[Path] = typer.Option(None, "--suite", help="Suite JSON to use instead of the built-in contract "
                                         "(e.g. an edited copy of data_contracts/<contract>.json)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar over chunks."),
) -> None:
    """Check a table against its data contract (Great Expectations suite); print which expectations
    failed, on how many rows, with a few offending values; write JSON + HTML reports; exit 1 on failure."""
    if contract not in CONTRACT_NAMES:
        fail(f"--contract must be one of {', '.join(CONTRACT_NAMES)}, got '{contract}'")
    if sample_rows is not None and sample_rows <= 0:
        fail(f"--sample-rows must be positive, got {sample_rows}")
    if chunk_rows <= 0:
        fail(f"--chunk-rows must be positive, got {chunk_rows}")
    if not path.exists():
        fail(f"PATH: {path} does not exist")
    if out.exists() and not out.is_dir():
        fail(f"--out: {out} exists and is not a folder")
    vocab = None
    if actions:
        vocab = actions if "," not in actions else [a.strip() for a in actions.split(",")]
    from ..contracts import validate

    with user_errors(ValueError):
        report = validate(path, contract, items=items, actions=vocab, sample_rows=sample_rows, chunk_rows=chunk_rows,
                          suite=suite, progress=progress)
        paths = report.write(out)
    typer.secho(report.render_text(), fg=None if report.success else typer.colors.RED)
    typer.echo(f"reports: {paths['json']}  {paths['html']}")
    if not report.success:
        raise typer.Exit(1)


def register(data_app: typer.Typer) -> None:
    data_app.command("validate")(validate_command)
