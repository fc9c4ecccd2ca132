"""Prefect flows of a run: one iteration (the `kepo-iteration` deployment) and a whole run.

Thin wrappers: a flow is a sequence of the typed stage tasks of `flows/tasks.py`, skipping the
stages `kepo.pipeline.is_done` vouches for.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger

from flows.helpers import forward_kepo_logs, publish_iteration_artifacts
from flows.runners import shard_placement, task_runner_for
from flows.tasks import (
    commit_task,
    curate_task,
    evaluate_shard_task,
    evaluate_task,
    open_run,
    rollout_shard_task,
    rollout_task,
    train_task,
)
from kepo.config import load_config
from kepo.pipeline import PlannedStage, check_models, is_done, iteration_plan, run_plan
from kepo.run import Run

DEFAULT_WORKDIR = os.environ.get("KEPO_WORKDIR", "work/demo")


@flow(name="rollout-shards")
def rollout_shards_flow(db: str, run_id: str, iteration: int, n_shards: int) -> list[str]:
    """The shard tasks of one rollout, under the task runner of `rollout.task_runner`."""
    rollout = open_run(db, run_id).config.rollout
    shard_task = rollout_shard_task.with_options(retries=rollout.shard_retries)
    with shard_placement(rollout):
        futures = [shard_task.submit(db, run_id, iteration, i, n_shards) for i in range(n_shards)]
    return [f.result() for f in futures]


@flow(name="evaluate-shards")
def evaluate_shards_flow(db: str, run_id: str, version: int, n_shards: int) -> list[str]:
    """The evaluation shard tasks of one policy version, under `rollout.task_runner`."""
    rollout = open_run(db, run_id).config.rollout
    shard_task = evaluate_shard_task.with_options(retries=rollout.shard_retries)
    with shard_placement(rollout):
        futures = [shard_task.submit(db, run_id, version, i, n_shards) for i in range(n_shards)]
    return [m for f in futures for m in f.result()]


def sharded_rollout(db: str, run_id: str, iteration: int, n_shards: int) -> None:
    """Fan the rollout out over `n_shards` shard tasks (in-process or on Ray), then commit once."""
    rollout = open_run(db, run_id).config.rollout
    shards_flow = rollout_shards_flow.with_options(task_runner=task_runner_for(rollout))
    commit_task(db, run_id, iteration, shards_flow(db, run_id, iteration, n_shards))


def sharded_evaluation(db: str, run_id: str, version: int, n_shards: int) -> None:
    """Evaluate the modalities in `n_shards` shard tasks; the evaluate stage then finds them
    stored (same weights) and writes the metrics of all modalities."""
    rollout = open_run(db, run_id).config.rollout
    shards_flow = evaluate_shards_flow.with_options(task_runner=task_runner_for(rollout, n_shards))
    shards_flow(db, run_id, version, n_shards)


def run_planned(db: str, run: Run, planned: PlannedStage) -> None:
    """The task of one planned stage (fanned out over shard tasks where the config asks)."""
    run_id, k, cfg = run.run_id, planned.iteration, run.config
    if planned.stage == "curate":
        curate_task(db, run_id)
    elif planned.stage == "rollout" and cfg.rollout.shards > 1:
        sharded_rollout(db, run_id, k, cfg.rollout.shards)
    elif planned.stage == "rollout":
        rollout_task(db, run_id, k)
    elif planned.stage == "train":
        train_task(db, run_id, k)
    else:
        if cfg.eval.shards > 1:
            sharded_evaluation(db, run_id, k, cfg.eval.shards)
        evaluate_task(db, run_id, k)


@flow(name="kepo-iteration", log_prints=True)
def kepo_iteration(
    run_id: str, iteration: int, workdir: str = DEFAULT_WORKDIR, resume: bool = True
) -> list[str]:
    """One KEPO iteration of a registered run: rollout -> train -> evaluate (every N iterations)."""
    forward_kepo_logs()
    logger = get_run_logger()
    db = str(Path(workdir) / "kepo.duckdb")
    run = Run.open(db, run_id)
    done: list[str] = []
    for planned in iteration_plan(run, iteration):
        if resume and is_done(run, planned.iteration, planned.stage):
            logger.info(
                "%s of iteration %d already succeeded; skipping", planned.stage, planned.iteration
            )
            continue
        run_planned(db, run, planned)
        done.append(f"{planned.stage}-{planned.iteration}")
    publish_iteration_artifacts(workdir, run_id, iteration)
    return done


@flow(name="kepo-run", log_prints=True)
def kepo_run(
    config: str,
    iterations: int | None = None,
    overrides: dict | None = None,
    discard_stale: bool = False,
) -> str:
    """A whole run from a YAML config: curation if needed, then iterations, resuming where it stopped.

    Refuses before any stage when a model folder is missing, or when changed settings contradict
    the run's stored rows (`discard_stale=True` drops those rows and recomputes them).
    """
    forward_kepo_logs()
    logger = get_run_logger()
    cfg = load_config(config, overrides=overrides)
    check_models(cfg)
    run = Run.create(cfg, discard_stale=discard_stale)
    db = str(run.store.path)
    plan = run_plan(run, iterations)
    todo = [p for p in plan if not is_done(run, p.iteration, p.stage)]
    if todo and len(todo) < len(plan):
        logger.info(
            "resuming run %s at %s of iteration %d", cfg.run_id, todo[0].stage, todo[0].iteration
        )
    for planned in todo:
        run_planned(db, run, planned)
    return db
