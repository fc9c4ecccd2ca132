"""`kepo audit`: the whole story of one rollout prompt (samples, trigger, hint, attempts, injection).

kepo audit --db work/run/kepo.duckdb --run kepo-tiny --iteration 0 --prompt Q123
kepo audit --db work/run/kepo.duckdb --run kepo-tiny --iteration 0          # list the prompts
kepo audit ... --prompt Q123 --json                                         # one JSON document
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kepo.audit import iteration_overview, prompt_story, render_overview, render_story
from kepo.commands.common import output_console
from kepo.store import Store, StoreError


def audit(
    db: Annotated[Path, typer.Option("--db", help="DuckDB file (<workdir>/kepo.duckdb).")],
    run_id: Annotated[str, typer.Option("--run", help="Run id.")],
    iteration: Annotated[int, typer.Option("--iteration", "-k", help="Rollout iteration.")],
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt", "-p", help="Prompt (question) id; omit to list the iteration's prompts."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    full: Annotated[
        bool, typer.Option("--full", help="With --json: keep token ids and per-token log-probs.")
    ] = False,
    width: Annotated[int, typer.Option(help="Characters of each completion shown in tables.")] = 70,
    lock_timeout_s: Annotated[
        float, typer.Option(help="Wait this long for a writer to finish.")
    ] = 30.0,
) -> None:
    """Audit one prompt of a rollout: its samples, trigger decision, hint, attempts and injection."""
    err = Console(stderr=True)
    store = Store(db, lock_timeout_s=lock_timeout_s)
    try:
        if not store.path.exists():
            raise StoreError(f"{db}: no such database; pass the run's <workdir>/kepo.duckdb")
        store.run_config(run_id)  # an unknown run id: names the registered ones
        if prompt is None:
            rows = iteration_overview(store, run_id, iteration)
            if not rows:
                raise StoreError(f"run {run_id!r} has no rollout for iteration {iteration}")
            if as_json:
                sys.stdout.write(json.dumps(rows, default=str, indent=2) + "\n")
            else:
                render_overview(
                    rows, output_console(200), f"run {run_id} iteration {iteration}: prompts"
                )
            return
        story = prompt_story(store, run_id, iteration, prompt, full=full)
    except StoreError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps(story, default=str, indent=2) + "\n")
    else:
        render_story(story, output_console(200), width=width)
