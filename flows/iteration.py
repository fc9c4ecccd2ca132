"""Prefect flows of a run: one iteration (the `kepo-iteration` deployment) and a whole run.

Thin wrappers: every task is one call into `kepo.pipeline`, and tasks pass only ids and paths.
Retries are set only where I/O can be flaky (loading shards from disk into the store).
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.helpers import forward_kepo_logs, publish_iteration_artifacts, writer_slot
from flows.runners import fail_once, shard_placement, task_runner_for
from kepo.config import load_config
from kepo.pipeline import PlannedStage, execute, is_done, iteration_plan, run_plan
from kepo.run import Run

DEFAULT_WORKDIR = os.environ.get("KEPO_WORKDIR", "work/demo")


def _open(workdir: str, run_id: str) -> Run:
    return Run.open(Path(workdir) / "kepo.duckdb", run_id)


@task(name="stage", task_run_name="{stage}-{iteration}")
def stage_task(workdir: str, run_id: str, iteration: int, stage: str) -> str:
    """Run one stage of one iteration (rollout / train / evaluate / curate)."""
    run = _open(workdir, run_id)
    with writer_slot(workdir):
        execute(run, PlannedStage(iteration, stage))  # type: ignore[arg-type]
    return f"{run_id}/{iteration}/{stage}"


@task(name="rollout-shard", task_run_name="rollout-{iteration}-shard-{shard_index}")
def rollout_shard_task(
    workdir: str, run_id: str, iteration: int, shard_index: int, n_shards: int
) -> str:
    """Roll out one shard of the iteration's prompts into Parquet files; returns their folder."""
    from kepo.rollout import rollout_shard

    run = _open(workdir, run_id)
    out = (
        run.workdir / "shards" / run_id / f"iteration-{iteration:04d}" / f"shard-{shard_index:03d}"
    )
    fail_once(shard_index, out)
    return str(rollout_shard(run, iteration, shard_index, n_shards, out))


@task(name="commit-shards", retries=2, retry_delay_seconds=2)
def commit_shards_task(workdir: str, run_id: str, iteration: int, shard_dirs: list[str]) -> int:
    """Load every shard of the iteration into the store in one transaction."""
    from kepo.pipeline import run_stage
    from kepo.rollout import commit_shards

    run = _open(workdir, run_id)
    with writer_slot(workdir):
        run_stage(
            run,
            iteration,
            "rollout",
            lambda: commit_shards(run, iteration, [Path(d) for d in shard_dirs]),
        )
    return len(shard_dirs)


@flow(name="rollout-shards")
def rollout_shards_flow(workdir: str, run_id: str, iteration: int, n_shards: int) -> list[str]:
    """The shard tasks of one rollout, under the task runner of `rollout.task_runner`."""
    rollout = _open(workdir, run_id).config.rollout
    shard_task = rollout_shard_task.with_options(retries=rollout.shard_retries)
    with shard_placement(rollout):
        futures = [
            shard_task.submit(workdir, run_id, iteration, i, n_shards) for i in range(n_shards)
        ]
    return [f.result() for f in futures]


@task(name="evaluate-shard", task_run_name="evaluate-{version}-shard-{shard_index}")
def evaluate_shard_task(
    workdir: str, run_id: str, version: int, shard_index: int, n_shards: int
) -> list[str]:
    """Evaluate one shard's modalities of policy `version`; returns them."""
    from kepo.evaluate import evaluate_shard

    return evaluate_shard(
        _open(workdir, run_id), version, shard_index, n_shards
    ).evaluated_modalities


@flow(name="evaluate-shards")
def evaluate_shards_flow(workdir: str, run_id: str, version: int, n_shards: int) -> list[str]:
    """The evaluation shard tasks of one policy version, under `rollout.task_runner`."""
    rollout = _open(workdir, run_id).config.rollout
    shard_task = evaluate_shard_task.with_options(retries=rollout.shard_retries)
    with shard_placement(rollout):
        futures = [
            shard_task.submit(workdir, run_id, version, i, n_shards) for i in range(n_shards)
        ]
    return [m for f in futures for m in f.result()]


def run_stage_sharded(workdir: str, run_id: str, planned: PlannedStage) -> None:
    """One stage, fanned out over shard tasks where the config asks for it."""
    config = _open(workdir, run_id).config
    if planned.stage == "rollout" and config.rollout.shards > 1:
        sharded_rollout(workdir, run_id, planned.iteration, config.rollout.shards)
        return
    if planned.stage == "evaluate" and config.eval.shards > 1:
        shards_flow = evaluate_shards_flow.with_options(
            task_runner=task_runner_for(config.rollout, config.eval.shards)
        )
        shards_flow(workdir, run_id, planned.iteration, config.eval.shards)
        # The stage itself finds the shards' modalities stored and writes the metrics.
    stage_task(workdir, run_id, planned.iteration, planned.stage)


def sharded_rollout(workdir: str, run_id: str, iteration: int, n_shards: int) -> None:
    """Fan the rollout out over `n_shards` parallel tasks, then commit once."""
    rollout = _open(workdir, run_id).config.rollout
    shards_flow = rollout_shards_flow.with_options(task_runner=task_runner_for(rollout))
    commit_shards_task(
        workdir, run_id, iteration, shards_flow(workdir, run_id, iteration, n_shards)
    )


@flow(name="kepo-iteration", log_prints=True)
def kepo_iteration(
    run_id: str, iteration: int, workdir: str = DEFAULT_WORKDIR, resume: bool = True
) -> list[str]:
    """One KEPO iteration of a registered run: rollout -> train -> evaluate (every N iterations)."""
    forward_kepo_logs()
    logger = get_run_logger()
    run = _open(workdir, run_id)
    done: list[str] = []
    for planned in iteration_plan(run, iteration):
        if resume and is_done(run, planned.iteration, planned.stage):
            logger.info(
                "%s of iteration %d already succeeded; skipping", planned.stage, planned.iteration
            )
            continue
        run_stage_sharded(workdir, run_id, planned)
        done.append(f"{planned.stage}-{planned.iteration}")
    publish_iteration_artifacts(workdir, run_id, iteration)
    return done


@flow(name="kepo-run", log_prints=True)
def kepo_run(config: str, iterations: int | None = None, overrides: dict | None = None) -> str:
    """A whole run from a YAML config: curation if needed, then iterations, resuming where it stopped."""
    forward_kepo_logs()
    logger = get_run_logger()
    cfg = load_config(config, overrides=overrides)
    run = Run.create(cfg)
    plan = run_plan(run, iterations)
    todo = [p for p in plan if not is_done(run, p.iteration, p.stage)]
    if todo and len(todo) < len(plan):
        logger.info(
            "resuming run %s at %s of iteration %d", cfg.run_id, todo[0].stage, todo[0].iteration
        )
    workdir = str(cfg.workdir)
    for planned in todo:
        run_stage_sharded(workdir, cfg.run_id, planned)
    return str(run.store.path)
