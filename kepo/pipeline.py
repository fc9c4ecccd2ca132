"""The one stage runner, the order of stages in a run, and what a finished stage must leave.

A run is a sequence of stages, each recorded in the `stages` table:

    (0, curate)                       the curated dataset exists (reused when unchanged)
    (0, evaluate)                     the initial policy (version 0)
    for k in 0 .. iterations-1:
        (k, rollout)                  samples from policy version k
        (k, train)                    writes policy version k + 1
        (k + 1, evaluate)             every `eval.every` iterations and after the last one

The `iteration` of an `evaluate` stage is the policy version it evaluated, the same number the
evaluation tables use.

Every entry point (`kepo run`, the Prefect flows and deployment, `kepo rollout`, `kepo train`
and `python -m kepo.train_stage`, `kepo eval`) runs a stage through `run_stage`, which

- takes the stage's lease in the store (a second live copy of the same (run, iteration, stage)
  is refused with StageBusyError; a lease left by a killed process is taken over),
- records running / succeeded / failed, replacing a stale `failed` row,
- trusts a `succeeded` stage on resume only when its outputs exist (`is_done`): the curated
  files still match their manifest, the rollout's prompts rows, the checkpoint folder the
  `checkpoints` row points to, and evaluation rows of the same weights (a version pruned by
  train.keep_checkpoints counts as done: it was pruned only once a newer one existed and its
  evaluation, if planned, had been checked against its weights),
- after a train or evaluate stage succeeds, applies the run's checkpoint keep rules
  (`kepo.checkpoints`): only the newest version keeps optimizer state, and with
  train.keep_checkpoints older folders the plan no longer needs are deleted.

No Prefect here; `flows/` wraps these functions in tasks.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kepo.leases import holder_alive, lease_owner
from kepo.run import Run, model_fingerprint
from kepo.store import StoreError, StoreLockedError

log = logging.getLogger(__name__)

StageName = Literal["curate", "rollout", "train", "evaluate"]

# How many lock waits (of store.lock_timeout_s each) a finished rollout waits to be committed.
COMMIT_PATIENCE = 10


@dataclass(frozen=True)
class PlannedStage:
    iteration: int
    stage: StageName


class NotReady(StoreError):
    """A stage cannot start: a missing input or an unwritable output (the message says which)."""


def format_error(err: BaseException, frames: int = 6) -> str:
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    return "".join(tb[-frames:])[-4000:]


# ------------------------------------------------------------------------------ the runner
def run_stage(run: Run, iteration: int, stage: StageName, fn: Callable[[], Any]) -> Any:
    """Run `fn` as stage (iteration, stage) of `run`: lease, running / succeeded / failed.

    A stage whose input policy does not exist yet is refused before anything is recorded.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if stage != "curate" and iteration > 0:
        run.policy_path(iteration)  # StoreError naming the training stage to run first
    attempt = run.store.begin_stage(
        run.run_id, iteration, stage, owner=lease_owner(), holder_alive=holder_alive
    )
    log.info("run %s: %s of iteration %d (attempt %d)", run.run_id, stage, iteration, attempt)
    try:
        result = fn()
    except BaseException as err:
        try:
            run.store.set_stage(run.run_id, iteration, stage, "failed", error=format_error(err))
        except StoreError as store_err:  # e.g. the file is held; the lease dies with us
            log.error("could not record the failure of %s: %s", stage, store_err)
        log.error("run %s: stage %s of iteration %d failed: %s", run.run_id, stage, iteration, err)
        raise
    run.store.set_stage(run.run_id, iteration, stage, "succeeded")
    if stage in ("train", "evaluate"):
        prune_after_stage(run)
    _warn_about_later_stages(run, iteration, stage)
    return result


# What each stage consumes of the stages before it (curation is checked by its manifest and
# the settings check of `Run.create`; evaluation by the weights' fingerprint).
def stage_inputs(iteration: int, stage: StageName) -> list[PlannedStage]:
    """The stages whose outputs (iteration, stage) reads: a rollout samples from the policy
    the previous training wrote; a training step reads its iteration's rollout and resumes
    from the previous training's weights and optimizer state."""
    previous_train = [PlannedStage(iteration - 1, "train")] if iteration > 0 else []
    if stage == "rollout":
        return previous_train
    if stage == "train":
        return [PlannedStage(iteration, "rollout"), *previous_train]
    return []


def _stage_rows(run: Run) -> dict[tuple[int, str], dict[str, Any]]:
    rows = run.store.read("stages", {"run_id": run.run_id}).to_pylist()
    return {(r["iteration"], r["stage"]): r for r in rows}


def redone_inputs(
    run: Run,
    iteration: int,
    stage: StageName,
    rows: dict[tuple[int, str], dict[str, Any]] | None = None,
) -> str | None:
    """Why a succeeded stage is stale because a stage it read was redone after it started
    (e.g. `kepo train --iteration 0` rerun on a finished run: the rollout of iteration 1 was
    sampled from the policy version that rerun replaced), or None."""
    rows = _stage_rows(run) if rows is None else rows
    mine = rows.get((iteration, stage))
    if mine is None or mine["status"] != "succeeded":
        return None
    for source in stage_inputs(iteration, stage):
        row = rows.get((source.iteration, source.stage))
        if (
            row is not None
            and row["finished_at"] is not None
            and (row["finished_at"] > mine["started_at"])
        ):
            return (
                f"the {source.stage} of iteration {source.iteration} it read was redone after "
                f"it ran (finished {row['finished_at']:%Y-%m-%d %H:%M:%S} UTC)"
            )
    return None


