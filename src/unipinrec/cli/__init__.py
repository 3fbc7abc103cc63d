"""`unipinrec` command line: a thin adapter over the library.

Each command group lives in its own module with a `register(app)` function; heavy imports
(torch, faiss, kfp, feast, great_expectations) happen inside the commands, so `--help` is fast.
"""
from __future__ import annotations

import typer

from . import data, deploy, model, pipeline, serving

app = typer.Typer(
    name="unipinrec",
    help="UniPinRec: one causal transformer for retrieval and ranking — data, training, serving, pipelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (data, model, serving, pipeline, deploy):
    module.register(app)


def main() -> None:
    app()
