"""`kepo eval`: evaluate a run's checkpoint, or any local model folder, on the curated test split.

    kepo eval --db work/run/kepo.duckdb --run kepo-tiny --checkpoint 2
    kepo eval --db work/base/kepo.duckdb --run base-2b --model models/Qwen3-VL-2B --config configs/x.yaml

The second form registers the run from the config (run id from --run), with the model folder as
its initial student when the iteration is 0 (the default), and evaluates that folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table as RichTable

from kepo.commands.common import fail, output_console, user_errors
from kepo.config import load_config
from kepo.run import Run
from kepo.store import Store


def evaluate_command(
    db: Annotated[Path, typer.Option("--db", help="DuckDB file (<workdir>/kepo.duckdb).")],
    run_id: Annotated[str, typer.Option("--run", help="Run id to evaluate into.")],
    checkpoint: Annotated[
        int | None,
        typer.Option("--checkpoint", "-k", help="Policy version of the run (0 = initial student)."),
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Evaluate this local model folder instead.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Run config (YAML); required with --model.")
    ] = None,
    iteration: Annotated[
        int | None,
        typer.Option("--iteration", help="With --model: the iteration to record (default 0)."),
    ] = None,
    max_items: Annotated[
        int | None,
        typer.Option("--max-items", help="Override eval.max_items_per_modality."),
    ] = None,
    discard_stale: Annotated[
        bool,
        typer.Option(
            "--discard-stale",
            help="With --model: drop the run's rows that the new config contradicts.",
        ),
    ] = False,
) -> None:
    """Evaluate one policy version on every modality of the test split; writes eval tables."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run, version = _open(db, run_id, checkpoint, model, config, iteration, discard_stale)
        if max_items is not None:
            run.config.eval.max_items_per_modality = max_items
        from kepo.evaluate import evaluate
        from kepo.pipeline import run_stage

        started = time.perf_counter()
        result = run_stage(
            run, version, "evaluate", lambda: evaluate(run, version, model_path=model)
        )
        total_s = time.perf_counter() - started
    except user_errors() as e:
        fail(e)

    table = RichTable(title=f"{run.run_id} · checkpoint {version} · {run.config.method_label}")
    for name in ("modality", "in-domain", "n", "accuracy %", "95 % CI"):
        table.add_column(name)
    for row in result.metrics:
        table.add_row(
            row["modality"],
            "yes" if row["in_domain"] else "",
            str(row["n"]),
            f"{100 * row['accuracy']:.2f}",
            f"{100 * row['ci_low']:.1f}–{100 * row['ci_high']:.1f}",
        )
    console = output_console(200)
    console.print(table)
    if result.skipped_modalities:
        console.print(f"resumed: kept {', '.join(result.skipped_modalities)} from the store")
    rate = result.items_per_second
    if rate is not None:
        console.print(
            f"{result.n_generated} items in {result.generation_seconds:.1f} s "
            f"({rate:.2f} items/s; {total_s:.1f} s with model loading)"
        )


def _open(
    db: Path,
    run_id: str,
    checkpoint: int | None,
    model: Path | None,
    config: Path | None,
    iteration: int | None,
    discard_stale: bool = False,
) -> tuple[Run, int]:
    if model is None:
        if config is not None or iteration is not None:
            raise ValueError("--config and --iteration go with --model; use --checkpoint K alone")
        if checkpoint is None:
            raise ValueError("give --checkpoint K (policy version), or --model DIR --config CFG")
        return Run.open(db, run_id), checkpoint
    if checkpoint is not None:
        raise ValueError(
            "give either --checkpoint (a run's policy) or --model (a folder), not both"
        )
    if config is None:
        raise ValueError("--model needs --config CFG: the run is registered from that config")
    if not model.is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder (a local Hugging Face model)")
    version = 0 if iteration is None else iteration
    if version < 0:
        raise ValueError(f"--iteration must be >= 0, got {version}")
    overrides: dict[str, object] = {"run_id": run_id}
    if version == 0:
        overrides["models.student"] = str(model)
    cfg = load_config(config, overrides)
    store = Store(db, lock_timeout_s=cfg.store.lock_timeout_s)
    # Refuses settings (e.g. another --model) that contradict the run's stored rows.
    return Run.create(cfg, store=store, discard_stale=discard_stale), version
