"""What every stage command shares: the errors a user can act on, printed as one line."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message tells the user what to do (printed without a traceback)."""
    from kepo.config import ConfigError
    from kepo.curate import CurationError
    from kepo.rollout import RolloutError
    from kepo.store import StoreError
    from kepo.train import TrainingDataError

    return (
        ConfigError,
        CurationError,
        RolloutError,
        StoreError,
        TrainingDataError,
        FileNotFoundError,
        ValueError,
    )


def fail(err: BaseException, code: int = 1) -> NoReturn:
    """Print `error: <message>` on stderr and exit with `code`."""
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {err}", markup=True)
    raise typer.Exit(code) from None


def output_console(width_when_piped: int = 1000) -> Console:
    """The console for a command's tables: the terminal's width on a terminal; when the output
    is a pipe or a file, `width_when_piped` columns, so a table keeps one line per row instead
    of rich's 80-column default folding every cell into a column of fragments."""
    return Console(width=None if sys.stdout.isatty() else width_when_piped)
