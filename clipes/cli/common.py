"""What every command shares: user errors as one red line and exit status 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import ClipesError


@contextmanager
def reported_errors(console: Console, *also: type[Exception]) -> Iterator[None]:
    """Turn a ``ClipesError`` (or ``also``) into one message and exit status 2, without a traceback."""
    try:
        yield
    except (ClipesError, *also) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
