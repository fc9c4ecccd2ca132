"""The checkpoint of a sharded model (`train.strategy: fsdp`, `kepo.sharded`), on the CPU.

Accelerate runs an FSDP launch as DDP on the CPU (kepo/launch.py), so this drives torch's FSDP2
(`fully_shard`, gloo) directly: two ranks (tests/sharded_worker.py) shard the tiny student as
Accelerate's TRANSFORMER_BASED_WRAP does, take one AdamW step, gather the full weights and
optimizer state and write them; then resume a fresh sharded model and optimizer from what they
wrote and take a second step. One process without sharding takes the same two steps here.

Tolerances: weights and AdamW moments within 1e-6 absolute and 1e-5 relative of the one-process
run (both ranks see the same batch, so the averaged gradient is the one-process gradient up to
float32 rounding of the reduction); step counts and hyper-parameters equal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sharded_worker import LR, WEIGHT_DECAY, batch, make_optimizer, step
from train_fixtures import load_params

from kepo.models import load_policy

REPO = Path(__file__).resolve().parents[1]
CLOSE = {"atol": 1e-6, "rtol": 1e-5}


def _two_sharded_ranks(student: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(REPO / "tests" / "sharded_worker.py"), str(student), str(out)]
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
