"""`python -m kepo.train_stage`: the training stage of one iteration as its own process.

This is what each rank of a launched training stage runs (`train.launcher: accelerate`,
kepo/launch.py writes the command), and what a manual `accelerate launch` / `torchrun` runs:

    accelerate launch --multi_gpu --num_processes 4 -m kepo.train_stage --db F --run R --iteration K

It sits above both the stage runner (`kepo.pipeline`, which it calls when it records the stage
itself) and the trainer (`kepo.train`), so neither imports the other's caller.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from kepo.pipeline import PlannedStage, execute
from kepo.ranks import PARENT_LEASE_ENV, check_parent_lease, record_rank_error
from kepo.run import Run
from kepo.store import StoreError
from kepo.train import TrainingDataError, train_iteration

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kepo.train_stage`: the training stage of one iteration, recorded like `kepo train`.

    Three ways in:
    - by hand (`python -m kepo.train_stage --db F --run R --iteration K`): the stage runner takes the
      lease and writes the `stages` row; with train.launcher: accelerate it launches the ranks;
    - as a rank of a launched stage (KEPO_STAGE_LEASE set by the stage's process): train only;
      the parent holds the lease and records the stage, this rank reports its error to it;
    - as a rank of a manual `accelerate launch` / `torchrun` (WORLD_SIZE set, no parent): rank 0
      takes the lease and records the stage, the other ranks train only.
    """
    parser = argparse.ArgumentParser(description="Train one KEPO iteration (policy k -> k + 1).")
    parser.add_argument("--db", type=Path, required=True, help="the run's kepo.duckdb file")
    parser.add_argument("--run", required=True, help="run id")
    parser.add_argument("--iteration", type=int, required=True, help="iteration k to train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parent_lease = os.environ.get(PARENT_LEASE_ENV)
    try:
        run = Run.open(args.db, args.run)
        if parent_lease:
            check_parent_lease(run, args.iteration, parent_lease)
            result = train_iteration(run, args.iteration)
        elif int(os.environ.get("RANK", "0")) != 0:
            result = train_iteration(run, args.iteration)
        else:
            result = execute(run, PlannedStage(args.iteration, "train"))
    except (StoreError, TrainingDataError, ValueError) as err:
        if parent_lease:
            record_rank_error(err)
        log.error("%s", err)
        return 1
    except BaseException as err:
        if parent_lease:
            record_rank_error(err)
        raise
    log.info("policy version %d is in %s", result.policy_version, result.checkpoint_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
