"""`kepo sql`: read-only SQL over a run's DuckDB file, ad hoc or by name from `dashboards/`.

The connection sees the database's tables and nothing else (no files, URLs or extensions; see
`kepo.store`), and only SELECT / EXPLAIN / DESCRIBE / SUMMARIZE statements run.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import typer
from rich.console import Console
from rich.table import Table as RichTable

from kepo.commands.common import output_console
from kepo.queries import named_query, query_names
from kepo.store import Store, StoreError


def _cell(value: object, width: int = 60) -> str:
    text = "NULL" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(result: pa.Table, console: Console, title: str | None = None) -> None:
    table = RichTable(title=title, show_lines=False)
    for name in result.column_names:
        table.add_column(name, overflow="fold")
    for row in result.to_pylist():
        table.add_row(*(_cell(v) for v in row.values()))
    console.print(table)
    console.print(f"[dim]{result.num_rows} row(s)[/dim]")


def sql(
    query: Annotated[str | None, typer.Argument(help="A SELECT statement.")] = None,
    db: Annotated[Path, typer.Option("--db", help="DuckDB file (<workdir>/kepo.duckdb).")] = Path(
        "work/demo/kepo.duckdb"
    ),
    name: Annotated[
        str | None,
        typer.Option("--query", "-q", help="Run dashboards/NAME.sql instead (`--query list`)."),
    ] = None,
    params: Annotated[
        list[str] | None,
        typer.Option(
            "--param", "-p", help="NAME=VALUE for a query's $NAME parameter (repeatable)."
        ),
    ] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    lock_timeout_s: Annotated[
        float, typer.Option(help="Wait this long for a writer to finish.")
    ] = 30.0,
) -> None:
    """Run a read-only query (SELECT/EXPLAIN only) and print the result."""
    err = Console(stderr=True)
    if (query is None) == (name is None):
        err.print("[red]give either a SELECT statement or --query NAME[/red]")
        raise typer.Exit(2)
    if name == "list":
        for known in query_names():
            sys.stdout.write(known + "\n")
        return
    values: dict[str, str] = {}
    for item in params or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            err.print(f"[red]--param {item!r}: write NAME=VALUE, e.g. --param study=tiny[/red]")
            raise typer.Exit(2)
        values[key] = value
    try:
        text = named_query(name) if name else query
        result = Store(db, lock_timeout_s=lock_timeout_s).query(text, values)  # type: ignore[arg-type]
    except StoreError as e:
        err.print(f"[red]error:[/red] {e}", soft_wrap=True)
        raise typer.Exit(1) from None
    except Exception as e:  # duckdb errors: bad column names etc.
        err.print(f"[red]query failed:[/red] {e}", soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        for row in result.to_pylist():
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    elif as_csv:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(result.column_names)
        for row in result.to_pylist():
            writer.writerow(row.values())
        sys.stdout.write(buf.getvalue())
    else:
        print_table(result, output_console(), title=name)
