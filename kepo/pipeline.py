"""Stage bookkeeping and the order of stages in a run (no Prefect here; `flows/` wraps it).

A run is a sequence of stages, each recorded in the `stages` table:

    (0, curate)                       the curated dataset exists (reused when unchanged)
    (0, evaluate)                     the initial policy (version 0)
    for k in 0 .. iterations-1:
        (k, rollout)                  samples from policy version k
        (k, train)                    writes policy version k + 1
        (k + 1, evaluate)             every `eval.every` iterations and after the last one

The `iteration` of an `evaluate` stage is the policy version it evaluated, the same number the
evaluation tables use. Resuming a run skips every stage whose status is `succeeded`; a stage left
`running` (the process died) or `failed` is run again, and since every stage replaces its
partitions, a rerun never duplicates rows.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from kepo.run import Run

log = logging.getLogger(__name__)

StageName = Literal["curate", "rollout", "train", "evaluate"]


@dataclass(frozen=True)
class PlannedStage:
    iteration: int
    stage: StageName


class StageFailed(RuntimeError):
    """A stage raised; the error is recorded in `stages` and re-raised as this."""


def format_error(err: BaseException, frames: int = 6) -> str:
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    return "".join(tb[-frames:])[-4000:]


def run_stage(run: Run, iteration: int, stage: StageName, fn: Callable[[], Any]) -> Any:
    """Run `fn` as stage (iteration, stage) of `run`, recording running / succeeded / failed."""
    run.store.set_stage(run.run_id, iteration, stage, "running")
    try:
        result = fn()
    except BaseException as err:
        run.store.set_stage(run.run_id, iteration, stage, "failed", error=format_error(err))
        log.error("run %s: stage %s of iteration %d failed: %s", run.run_id, stage, iteration, err)
        raise
    run.store.set_stage(run.run_id, iteration, stage, "succeeded")
    return result


def is_done(run: Run, iteration: int, stage: StageName) -> bool:
    return run.store.stage_status(run.run_id, iteration, stage) == "succeeded"


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


def pending(run: Run, plan: list[PlannedStage]) -> list[PlannedStage]:
    """The stages of `plan` not yet succeeded (resume point first)."""
    return [p for p in plan if not is_done(run, p.iteration, p.stage)]


# ------------------------------------------------------------------------------- stage bodies
def curate_stage(run: Run) -> Any:
    """Build or reuse the curated dataset of the run's config."""
    from kepo.curate import ensure_curated

    return ensure_curated(run.config.data)


def rollout_stage(run: Run, iteration: int) -> Any:
    from kepo.rollout import run_rollout

    return run_rollout(run, iteration)


def train_stage(run: Run, iteration: int) -> Any:
    from kepo.train import train_iteration

    return train_iteration(run, iteration)


def evaluate_stage(run: Run, version: int) -> Any:
    from kepo.evaluate import evaluate

    return evaluate(run, version)


STAGE_BODIES: dict[str, Callable[[Run, int], Any]] = {
    "curate": lambda run, _k: curate_stage(run),
    "rollout": rollout_stage,
    "train": train_stage,
    "evaluate": evaluate_stage,
}


def execute(run: Run, planned: PlannedStage) -> Any:
    """Run one planned stage with bookkeeping."""
    body = STAGE_BODIES[planned.stage]
    return run_stage(run, planned.iteration, planned.stage, lambda: body(run, planned.iteration))
