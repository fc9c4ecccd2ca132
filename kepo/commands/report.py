"""`kepo report`: the self-contained HTML report of a database's runs (see kepo/report.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kepo.store import StoreError


def report_command(
    db: Annotated[Path, typer.Option("--db", help="DuckDB file (<workdir>/kepo.duckdb).")],
    out: Annotated[Path, typer.Option("--out", help="HTML file to write.")] = Path("report.html"),
    runs: Annotated[
        str | None, typer.Option("--runs", help="Comma-separated run ids (default: all).")
    ] = None,
) -> None:
    """Write one HTML file (no network needed) with Table 1, Figure 2 and the stage curves."""
    from kepo.report import build_report

    selected = [r.strip() for r in runs.split(",") if r.strip()] if runs else None
    try:
        path = build_report(db, out, runs=selected)
    except StoreError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    Console().print(f"report written to {path}")
