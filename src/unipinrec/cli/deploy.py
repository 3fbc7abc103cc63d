"""CLI commands: deploy. Registered by `unipinrec.cli`."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
