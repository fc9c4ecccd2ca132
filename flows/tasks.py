"""The Prefect tasks of kepo, one per stage, each one call into `kepo/`, defined once.

Tasks pass handles (database path, run id, iteration, folders), never tensors or tables. Every
stage task goes through `kepo.pipeline.run_stage` (lease + `stages` bookkeeping), the same
runner the `kepo rollout / train / eval` commands use. Retries only where I/O can be flaky
(loading shards from disk into the store).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from flows.helpers import database_writer
from flows.runners import fail_once
from kepo.config import load_config
from kepo.pipeline import PlannedStage, execute, run_stage, shard_dir
from kepo.run import Run


def open_run(db: str, run_id: str) -> Run:
    return Run.open(db, run_id)


def _execute(db: str, run_id: str, planned: PlannedStage) -> Any:
    """Run one stage holding the database's writer slot (`flows.helpers.database_writer`; the
    store lease of `kepo.pipeline.run_stage` keeps one writer per stage in any case)."""
    with database_writer(db):
        return execute(open_run(db, run_id), planned)


@task(name="curate", task_run_name="curate-{run_id}")
def curate_task(db: str, run_id: str) -> str:
    """The run's curation stage (reuses the curated data when current); returns its folder."""
    _execute(db, run_id, PlannedStage(0, "curate"))
    return str(open_run(db, run_id).config.data.out_dir)


@task(name="rollout", task_run_name="rollout-{run_id}-{iteration}")
def rollout_task(db: str, run_id: str, iteration: int) -> int:
    """The rollout stage of one iteration; returns the number of prompts committed."""
    result = _execute(db, run_id, PlannedStage(iteration, "rollout"))
    return result.n_prompts


@task(name="rollout-shard", task_run_name="rollout-{run_id}-{iteration}-shard-{shard_index}")
def rollout_shard_task(
    db: str, run_id: str, iteration: int, shard_index: int, n_shards: int
) -> str:
    """Roll out one shard of the iteration's prompts into Parquet files; returns their folder."""
    from kepo.rollout import rollout_shard

    run = open_run(db, run_id)
    out = shard_dir(run, iteration, shard_index)
    fail_once(shard_index, out)  # a test hook (KEPO_FAIL_SHARD_ONCE); no-op otherwise
    return str(rollout_shard(run, iteration, shard_index, n_shards, out))


@task(
    name="commit-shards",
    task_run_name="commit-{run_id}-{iteration}",
    retries=2,
    retry_delay_seconds=2,
)
def commit_task(db: str, run_id: str, iteration: int, shard_dirs: list[str]) -> int:
    """Load every shard of the iteration into the store in one transaction (the rollout stage)."""
    from kepo.pipeline import commit_rollout

    run = open_run(db, run_id)
    with database_writer(db):
        run_stage(
            run,
            iteration,
            "rollout",
            lambda: commit_rollout(run, iteration, [Path(d) for d in shard_dirs]),
        )
    return len(shard_dirs)


@task(name="evaluate-shard", task_run_name="evaluate-{run_id}-{version}-shard-{shard_index}")
def evaluate_shard_task(
    db: str, run_id: str, version: int, shard_index: int, n_shards: int
) -> list[str]:
    """Evaluate one shard's modalities of policy `version` (each commits as it finishes);
    returns them."""
    from kepo.evaluate import evaluate_shard

    return evaluate_shard(open_run(db, run_id), version, shard_index, n_shards).evaluated_modalities


@task(name="train", task_run_name="train-{run_id}-{iteration}")
def train_task(db: str, run_id: str, iteration: int) -> str:
    """Train policy `iteration` into `iteration + 1`; returns the checkpoint folder."""
    result = _execute(db, run_id, PlannedStage(iteration, "train"))
    return str(result.checkpoint_dir)


@task(name="evaluate", task_run_name="evaluate-{run_id}-{version}")
def evaluate_task(db: str, run_id: str, version: int) -> dict[str, float]:
    """Evaluate policy `version` on every modality; returns accuracy per modality."""
    result = _execute(db, run_id, PlannedStage(version, "evaluate"))
    return {row["modality"]: row["accuracy"] for row in result.metrics}


@task(name="curate-data")
def curate_data_task(config: str, overrides: dict) -> str:
    """Build or reuse the curated data of a config before any run exists (demo, study)."""
    from kepo.curate import ensure_curated

    cfg = load_config(config, overrides=overrides)
    return str(ensure_curated(cfg.data, progress=True).out_dir)


@task(name="report")
def report_task(db: str, out: str) -> str:
    """The self-contained HTML report of every run in the database."""
    from kepo.report import build_report

    return str(build_report(Path(db), Path(out)))
