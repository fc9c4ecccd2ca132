"""Training a sharded model (`train.strategy: fsdp`, `kepo.sharded`) on the CPU, two gloo ranks.

Accelerate runs an FSDP launch as DDP on the CPU (kepo/launch.py), so:
- the helpers are driven with torch's FSDP2 (`fully_shard`) directly: two ranks
  (tests/sharded_worker.py) shard the tiny student as Accelerate's TRANSFORMER_BASED_WRAP does,
  take one AdamW step, gather the full weights and optimizer state and write them; then resume
  a fresh sharded model and optimizer from what they wrote and take a second step. One process
  without sharding takes the same two steps here. Tolerances: weights and AdamW moments within
  1e-6 absolute and 1e-5 relative (both ranks see the same batch, so the averaged gradient is
  the one-process gradient up to float32 rounding of the reduction); step counts and
  hyper-parameters equal.
- the trainer runs two iterations under Accelerate's own FSDP2 `prepare` (the distributed type
  forced to FSDP, `sharded_worker.fsdp_accelerator`), the second resuming AdamW from the first's
  gathered optimizer.pt, against the same two iterations in one process. Tolerances as the
  launched DDP test (tests/test_train_launch.py): parameters within 1e-5 absolute, step losses
  and gradient norms within 1e-5 relative; the AdamW moments in optimizer.pt within 1e-4
  relative (1e-9 absolute).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sharded_worker import LR, WEIGHT_DECAY, batch, make_optimizer, step
from train_fixtures import load_params, make_run, tiny_config, write_rollout_iteration

from kepo.checkpoints import OPTIMIZER_FILE
from kepo.models import load_policy
from kepo.train import train_iteration

REPO = Path(__file__).resolve().parents[1]
CLOSE = {"atol": 1e-6, "rtol": 1e-5}


# 2 prompts x G=2 = 4 rows: one optimizer step either way (as in tests/test_train_launch.py)
ONE_STEP = {
    "train.micro_batch_size": 2,
    "train.grad_accum_steps": 2,
    "train.learning_rate": 1e-3,
    "models.torch_threads": 1,
}


def _two_sharded_ranks(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(REPO / "tests" / "sharded_worker.py"), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _assert_same_weights(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, **CLOSE, msg=name)


def _groups(state: dict) -> list[dict]:
    # torch.distributed.checkpoint hands the betas back as a list
    return [{**group, "betas": tuple(group["betas"])} for group in state["param_groups"]]


def _assert_same_optimizer(got: dict, expected: dict) -> None:
    assert _groups(got) == _groups(expected)  # lr, betas, weight decay, parameter indices
    assert sorted(got["state"]) == sorted(expected["state"])
    for index, state in expected["state"].items():
        assert sorted(got["state"][index]) == sorted(state)
        assert float(got["state"][index]["step"]) == float(state["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                got["state"][index][key], state[key], **CLOSE, msg=f"{index}.{key}"
            )


@pytest.mark.slow
def test_fsdp2_checkpoint_gathers_the_full_weights_and_adamw_state(tmp_path, tiny_models) -> None:
    student = tiny_models[0]
    proc = _two_sharded_ranks(student, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = torch.load(tmp_path / "step1.pt", weights_only=True)
    second = torch.load(tmp_path / "step2.pt", weights_only=True)
    assert first["sharded"]  # every parameter a DTensor, the ranks holding parts of them

    model, _ = load_policy(student, dtype="float32", device="cpu")
    model.train()
    vocab = model.config.text_config.vocab_size
    init = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model)
    assert optimizer.defaults["lr"] == LR and optimizer.defaults["weight_decay"] == WEIGHT_DECAY

    step(model, optimizer, batch(1, vocab))
    after_one = model.state_dict()
    assert max((after_one[k] - init[k]).abs().max().item() for k in init) > 1e-4  # it moved
    _assert_same_weights(first["weights"], after_one)
    _assert_same_weights(load_params(tmp_path / "policy"), after_one)  # the folder save_model wrote
    _assert_same_optimizer(first["optimizer"], optimizer.state_dict())

    # Resumed from the gathered state: the second step equals one process's second step.
    step(model, optimizer, batch(2, vocab))
    _assert_same_weights(second["weights"], model.state_dict())
    _assert_same_optimizer(second["optimizer"], optimizer.state_dict())


@pytest.mark.slow
def test_the_trainer_under_accelerates_fsdp2_equals_one_process(tmp_path, tiny_models) -> None:
    """Two iterations: the second loads the first's gathered AdamW state into the shards."""
    one = make_run(tiny_config("kepo-ke-tau0", tmp_path / "one", tiny_models, **ONE_STEP))
    two = make_run(tiny_config("kepo-ke-tau0", tmp_path / "two", tiny_models, **ONE_STEP))
    for iteration in (0, 1):
        write_rollout_iteration(one, iteration)
        result_one = train_iteration(one, iteration)
        write_rollout_iteration(two, iteration)
        proc = _two_sharded_ranks("--train", two.store.path, two.run_id, iteration)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        if iteration == 1:  # the resume went through the shards
            assert "into its shards" in proc.stdout + proc.stderr

        folder = two.policy_path(iteration + 1)
        params_one, params_two = load_params(result_one.checkpoint_dir), load_params(folder)
        init = load_params(one.policy_path(iteration))
        assert max((params_one[k] - init[k]).abs().max().item() for k in init) > 1e-4  # moved
        assert sorted(params_two) == sorted(params_one)
        diff = {k: (params_one[k] - params_two[k]).abs().max().item() for k in params_one}
        assert max(diff.values()) < 1e-5, sorted(diff.items(), key=lambda kv: -kv[1])[:3]
        steps = two.store.read("train_steps", {"run_id": two.run_id, "iteration": iteration})
        step_one, step_two = result_one.steps[0], steps.to_pylist()[0]
        for key in ("loss_total", "loss_pg", "loss_distill", "grad_norm"):
            assert step_two[key] == pytest.approx(step_one[key], rel=1e-5, abs=1e-7), key

        # optimizer.pt: the full AdamW state, in the layout the one-process run writes
        state_one = torch.load(result_one.optimizer_path, weights_only=True)["optimizer"]
        state_two = torch.load(folder / OPTIMIZER_FILE, weights_only=True)["optimizer"]
        assert _groups(state_two) == _groups(state_one)
        assert sorted(state_two["state"]) == sorted(state_one["state"])
        for index, state in state_one["state"].items():
            assert float(state_two["state"][index]["step"]) == float(state["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(
                    state_two["state"][index][key], state[key], atol=1e-9, rtol=1e-4
                )
