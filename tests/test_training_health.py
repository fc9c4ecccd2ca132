"""The policy entropy recorded with each training step: the pure function against a float64
reference, and the stored value against the initial policy's entropy recomputed in float64."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_fixtures import make_run, tiny_config, write_rollout_iteration

from kepo.models import batch_to, completion_logits, completion_mask_of, load_policy
from kepo.train import _Context, load_training_data, mean_token_entropy, train_iteration


def entropy_float64(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """sum over masked tokens of -sum_v p log p, divided by the token count, in float64 loops."""
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not mask[b, t]:
                continue
            row = logits[b, t].double()
            finite = row[torch.isfinite(row)]
            logz = math.log(sum(math.exp(v) for v in (finite - finite.max()).tolist()))
            logp = (finite - finite.max() - logz).tolist()
            total += -sum(math.exp(v) * v for v in logp)
            count += 1
    return total / max(count, 1)


def test_mean_token_entropy_matches_a_float64_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen) * 3  # (B, T, V)
    logits[1, 2, 4] = -math.inf  # a banned token: 0 log 0 counts as 0, not NaN
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool
    )  # (B, T): padding and one empty row
    value = mean_token_entropy(logits.requires_grad_(), mask)
    assert not value.requires_grad
    assert float(value) == pytest.approx(entropy_float64(logits.detach(), mask), rel=1e-6)


def test_mean_token_entropy_by_hand() -> None:
    uniform = torch.zeros(1, 2, 4)  # H = log 4 at every token
    peaked = torch.tensor([[[0.0, -math.inf, -math.inf, -math.inf]] * 2])  # H = 0
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert float(mean_token_entropy(uniform, mask)) == pytest.approx(math.log(4), rel=1e-6)
    assert float(mean_token_entropy(peaked, mask)) == 0.0
    assert float(mean_token_entropy(uniform, torch.zeros(1, 2, dtype=torch.bool))) == 0.0


def test_train_step_records_the_policy_entropy_on_its_samples(tmp_path: Path, tiny_models) -> None:
    # Four micro-batches of one row: the step's value must be the token-weighted mean over rows.
    overrides = {"train.micro_batch_size": 1, "train.grad_accum_steps": 4}
    run = make_run(tiny_config("grpo-thinking", tmp_path, tiny_models, **overrides))
    write_rollout_iteration(run, 0)

    model, processor = load_policy(run.policy_path(0), dtype=torch.float64)
    data = load_training_data(run, 0, getattr(processor, "tokenizer", processor))
    ctx = _Context(run.config, None, model, processor, None, None, data, run.questions())
    with torch.no_grad():
        batch = batch_to(ctx.sequences(data.rows, processor), "cpu", torch.float64)
        logits = completion_logits(model, batch)  # (B, T, V) float64
    expected = entropy_float64(logits, completion_mask_of(batch).bool())

    train_iteration(run, 0)
    (step,) = run.store.read("train_steps", {"run_id": run.run_id, "iteration": 0}).to_pylist()
    assert step["entropy"] == pytest.approx(expected, rel=1e-4)
    assert 0 < step["entropy"] < math.log(logits.shape[-1])
