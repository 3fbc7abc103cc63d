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


def stop_server(stop, error: type[BaseException], run_dir, what: str) -> None:
    """`serve --stop`: stop the server recorded in run_dir and say so."""
    with user_errors(error):
        stopped = stop(run_dir)
    typer.echo(f"{what} stopped." if stopped else f"no server recorded in {run_dir}")


def check_ports(model_store, **ports: int) -> None:
    """`serve`'s shared checks: a model store is given, each port is a TCP port (named as its option)."""
    if model_store is None:
        fail("--model-store is required (or --stop)")
    for option, value in ports.items():
        if not 0 < value < 65536:
            fail(f"--{option.replace('_', '-')} must be a TCP port, got {value}")
