"""`kepo demo`: the main job on the embedded default (tiny models, bundled data, CPU)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from kepo.commands.common import output_console
from kepo.commands.sql import print_table


def demo(
    workdir: Annotated[
        Path, typer.Option(help="Run directory (data, models, kepo.duckdb, report.html).")
    ] = Path("work/demo"),
    iterations: Annotated[
        int | None, typer.Option(help="Training iterations per run (default: the demo config's).")
    ] = None,
    student_warmup_steps: Annotated[
        int, typer.Option(help="Warm-up steps of the tiny student.")
    ] = 300,
    teacher_warmup_steps: Annotated[
        int, typer.Option(help="Warm-up steps of the tiny teacher.")
    ] = 300,
) -> None:
    """Curate MiniMedVQA, warm up tiny models, run KEPO and GRPO, evaluate, write the report."""
    console = output_console(width_when_piped=200)
    start = time.perf_counter()
    console.rule("[bold]kepo demo")
    from flows.demo import kepo_demo  # Prefect is imported only when the demo runs
    from flows.server import temporary_api
    from kepo.demo import EXAMPLE_QUERIES
    from kepo.queries import run_query
    from kepo.store import Store

    with temporary_api():
        result = kepo_demo(
            workdir=str(workdir),
            iterations=iterations,
            student_warmup_steps=student_warmup_steps,
            teacher_warmup_steps=teacher_warmup_steps,
        )
    store = Store(result["db"])
    console.rule("[bold]Table 1 (accuracy %, last checkpoint of each run)")
    print_table(run_query(store, "table1"), console)
    console.rule("[bold]In-domain and OOD accuracy per checkpoint")
    print_table(run_query(store, "training_dynamics"), console)
    console.rule("[bold]Exploration")
    exploration = run_query(store, "exploration")
    columns = ["run_id", "iteration", "n_prompts", "n_triggered", "n_accepted", "n_injected"]
    print_table(exploration.select(columns), console)
    elapsed = time.perf_counter() - start
    console.rule("[bold]Done")
    console.print(f"database: [bold]{result['db']}[/bold]")
    console.print(
        f"report:   [bold]{result['report']}[/bold] (open it in a browser; works offline)"
    )
    console.print("try:")
    for name, title in EXAMPLE_QUERIES:
        console.print(f"  # {title}\n  kepo sql --db {result['db']} --query {name}", soft_wrap=True)
    console.print(
        "  # every column of a table, explained\n"
        f'  kepo sql --db {result["db"]} "SELECT column_name, comment FROM duckdb_columns() '
        "WHERE table_name = 'rollouts'\"",
        soft_wrap=True,
    )
    console.print(f"  kepo audit --db {result['db']} --run demo-kepo --iteration 0")
    console.print(f"[bold]total time: {elapsed / 60:.1f} min ({elapsed:.0f} s)[/bold]")
