"""`kepo run` (a whole run through the `kepo-run` flow), `kepo rollout`, and `kepo config show`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from kepo.commands.common import fail, output_console, user_errors
from kepo.config import ConfigError, RunConfig, describe_fields, load_config

config_app = typer.Typer(help="Inspect run configurations.", no_args_is_help=True)


def parse_overrides(items: list[str] | None) -> dict:
    """`key.path=value` pairs; values are parsed as YAML (numbers, booleans, null, lists)."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(
                f"--set {item!r}: use key.path=value, e.g. rollout.group_size=4"
            )
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def run(
    config: Annotated[
        Path, typer.Argument(help="Run config (YAML), e.g. configs/tiny/kepo-tau1.yaml.")
    ],
    iterations: Annotated[
        int | None, typer.Option(help="Iterations to run (default: the config's).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting: key.path=value (repeatable)."),
    ] = None,
    discard_stale: Annotated[
        bool,
        typer.Option(
            "--discard-stale",
            help="When changed settings contradict stored rows: drop those rows and recompute.",
        ),
    ] = False,
) -> None:
    """Run (or resume) a whole run as the Prefect flow `kepo-run`: curation, then iterations."""
    overrides = parse_overrides(set_)
    try:
        cfg = load_config(config, overrides=overrides)
    except ConfigError as err:
        fail(err, 2)
    from kepo.pipeline import check_models
    from kepo.run import Run

    try:
        check_models(cfg)  # before any stage starts
        Run.create(cfg, discard_stale=discard_stale)  # refuses settings that contradict rows
    except user_errors() as err:
        fail(err)
    from flows.iteration import kepo_run
    from flows.server import temporary_api

    try:
        with temporary_api():
            db = kepo_run(str(config), iterations=iterations, overrides=overrides)
    except user_errors() as err:
        fail(err)
    Console().print(f"database: {db}")


def rollout(
    db: Annotated[Path, typer.Option("--db", help="DuckDB file of the run directory.")],
    run_id: Annotated[str, typer.Option("--run", help="Run id.")],
    iteration: Annotated[int, typer.Option("--iteration", help="Iteration to roll out.")],
) -> None:
    """Run the rollout stage of one iteration of a registered run (replaces its rows)."""
    from kepo.pipeline import PlannedStage, execute
    from kepo.run import Run

    try:
        result = execute(Run.open(db, run_id), PlannedStage(iteration, "rollout"))
    except user_errors() as err:
        fail(err)
    Console().print(result.summary())


@config_app.command("show")
def show(
    config: Annotated[
        Path | None, typer.Argument(help="A config to resolve; omit to list every setting.")
    ] = None,
) -> None:
    """Print every setting with its default and description, or a config fully resolved."""
    console = output_console(200)
    if config is not None:
        try:
            cfg = load_config(config)
        except ConfigError as err:
            Console(stderr=True).print(f"[red]{err}[/red]")
            raise typer.Exit(2) from None
        console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return
    table = Table(title="RunConfig settings")
    for col in ("setting", "default", "description"):
        table.add_column(col, overflow="fold")
    for name, default, desc in describe_fields(RunConfig):
        table.add_row(name, default, desc)
    console.print(table)