def _warn_about_later_stages(run: Run, iteration: int, stage: StageName) -> None:
    """A rerun of a stage whose outputs later stages already consumed leaves them stale: say
    which, and that `kepo run` redoes them (`is_done` finds them through `redone_inputs`)."""
    if stage not in ("rollout", "train"):
        return
    try:
        rows = _stage_rows(run)
    except StoreError:
        return
    stale = [
        f"{name} of iteration {it}"
        for it, name in sorted(rows)
        if name in ("rollout", "train") and redone_inputs(run, it, name, rows)
    ]
    if stale:
        log.warning(
            "run %s: %s of iteration %d was redone after later stages used its output (%s); "
            "`kepo run` redoes them",
            run.run_id,
            stage,
            iteration,
            ", ".join(stale),
        )


def versions_to_evaluate(run: Run) -> set[int]:
    """Recorded policy versions the run's plan evaluates whose evaluation is not done yet."""
    rows = run.store.read("checkpoints", {"run_id": run.run_id}, columns=["iteration", "pruned_at"])
    return {
        v
        for v, pruned in zip(
            rows.column("iteration").to_pylist(), rows.column("pruned_at").to_pylist(), strict=True
        )
        if pruned is None
        and evaluates_after(run, v - 1)
        and (
            run.store.stage_status(run.run_id, v, "evaluate") != "succeeded"
            or missing_outputs(run, v, "evaluate") is not None
        )
    }


def prune_after_stage(run: Run) -> None:
    """Apply train.save_optimizer / keep_checkpoints once a stage has succeeded (kepo.checkpoints).

    After the stage is recorded, so a kill never leaves a stage to redo without the state it
    resumes from; a failure here is logged and retried after the next stage."""
    from kepo.checkpoints import prune_checkpoints

    try:
        prune_checkpoints(run, needed=versions_to_evaluate(run))
    except (OSError, StoreError) as err:
        log.warning("run %s: pruning old checkpoints failed (%s); retried later", run.run_id, err)


def is_done(run: Run, iteration: int, stage: StageName) -> bool:
    """Succeeded AND its outputs are still there (a resume never trusts the status alone)."""
    if run.store.stage_status(run.run_id, iteration, stage) != "succeeded":
        return False
    missing = missing_outputs(run, iteration, stage)
    if missing:
        log.warning(
            "run %s: %s of iteration %d succeeded but %s; running it again",
            run.run_id,
            stage,
            iteration,
            missing,
        )
    return not missing


def missing_outputs(run: Run, iteration: int, stage: StageName) -> str | None:
    """Why a succeeded stage's outputs cannot be trusted, or None when they are all there."""
    key = {"run_id": run.run_id, "iteration": iteration}
    redone = redone_inputs(run, iteration, stage)
    if redone:
        return redone
    if stage == "curate":
        from kepo.curate import curation_status

        status = curation_status(run.config.data)
        return None if status.current else f"the curated data is not current ({status.reason})"
    if stage == "rollout":
        return None if run.store.count("prompts", key) else "its prompts rows are gone"
    if stage == "train":
        row = run.checkpoint_row(iteration + 1)
        if row is None:
            return f"no checkpoints row for policy version {iteration + 1}"
        if row["pruned_at"] is not None:
            return None  # deleted by train.keep_checkpoints once a newer version was recorded
        folder = run.resolve(row["path"])
        if not (folder / "config.json").is_file():
            return f"its checkpoint folder {folder} is missing or incomplete"
        return None
    if stage == "evaluate":
        rows = run.store.read("eval_predictions", key, columns=["model_sha256"])
        if not rows.num_rows:
            return "its eval_predictions rows are gone"
        row = run.checkpoint_row(iteration) if iteration > 0 else None
        if row is not None and row["pruned_at"] is not None:
            return None  # checked against the weights before they were pruned (never after)
        try:
            current = model_fingerprint(run.policy_path(iteration))
        except StoreError:
            return f"policy version {iteration} has no checkpoint"
        if set(rows.column("model_sha256").to_pylist()) != {current}:
            return "its predictions come from other weights than the current checkpoint"
        return None
    raise ValueError(f"unknown stage {stage!r}")


def evaluates_after(run: Run, iteration: int) -> bool:
    """Whether the iteration's training is followed by an evaluation of the new policy."""
    version = iteration + 1
    return version % run.config.eval.every == 0 or version == run.config.iterations


def iteration_plan(run: Run, iteration: int) -> list[PlannedStage]:
    """The stages of one iteration, in order."""
    plan = [PlannedStage(iteration, "rollout"), PlannedStage(iteration, "train")]
    if evaluates_after(run, iteration):
        plan.append(PlannedStage(iteration + 1, "evaluate"))
    return plan


