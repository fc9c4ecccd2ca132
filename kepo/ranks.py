"""The rank side of a launched training stage (`train.launcher: accelerate`, kepo/launch.py).

The stage's process holds the lease and hands its owner string to the ranks in
`KEPO_STAGE_LEASE`; a rank checks that the stage it trains is running under that lease
(`check_parent_lease`), leaves the error it dies with in `KEPO_RANK_ERROR_DIR/rank-N.txt`
(`record_rank_error`), and `KEPO_FAIL_RANK=<rank>:raise|exit` is a test hook that fails one
rank mid-step (`fail_rank_hook`). Kept apart from the launcher so the trainer and the ranks'
entry point (`kepo.train_stage`) import it without importing the launcher or the pipeline.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from pathlib import Path

from kepo.run import Run
from kepo.store import StoreError

PARENT_LEASE_ENV = "KEPO_STAGE_LEASE"
RANK_ERROR_DIR_ENV = "KEPO_RANK_ERROR_DIR"
FAIL_RANK_ENV = "KEPO_FAIL_RANK"


class LaunchError(StoreError):
    """A launched training stage failed (the message names the rank and its error)."""


def check_parent_lease(run: Run, iteration: int, owner: str) -> None:
    """A launched rank's check that the stage it trains is running under `owner`'s lease."""
    rows = run.store.read(
        "stages", {"run_id": run.run_id, "iteration": iteration, "stage": "train"}
    ).to_pylist()
    row = rows[0] if rows else None
    if row is None or row["status"] != "running" or row["lease_owner"] != owner:
        held = f"{row['status']}, lease {row['lease_owner']}" if row else "no stages row"
        raise LaunchError(
            f"run {run.run_id}: kepo.train_stage was started with {PARENT_LEASE_ENV}={owner} but the "
            f"train stage of iteration {iteration} is not running under that lease ({held}); "
            f"unset {PARENT_LEASE_ENV} and run `kepo train` (it takes the lease itself)"
        )


def record_rank_error(err: BaseException) -> None:
    """In a launched rank: leave the error this rank dies with for the parent to report."""
    folder = os.environ.get(RANK_ERROR_DIR_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    detail = "".join(traceback.format_exception(type(err), err, err.__traceback__)[-4:])
    first = f"{type(err).__name__}: {err}".splitlines()[0]
    with contextlib.suppress(OSError):
        Path(folder, f"rank-{rank}.txt").write_text(f"{first}\n{detail}")


def fail_rank_hook(process_index: int) -> None:
    """Test hook (KEPO_FAIL_RANK=<rank>:raise|exit): fail that rank mid-step; no-op otherwise."""
    spec = os.environ.get(FAIL_RANK_ENV)
    if not spec:
        return
    rank, _, mode = spec.partition(":")
    if int(rank) != process_index:
        return
    if mode == "exit":
        os._exit(3)
    raise RuntimeError(f"{FAIL_RANK_ENV} made rank {process_index} fail mid-step")
