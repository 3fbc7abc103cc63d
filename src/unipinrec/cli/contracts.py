"""CLI: `unipinrec data validate` (registered on the `data` group by cli/data.py)."""
from __future__ import annotations

import typer


def register(data_app: typer.Typer) -> None:
    pass
