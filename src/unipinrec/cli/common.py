"""Shared CLI helpers: how errors reach the user (message naming the field, exit code 1)."""
from __future__ import annotations

from contextlib import contextmanager

import typer


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors(*kinds: type[BaseException]):
    """Turn expected errors (bad input, missing files) into a one-line message and exit 1."""
    from ..config import ConfigError
    from ..format import FormatError

    try:
        yield
    except (ConfigError, FormatError, FileNotFoundError, *kinds) as e:
        fail(str(e))
