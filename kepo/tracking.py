"""Optional export of training metrics and evaluation accuracies to experiment trackers.

The store stays the record; `train.report_to: [tensorboard, mlflow, wandb]` (default empty) also
sends each stage's numbers to the trackers users already watch, through Accelerate's tracker
classes (`accelerate.tracking`):

- tensorboard: offline event files in `<workdir>/tensorboard/<run_id>` (`tensorboard --logdir
  <workdir>/tensorboard`); needs the `tensorboard` package (`pip install 'kepo[tensorboard]'`).
- mlflow: `mlflow` package; the tracking URI from MLFLOW_TRACKING_URI (default `./mlruns`).
  Each stage process starts an MLflow run named after the kepo run and tagged
  `kepo_run_id=<run_id>` (set MLFLOW_RUN_ID to log into one existing run instead).
- wandb: `wandb` package; one W&B run per kepo run (its id derived from the run id, resumed by
  every stage), project from WANDB_PROJECT (default `kepo`); WANDB_MODE=offline works offline.

What is logged, under namespaced keys:
- after training iteration k, one point per optimizer step at its run-wide `global_step`:
  `loss/total`, `loss/pg`, `loss/distill`, `loss/kl`, `loss/sft`, `train/clipfrac`,
  `train/approx_kl`, `train/entropy`, `train/grad_norm`, `train/lr`, `train/skipped`,
  `gate/frac_open` (each only when the step has it);
- after evaluating policy version k, at step k: `eval/accuracy/<modality>` (0-1),
  `eval/id_accuracy` and `eval/ood_average`.

A stage that is rerun logs its points again (TensorBoard shows the latest value per step).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "mlflow", "wandb")
_PACKAGE = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}

# train_steps column -> tracker key
STEP_KEYS = {
    "loss_total": "loss/total",
    "loss_pg": "loss/pg",
    "loss_distill": "loss/distill",
    "loss_kl": "loss/kl",
    "loss_sft": "loss/sft",
    "clipfrac": "train/clipfrac",
    "approx_kl": "train/approx_kl",
    "entropy": "train/entropy",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "gate_frac_open": "gate/frac_open",
}


class TrackerError(RuntimeError):
    """A tracker named in train.report_to cannot be used (the message says how to fix it)."""


def _require(name: str) -> None:
    import importlib.util

    if importlib.util.find_spec(_PACKAGE[name]) is None:
        raise TrackerError(
            f"train.report_to includes {name!r} but the {_PACKAGE[name]} package is not "
            f"installed: pip install 'kepo[{name}]' or remove {name!r} from train.report_to"
        )


def open_trackers(run: Any) -> list[Any]:
    """Started Accelerate trackers for the run's `train.report_to` (empty list when none)."""
    names: Sequence[str] = run.config.train.report_to
    if not names:
        return []
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    trackers = []
    for name in names:
        _require(name)
        if name == "tensorboard":
            tracker = TensorBoardTracker(run.run_id, run.workdir / "tensorboard")
        elif name == "mlflow":
            tracker = MLflowTracker(
                experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "kepo"),
                run_name=run.run_id,
                tags={"kepo_run_id": run.run_id},
            )
        elif name == "wandb":
            run_key = f"{run.workdir.resolve()}::{run.run_id}"
            tracker = WandBTracker(
                run.run_id,
                project=os.environ.get("WANDB_PROJECT", "kepo"),
                id=hashlib.sha256(run_key.encode()).hexdigest()[:16],
                resume="allow",
                dir=str(run.workdir),
            )
        else:  # the config only admits TRACKERS
            raise TrackerError(f"unknown tracker {name!r} in train.report_to; use {TRACKERS}")
        tracker.start()
        trackers.append(tracker)
    return trackers


def _log(trackers: Sequence[Any], points: Sequence[tuple[int, dict[str, float]]]) -> None:
    for tracker in trackers:
        for step, values in points:
            if values:
                tracker.log(values, step=step)
        tracker.finish()


def step_points(step_rows: Sequence[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """(global_step, {key: value}) per `train_steps` row; absent (None) values are left out."""
    points = []
    for row in step_rows:
        values = {
            key: float(row[col]) for col, key in STEP_KEYS.items() if row.get(col) is not None
        }
        values["train/skipped"] = float(bool(row["skipped"]))
        points.append((int(row["global_step"]), values))
    return points


def eval_points(
    version: int, metric_rows: Sequence[dict[str, Any]]
) -> list[tuple[int, dict[str, float]]]:
    """One point at step `version`: accuracy per modality, in-domain and the OOD average."""
    values = {f"eval/accuracy/{r['modality']}": float(r["accuracy"]) for r in metric_rows}
    in_domain = [r["accuracy"] for r in metric_rows if r["in_domain"]]
    ood = [r["accuracy"] for r in metric_rows if not r["in_domain"]]
    if in_domain:
        values["eval/id_accuracy"] = float(in_domain[0])
    if ood:
        values["eval/ood_average"] = sum(ood) / len(ood)
    return [(version, values)]


def export_train_steps(trackers: Sequence[Any], step_rows: Sequence[dict[str, Any]]) -> None:
    """Log one training iteration's `train_steps` rows to started trackers, then close them."""
    _log(trackers, step_points(step_rows))


def export_eval_metrics(run: Any, version: int, metric_rows: Sequence[dict[str, Any]]) -> None:
    """Log an evaluation's `eval_metrics` rows to the run's trackers (no-op without any)."""
    trackers = open_trackers(run)
    if trackers:
        _log(trackers, eval_points(version, metric_rows))


__all__ = [
    "STEP_KEYS",
    "TRACKERS",
    "TrackerError",
    "eval_points",
    "export_eval_metrics",
    "export_train_steps",
    "open_trackers",
    "step_points",
]
