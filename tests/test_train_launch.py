"""Training as a launched stage (`train.launcher: accelerate`, kepo/launch.py).

The launched tests start real `accelerate launch` processes on the CPU (gloo): the stage's
process holds the lease and writes the `stages` row, the ranks train and the main rank writes
the store. Tolerances: parameters within 1e-5 absolute of the in-process run (the sum of the
loss over two processes is reassociated: float32 rounding only), step losses and gradient norms
within 1e-5 relative.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import load_params, make_run, tiny_config, write_rollout_iteration

from kepo.config import ConfigError, TrainConfig, load_config
from kepo.launch import accelerate_config, check_launch
from kepo.leases import holder_alive, lease_owner
from kepo.pipeline import PlannedStage, execute
from kepo.ranks import FAIL_RANK_ENV, PARENT_LEASE_ENV, LaunchError
from kepo.run import Run

REPO = Path(__file__).resolve().parents[1]
# 2 prompts x G=2 = 4 rows: one optimizer step either way (one process: two micro-batches of 2,
# two processes: one micro-batch of 2 each).
ONE_STEP = {
    "train.micro_batch_size": 2,
    "train.grad_accum_steps": 2,
    "train.learning_rate": 1e-3,
    "models.torch_threads": 1,
}
LAUNCHED = {"train.launcher": "accelerate", "train.num_processes": 2}


def stage_row(run: Run, iteration: int = 0) -> dict:
    rows = run.store.read(
        "stages", {"run_id": run.run_id, "iteration": iteration, "stage": "train"}
    ).to_pylist()
    assert len(rows) == 1
    return rows[0]


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- settings
def test_launch_settings_are_checked_in_one_line(tmp_path) -> None:
    assert TrainConfig().launcher == "inprocess"  # the demo trains in its own process
    assert TrainConfig().num_processes == 1 and TrainConfig().strategy == "ddp"
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  num_processes: 2\n")
    with pytest.raises(ConfigError, match=r"num_processes=2 needs train.launcher: accelerate"):
        load_config(path)
    path.write_text("train:\n  strategy: fsdp\n")
    with pytest.raises(ConfigError, match=r"strategy=fsdp needs train.launcher: accelerate"):
        load_config(path)


def test_sharded_strategies_are_refused_on_the_cpu_and_zero3_on_gpus(tmp_path, monkeypatch) -> None:
    import importlib.util

    import kepo.models

    path = tmp_path / "cfg.yaml"
    path.write_text(
        "models: {device: cpu}\ntrain: {launcher: accelerate, num_processes: 2, strategy: fsdp}\n"
    )
    with pytest.raises(
        LaunchError, match=r"on the CPU Accelerate runs an fsdp launch as plain DDP"
    ):
        check_launch(load_config(path))
    check_launch(load_config(path, overrides={"train.strategy": "ddp"}))  # ddp runs on a CPU

    # On a GPU machine: fsdp runs (kepo.sharded gathers its checkpoint, tests/
    # test_train_sharded.py); ZeRO-3 is refused as not supported yet, DeepSpeed's absence named.
    import torch

    monkeypatch.setattr(kepo.models, "resolve_device", lambda device: torch.device("cuda"))
    check_launch(load_config(path))
    zero3 = load_config(path, overrides={"train.strategy": "deepspeed_zero3"})
    with pytest.raises(
        LaunchError, match=r"deepspeed_zero3 is not supported yet.*FSDP only"
    ) as err:
        check_launch(zero3)
    if importlib.util.find_spec("deepspeed") is None:
        assert "DeepSpeed, which is not installed (pip install deepspeed" in str(err.value)


def test_the_accelerator_refuses_a_strategy_it_does_not_run(tmp_path, tiny_models) -> None:
    """The runtime guard: an Accelerator that is not FSDP is never trained as 'fsdp'."""
    from kepo.train import make_accelerator

    cfg = tiny_config(
        "kepo-ke-tau0", tmp_path, tiny_models, **LAUNCHED, **{"train.strategy": "fsdp"}
    )
    with pytest.raises(ValueError, match=r"train.strategy=fsdp but Accelerate runs NO"):
        make_accelerator(cfg)


def test_accelerate_config_files_use_accelerates_plugins(tmp_path, tiny_models) -> None:
    def config(strategy: str) -> dict:
        settings = {**LAUNCHED, "train.strategy": strategy, "train.grad_accum_steps": 3}
        cfg = tiny_config("kepo-ke-tau0", tmp_path, tiny_models, **settings)
        return accelerate_config(cfg, port=29555)

    ddp, fsdp, zero3 = config("ddp"), config("fsdp"), config("deepspeed_zero3")
    assert ddp["distributed_type"] == "MULTI_GPU" and ddp["num_processes"] == 2
    assert ddp["main_process_port"] == 29555
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert zero3["distributed_type"] == "DEEPSPEED"
    assert zero3["deepspeed_config"]["zero_stage"] == 3
    assert zero3["deepspeed_config"]["gradient_accumulation_steps"] == 3


ELASTIC_SUMMARY = """kepo.train_stage FAILED
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 13652)  (SIGTERM)
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : 3 (pid: 13653)
  error_file: <N/A>"""


def test_the_failure_names_the_root_cause_rank_not_the_ranks_stopped_after_it(tmp_path) -> None:
    from kepo.launch import failure_message

    # Rank 0 failed on the connection rank 1 closed, and wrote its error; rank 1 left no file.
    (tmp_path / "rank-0.txt").write_text("RuntimeError: gloo: Connection reset by peer\n...")
    tail = ["some log line", *ELASTIC_SUMMARY.splitlines()]
    message = failure_message(1, tmp_path, tail)
    assert message.splitlines()[0] == (
        "training rank 1 died with exit code 3 (no Python error: killed, out of memory, "
        "or os._exit)"
    )
    (tmp_path / "rank-1.txt").write_text("ValueError: bad row\nTraceback ...")
    message = failure_message(1, tmp_path, tail)
    assert message.splitlines()[0] == "training rank 1 failed: ValueError: bad row"
    assert message.endswith("error_file: <N/A>")  # the log's tail follows the line
    assert failure_message(2, tmp_path / "none", ["x"]).startswith("the training launch exited")


# ----------------------------------------------------------------------------- a launched rank
def test_a_launched_rank_trains_under_the_parents_lease_without_taking_it(
    tmp_path, tiny_models, monkeypatch
) -> None:
    """`kepo.train_stage` under KEPO_STAGE_LEASE trains and leaves the stage row to its parent; with
    a lease nobody holds it refuses and trains nothing."""
    from kepo.train_stage import main

    run = make_run(tiny_config("kepo-ke-tau0", tmp_path, tiny_models, **ONE_STEP))
    write_rollout_iteration(run, 0)
    argv = ["--db", str(run.store.path), "--run", run.run_id, "--iteration", "0"]

    monkeypatch.setenv(PARENT_LEASE_ENV, "elsewhere:1:1")
    assert main(argv) == 1
    assert run.recorded_checkpoint(1) is None

    owner = lease_owner()  # this process plays the parent
    run.store.begin_stage(run.run_id, 0, "train", owner=owner, holder_alive=holder_alive)
    monkeypatch.setenv(PARENT_LEASE_ENV, owner)
    assert main(argv) == 0
    assert run.recorded_checkpoint(1) is not None
    row = stage_row(run)
    assert row["status"] == "running" and row["lease_owner"] == owner  # untouched by the rank


# ----------------------------------------------------------------------------- launched stages
@pytest.mark.slow
def test_two_launched_processes_equal_one_inprocess(tmp_path, tiny_models, caplog) -> None:
    one = make_run(tiny_config("kepo-ke-tau0", tmp_path / "one", tiny_models, **ONE_STEP))
    write_rollout_iteration(one, 0)
    result_one = execute(one, PlannedStage(0, "train"))

    two = make_run(
        tiny_config("kepo-ke-tau0", tmp_path / "two", tiny_models, **ONE_STEP, **LAUNCHED)
    )
    write_rollout_iteration(two, 0)
    with caplog.at_level(logging.INFO, logger="kepo.launch"):
        result_two = execute(two, PlannedStage(0, "train"))
    assert "on 2 processes" in caplog.text  # the ranks' log reached the stage's process

    row = stage_row(two)
    assert row["status"] == "succeeded" and row["attempt"] == 1 and row["error"] is None
    assert (two.workdir / "launch" / f"{two.run_id}-iteration-0000.yaml").is_file()
    # The same value the in-process stage returns, read back from the store.
    for field in ("policy_version", "n_steps", "n_skipped", "n_sequences", "n_tokens"):
        assert getattr(result_two, field) == getattr(result_one, field), field
    assert result_two.final_loss == pytest.approx(result_one.final_loss, rel=1e-5)
    assert result_two.checkpoint_dir == two.policy_path(1)
    assert result_two.optimizer_path is not None and result_two.optimizer_path.is_file()

    params_one, params_two = load_params(result_one.checkpoint_dir), load_params(two.policy_path(1))
    init = load_params(tiny_models[0])
    assert max((params_one[k] - init[k]).abs().max().item() for k in init) > 1e-4  # it moved
    assert max((params_one[k] - params_two[k]).abs().max().item() for k in params_one) < 1e-5
    step_one, step_two = result_one.steps[0], result_two.steps[0]
    for key in ("loss_total", "loss_pg", "loss_distill", "grad_norm", "clipfrac", "approx_kl"):
        assert step_two[key] == pytest.approx(step_one[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_a_failed_rank_fails_the_stage_and_keeps_the_recorded_checkpoint(
    tmp_path, tiny_models, monkeypatch
) -> None:
    """Rank 1 raises (then dies, os._exit) in the middle of its first step: the stage is failed
    with that rank's error, the checkpoint recorded before stays recorded and byte-identical."""
    run = make_run(tiny_config("kepo-ke-tau0", tmp_path, tiny_models, **ONE_STEP, **LAUNCHED))
    write_rollout_iteration(run, 0)
    execute(run, PlannedStage(0, "train"))  # version 1, launched
    recorded = run.recorded_checkpoint(1)
    before = folder_digest(recorded)

    for mode, expected in (
        ("raise", "training rank 1 failed: RuntimeError: KEPO_FAIL_RANK made rank 1 fail"),
        ("exit", "training rank 1 died with exit code 3"),
    ):
        monkeypatch.setenv(FAIL_RANK_ENV, f"1:{mode}")
        with pytest.raises(LaunchError, match=expected):
            execute(run, PlannedStage(0, "train"))
        row = stage_row(run)
        assert row["status"] == "failed" and expected in row["error"], row["error"]
        assert "last lines of the launch log" in row["error"]
        assert run.recorded_checkpoint(1) == recorded
        assert folder_digest(recorded) == before
    assert sorted(p.name for p in recorded.parent.iterdir()) == [recorded.name]  # no leftovers


@pytest.mark.slow
def test_python_m_kepo_train_by_hand_is_a_recorded_stage(tmp_path, tiny_models) -> None:
    run = make_run(tiny_config("kepo-ke-tau0", tmp_path, tiny_models, **ONE_STEP))
    write_rollout_iteration(run, 0)
    cmd = [
        sys.executable,
        "-m",
        "kepo.train_stage",
        "--db",
        str(run.store.path),
        "--run",
        run.run_id,
    ]
    cmd += ["--iteration", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    # Another live process (this one) holds the stage's lease: refused, nothing written.
    run.store.begin_stage(run.run_id, 0, "train", owner=lease_owner(), holder_alive=holder_alive)
    busy = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert busy.returncode == 1
    assert "train of iteration 0 is already running" in busy.stderr
    assert "Traceback" not in busy.stderr
    assert run.recorded_checkpoint(1) is None

    run.store.set_stage(run.run_id, 0, "train", "failed", error="released by the test")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = stage_row(run)
    assert row["status"] == "succeeded" and row["attempt"] == 2 and row["lease_owner"] is None
    assert run.recorded_checkpoint(1) is not None
