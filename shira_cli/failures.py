"""How the `shira` commands report a failure a user can fix: one red line on stderr and exit code 2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Known failures (a model that is not there, a bad option, a worker or server that failed) as one line."""
    from shira_core.errors import ShiraError

    try:
        yield
    except (ShiraError, FileNotFoundError, RuntimeError, ValueError) as e:
        fail(str(e))