def run_plan(run: Run, iterations: int | None = None) -> list[PlannedStage]:
    """All stages of a run, in order (curation and the initial evaluation first)."""
    n = run.config.iterations if iterations is None else iterations
    plan = [PlannedStage(0, "curate"), PlannedStage(0, "evaluate")]
    for k in range(n):
        plan.extend(iteration_plan(run, k))
    return plan


# ------------------------------------------------------------------------------ checks
def check_models(config: Any) -> None:
    """Refuse (naming the setting) when a configured model folder does not exist, or when the
    training launch the config asks for cannot run here (`kepo.launch.check_launch`)."""
    from kepo.launch import check_launch

    check_launch(config)
    models = config.models
    wanted = [("models.student", models.student)]
    if config.algorithm.spec.needs_teacher:
        wanted.append(("models.teacher", models.teacher))
    if models.reference is not None:
        wanted.append(("models.reference", models.reference))
    for name, folder in wanted:
        if folder is None or not Path(folder).is_dir():
            raise NotReady(
                f"{name} = {folder}: no such model folder; set {name} to a local Hugging Face "
                "model folder (e.g. --set " + f"{name}=/path/to/model)"
            )


def check_writable(folder: Path, what: str) -> None:
    """Create `folder` if needed and prove a file can be written there (before any work)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise NotReady(
            f"{what} {folder} is not writable ({err.strerror or err}); fix its permissions "
            "or point workdir at a writable folder"
        ) from None


# ------------------------------------------------------------------------------ stage bodies
def curate_stage(run: Run) -> Any:
    """Build or reuse the curated dataset of the run's config."""
    from kepo.curate import ensure_curated

    return ensure_curated(run.config.data)


def shard_dir(run: Run, iteration: int, shard_index: int) -> Path:
    """Where shard `shard_index` of iteration `iteration`'s rollout keeps its Parquet files."""
    return (
        run.workdir
        / "shards"
        / run.run_id
        / f"iteration-{iteration:04d}"
        / f"shard-{shard_index:03d}"
    )


def rollout_stage(run: Run, iteration: int) -> Any:
    """Roll out into Parquet first, then commit; a finished rollout is never thrown away.

    If the commit cannot get the database (a long reader), the Parquet files stay and the next
    run of the stage commits them without recomputing (they carry the run's config hash).
    """
    from kepo.rollout import RolloutError, rollout_shard

    out = shard_dir(run, iteration, 0)
    if (out / "manifest.json").is_file():
        try:
            result = commit_rollout(run, iteration, [out])
        except RolloutError as err:
            log.info("not reusing %s (%s); rolling out again", out, err)
        else:
            shutil.rmtree(out, ignore_errors=True)
            return result
    rollout_shard(run, iteration, 0, 1, out)
    result = commit_rollout(run, iteration, [out])
    shutil.rmtree(out, ignore_errors=True)
    return result


def commit_rollout(run: Run, iteration: int, shard_dirs: list[Path]) -> Any:
    """commit_shards, waiting up to COMMIT_PATIENCE lock timeouts while another process reads."""
    from kepo.rollout import commit_shards

    for wait in range(COMMIT_PATIENCE):
        try:
            return commit_shards(run, iteration, shard_dirs)
        except StoreLockedError as err:
            if wait == COMMIT_PATIENCE - 1:
                raise StoreLockedError(
                    f"{err} The rollout of iteration {iteration} is kept in "
                    f"{', '.join(map(str, shard_dirs))}: rerun the stage (`kepo rollout` or "
                    "`kepo run`) to commit it without recomputing."
                ) from None
            log.warning(
                "%s is held by another process; the finished rollout waits in %s",
                run.store.path,
                shard_dirs[0],
            )
            time.sleep(1.0)
    raise AssertionError("unreachable")


def train_stage(run: Run, iteration: int) -> Any:
    """Train in this process, or launch `train.num_processes` processes (train.launcher:
    accelerate) and wait for them; either way this process holds the lease and the record."""
    from kepo.launch import in_launched_world, launch_training
    from kepo.train import train_iteration

    target = run.checkpoint_dir(iteration + 1)
    check_writable(target.parent, "the checkpoint folder")
    # Half-written copies of a killed attempt (we hold the lease: nobody else writes them).
    for stale in target.parent.glob(f"{target.name}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if run.config.train.launcher == "accelerate" and not in_launched_world():
        return launch_training(run, iteration)
    return train_iteration(run, iteration)


def evaluate_stage(run: Run, version: int) -> Any:
    from kepo.evaluate import evaluate

    return evaluate(run, version)


def execute(run: Run, planned: PlannedStage) -> Any:
    """Run one planned stage with bookkeeping."""
    if planned.stage == "curate":
        return run_stage(run, 0, "curate", lambda: curate_stage(run))
    body = {"rollout": rollout_stage, "train": train_stage, "evaluate": evaluate_stage}[
        planned.stage
    ]
    return run_stage(run, planned.iteration, planned.stage, lambda: body(run, planned.iteration))
