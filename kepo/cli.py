"""The `kepo` command line. Sub-commands live in `kepo/commands/`; this module only wires them."""

from __future__ import annotations

import typer

from kepo.commands import sql as sql_cmd

app = typer.Typer(
    name="kepo",
    help="KEPO post-training pipeline: curate, roll out, train, evaluate, audit (tables in DuckDB).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)



@app.callback()
def _root() -> None:
    """KEPO post-training pipeline: curate, roll out, train, evaluate, audit (tables in DuckDB)."""


app.command("sql")(sql_cmd.sql)
# Sub-command groups and commands are registered below, one line each.


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
