"""`kepo train`: one training iteration of a run (policy version k -> k + 1).

    kepo train --db work/run/kepo.duckdb --run kepo-tiny --iteration 0

Several processes or GPUs: set `train.launcher: accelerate` and `train.num_processes: N` in the
run's config; this command then launches the N processes itself (kepo/launch.py), holding the
stage's lease and recording it like every other stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kepo.commands.common import fail, user_errors


def train_command(
    db: Annotated[Path, typer.Option("--db", help="DuckDB file (<workdir>/kepo.duckdb).")],
    run_id: Annotated[str, typer.Option("--run", help="Run id.")],
    iteration: Annotated[
        int, typer.Option("--iteration", "-k", help="Iteration k: trains policy k into k + 1.")
    ],
) -> None:
    """Train one iteration on the iteration's stored rollouts and write the next checkpoint."""
    from kepo.pipeline import PlannedStage, execute
    from kepo.run import Run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not db.exists():
        fail(f"{db}: no such database; pass the run's <workdir>/kepo.duckdb", 2)
    try:
        result = execute(Run.open(db, run_id), PlannedStage(iteration, "train"))
    except user_errors() as exc:
        fail(exc)
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    Console().print(
        f"run {result.run_id} iteration {result.iteration}: {result.n_steps} steps "
        f"({result.n_skipped} skipped), {result.n_sequences} sequences, {result.n_tokens} tokens, "
        f"final loss {loss}, {result.wall_time_s:.1f} s -> policy version "
        f"{result.policy_version} in {result.checkpoint_dir}"
    )
