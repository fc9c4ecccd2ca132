"""train.report_to: per-step metrics and evaluation accuracies exported to TensorBoard event files
(read back with tensorboard's EventAccumulator), the keys by hand, and the missing-package error."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from train_fixtures import make_run, tiny_config, write_rollout_iteration

from kepo import tracking
from kepo.config import RunConfig


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is not installed (pip install -e '.[dev]' or 'kepo[tensorboard]')",
    )
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def step_row(global_step: int, **kw) -> dict:
    row = {c: None for c in tracking.STEP_KEYS}
    row.update(global_step=global_step, skipped=False, lr=1e-6)
    row.update(kw)
    return row


def test_points_by_hand() -> None:
    points = tracking.step_points(
        [step_row(4, loss_total=0.5, loss_pg=0.5, entropy=1.25), step_row(5, skipped=True)]
    )
    assert points == [
        (4, {"loss/total": 0.5, "loss/pg": 0.5, "train/entropy": 1.25, "train/lr": 1e-6,
             "train/skipped": 0.0}),
        (5, {"train/lr": 1e-6, "train/skipped": 1.0}),
    ]  # fmt: skip
    metrics = [
        {"modality": "MRI", "in_domain": True, "accuracy": 0.75},
        {"modality": "CT", "in_domain": False, "accuracy": 0.5},
        {"modality": "OCT", "in_domain": False, "accuracy": 0.25},
    ]
    assert tracking.eval_points(2, metrics) == [
        (2, {"eval/accuracy/MRI": 0.75, "eval/accuracy/CT": 0.5, "eval/accuracy/OCT": 0.25,
             "eval/id_accuracy": 0.75, "eval/ood_average": 0.375}),
    ]  # fmt: skip


def _fake_run(tmp_path: Path, report_to: list[str]) -> SimpleNamespace:
    config = RunConfig(run_id="tb-run", train={"report_to": report_to})
    return SimpleNamespace(run_id="tb-run", workdir=tmp_path, config=config)


def test_tensorboard_event_files_read_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    run = _fake_run(tmp_path, ["tensorboard"])
    tracking.export_train_steps(
        tracking.open_trackers(run),
        [step_row(0, loss_total=0.5, grad_norm=2.0), step_row(1, loss_total=0.25, grad_norm=1.0)],
    )
    metrics = [
        {"modality": "MRI", "in_domain": True, "accuracy": 0.75},
        {"modality": "CT", "in_domain": False, "accuracy": 0.5},
    ]
    tracking.export_eval_metrics(run, 1, metrics)
    scalars = read_scalars(tmp_path / "tensorboard" / "tb-run")
    assert scalars["loss/total"] == [(0, 0.5), (1, 0.25)]
    assert scalars["train/grad_norm"] == [(0, 2.0), (1, 1.0)]
    assert scalars["eval/accuracy/MRI"] == [(1, 0.75)]
    assert scalars["eval/ood_average"] == [(1, 0.5)]
    assert "loss/kl" not in scalars  # absent values are not logged as zeros


def test_no_trackers_by_default(tmp_path: Path) -> None:
    assert tracking.open_trackers(_fake_run(tmp_path, [])) == []
    assert not (tmp_path / "tensorboard").exists()


def test_missing_tracker_package_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(tracking._PACKAGE, "wandb", "kepo_no_such_package")
    with pytest.raises(
        tracking.TrackerError, match=r"train.report_to includes 'wandb'.*pip install"
    ):
        tracking.open_trackers(_fake_run(tmp_path, ["wandb"]))


def test_training_iteration_exports_its_steps(tmp_path: Path, tiny_models) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from kepo.train import train_iteration

    cfg = tiny_config(
        "grpo-thinking", tmp_path, tiny_models, **{"train.report_to": ["tensorboard"]}
    )
    run = make_run(cfg)
    write_rollout_iteration(run, 0)
    result = train_iteration(run, 0)
    (step,) = result.steps
    scalars = read_scalars(run.workdir / "tensorboard" / run.run_id)
    assert scalars["loss/total"] == [(step["global_step"], pytest.approx(step["loss_total"]))]
    assert scalars["train/entropy"] == [(step["global_step"], pytest.approx(step["entropy"]))]
