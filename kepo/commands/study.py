"""`kepo study`: the learning-cliff study from one study config (flow: `flows/study.py`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import typer
from rich.console import Console

from kepo.commands.common import output_console
from kepo.commands.sql import print_table

SUMMARY_COLUMNS = ("method", "n_seeds", "checkpoint", "id_mean", "id_sd", "ood_mean", "ood_sd")
ZERO_COLUMNS = ("method", "iteration", "n_prompts", "n_all_zero", "all_zero_rate")
EXPLORATION_COLUMNS = ("method", "iteration", "n_triggered", "n_accepted", "acceptance_rate")


def study(
    config: Annotated[
        Path, typer.Option("--config", help="Study YAML, e.g. configs/study-tiny.yaml.")
    ],
    workdir: Annotated[
        Path | None, typer.Option(help="Study directory (default: the study config's workdir).")
    ] = None,
) -> None:
    """Warm up tiny models once, run every method x seed, evaluate, write one DB and one report."""
    console = output_console(width_when_piped=200)
    from kepo.study import StudyError, load_study

    try:
        spec = load_study(config, workdir=workdir)
    except StudyError as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None
    start = time.perf_counter()
    console.rule(f"[bold]kepo study {spec.name}")
    console.print(
        f"{len(spec.methods)} methods x {len(spec.seeds)} seeds, "
        f"{spec.iterations} iterations each, in-domain {spec.in_domain}"
    )
    from flows.server import temporary_api
    from flows.study import kepo_study  # Prefect is imported only when a study runs
    from kepo.store import Store
    from kepo.study import all_zero_rates, exploration_rates, reference_table, summary_table

    with temporary_api():
        result = kepo_study(config=str(config), workdir=str(workdir) if workdir else None)
    store = Store(result["db"])
    console.rule("[bold]Accuracy % at the last checkpoint (mean, SD over seeds)")
    summary = summary_table(store, spec.name) + reference_table(store, spec.name)
    print_table(_table(summary, SUMMARY_COLUMNS), console)
    console.rule("[bold]All-zero-group rate per iteration (G samples all wrong)")
    print_table(_table(all_zero_rates(store, spec.name), ZERO_COLUMNS), console)
    console.rule("[bold]Exploration per iteration (KEPO)")
    explored = [r for r in exploration_rates(store, spec.name) if r["n_triggered"]]
    print_table(_table(explored, EXPLORATION_COLUMNS), console)
    elapsed = time.perf_counter() - start
    console.rule("[bold]Done")
    console.print(f"database: [bold]{result['db']}[/bold]")
    console.print(f"report:   [bold]{result['report']}[/bold]")
    console.print(f"[bold]total time: {elapsed / 60:.1f} min ({elapsed:.0f} s)[/bold]")


def _table(rows: list[dict], columns: tuple[str, ...]) -> pa.Table:
    """The printed columns of summary rows (rates rounded for the terminal)."""
    rounded = [
        {c: round(r[c], 3) if isinstance(r[c], float) else r[c] for c in columns} for r in rows
    ]
    return pa.Table.from_pylist(rounded) if rounded else pa.table({c: [] for c in columns})
