"""Done-when 4: two CPU processes launched by `accelerate launch` train to the same parameters as
one process on the same data (one optimizer step; the step's loss and pre-clip gradient norm,
which AdamW's sign-like first step would hide, are compared as well).

`accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x: with `--cpu`
it uses its simple launcher, which spawns several only through mpirun (an MPI hostfile). The
launch that works on a plain machine is `--multi_gpu --num_processes 2` (torch.distributed.run
spawns the processes); with models.device: cpu the trainer's Accelerator(cpu=True) then runs
them as MULTI_CPU with the gloo backend. The test checks that two processes really ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import load_params, make_run, tiny_config, write_rollout_iteration

from kepo.train import train_iteration

REPO = Path(__file__).resolve().parents[1]


def _accelerate_launch(db: Path, run_id: str, iteration: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "kepo.train_stage",
        "--db",
        str(db),
        "--run",
        run_id,
        "--iteration",
        str(iteration),
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_cpu_processes_equal_one_process_after_one_step(tmp_path: Path, tiny_models) -> None:
    # 2 prompts x G=2 = 4 rows, one optimizer step either way: one process runs two
    # micro-batches of 2 (accumulation), two processes one micro-batch of 2 each.
    overrides = {
        "train.micro_batch_size": 2,
        "train.grad_accum_steps": 2,
        "train.learning_rate": 1e-3,
        "models.torch_threads": 1,
    }
    run = make_run(tiny_config("kepo-ke-tau0", tmp_path, tiny_models, **overrides))
    write_rollout_iteration(run, 0)

    one = train_iteration(run, 0)
    assert one.n_steps == 1
    params_one = load_params(one.checkpoint_dir)
    step_one = run.store.read("train_steps", {"run_id": run.run_id, "iteration": 0}).to_pylist()[0]
    shutil.rmtree(one.checkpoint_dir)

    proc = _accelerate_launch(run.config.db_path, run.run_id, 0)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 processes" in proc.stdout + proc.stderr  # not two independent single runs
    # A manual launch is a recorded stage too: rank 0 took the lease and wrote the row.
    stage = run.store.read("stages", {"run_id": run.run_id, "stage": "train"}).to_pylist()
    assert [(r["iteration"], r["status"], r["lease_owner"]) for r in stage] == [
        (0, "succeeded", None)
    ]
    params_two = load_params(run.policy_path(1))  # the recorded folder (written beside the old)
    step_two = run.store.read("train_steps", {"run_id": run.run_id, "iteration": 0}).to_pylist()[0]

    init = load_params(tiny_models[0])
    assert max((params_one[k] - init[k]).abs().max().item() for k in init) > 1e-4  # it moved
    diff = max((params_one[k] - params_two[k]).abs().max().item() for k in params_one)
    assert diff < 1e-5
    assert step_two["n_sequences"] == step_one["n_sequences"] == 4
    assert step_two["n_tokens"] == step_one["n_tokens"]
    for key in ("loss_total", "loss_pg", "loss_distill", "grad_norm", "clipfrac", "approx_kl"):
        assert step_two[key] == pytest.approx(step_one[key], rel=1e-5, abs=1e-7), key
