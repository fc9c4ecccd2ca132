"""The per-algorithm objectives of kepo.objectives: compositions checked against hand-written
float64 references, the gate, micro-batch additivity, and the MM-GKD / SFT data choices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from kepo.losses import full_divergence, generalized_jsd, topk_divergence
from kepo.objectives import (
    dataset_target_text,
    gkd_objective,
    gkd_sources,
    grpo_objective,
    kepo_objective,
    offline_divergence,
    online_divergence,
    rloo_objective,
    sft_objective,
)

B, T, V = 4, 5, 11


def _inputs(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype)
    teacher = torch.randn(B, T, V, generator=g, dtype=dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[3, 1:] = False
    old = torch.log_softmax(logits + 0.1 * torch.randn(B, T, V, generator=g, dtype=dtype), -1)
    old = old.gather(-1, ids[..., None]).squeeze(-1)
    ref = old - 0.05 * torch.rand(B, T, generator=g, dtype=dtype)
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75], dtype=dtype)
    return logits, teacher, ids, mask, old, ref, adv


def _logprobs(logits, ids):
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)


def test_grpo_matches_a_hand_written_reference() -> None:
    logits, _, ids, mask, old, ref, adv = _inputs()
    lp = _logprobs(logits, ids)
    out = grpo_objective(lp, old, adv, mask, ref_logprobs=ref, clip=False, kl_coef=0.3)
    # plain loops in float64
    pg = kl = 0.0
    n = 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                ratio = math.exp(lp[b, t] - old[b, t])
                pg += -ratio * adv[b].item()
                d = (ref[b, t] - lp[b, t]).item()
                kl += math.exp(d) - d - 1
                n += 1
    assert out.parts["loss_pg"].item() == pytest.approx(pg / n, rel=1e-12)
    assert out.parts["loss_kl"].item() == pytest.approx(kl / n, rel=1e-12)
    assert out.loss.item() == pytest.approx(pg / n + 0.3 * kl / n, rel=1e-12)
    assert set(out.metrics) == {"clipfrac", "approx_kl"}
    assert rloo_objective is grpo_objective  # RLOO differs only in the stored advantages


def test_grpo_without_kl_has_no_kl_part_and_needs_ref_only_with_kl() -> None:
    logits, _, ids, mask, old, _, adv = _inputs()
    out = grpo_objective(_logprobs(logits, ids), old, adv, mask, clip=True)
    assert "loss_kl" not in out.parts
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        grpo_objective(_logprobs(logits, ids), old, adv, mask, clip=True, kl_coef=0.1)


def test_kepo_with_every_gate_closed_equals_grpo_values_and_gradients() -> None:
    logits, teacher, ids, mask, old, ref, adv = _inputs()
    gate = torch.zeros(B, dtype=torch.bool)
    x1 = logits.clone().requires_grad_(True)
    div = full_divergence(x1, teacher, kind="jsd", beta=0.5)
    kepo = kepo_objective(
        _logprobs(x1, ids),
        old,
        adv,
        mask,
        div,
        gate,
        distill_coef=2.0,
        ref_logprobs=ref,
        clip=True,
        kl_coef=0.1,
    )
    kepo.loss.backward()
    x2 = logits.clone().requires_grad_(True)
    grpo = grpo_objective(
        _logprobs(x2, ids), old, adv, mask, ref_logprobs=ref, clip=True, kl_coef=0.1
    )
    grpo.loss.backward()
    assert kepo.loss.item() == grpo.loss.item()
    assert kepo.parts["loss_distill"].item() == 0.0
    assert torch.equal(x1.grad, x2.grad)


def test_kepo_adds_the_gated_divergence_on_open_rows_only() -> None:
    logits, teacher, ids, mask, old, _, adv = _inputs()
    gate = torch.tensor([True, False, True, False])
    div = full_divergence(logits, teacher, kind="forward_kl")
    out = kepo_objective(
        _logprobs(logits, ids),
        old,
        adv,
        mask,
        div,
        gate,
        distill_coef=0.5,
        distill_normalize="all",
        clip=False,
    )
    expected = (
        sum(div[b, t].item() for b in (0, 2) for t in range(T) if mask[b, t]) / mask.sum().item()
    )
    assert out.parts["loss_distill"].item() == pytest.approx(expected, rel=1e-12)
    assert out.loss.item() == pytest.approx(out.parts["loss_pg"].item() + 0.5 * expected, rel=1e-12)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_micro_batches_with_the_step_denominator_add_up_to_the_full_batch(mode: str) -> None:
    logits, teacher, ids, mask, old, ref, adv = _inputs()
    gate = torch.tensor([True, True, False, True])

    def run(rows: slice, denominator):
        x = logits[rows].clone().requires_grad_(True)
        div = full_divergence(x, teacher[rows], kind="jsd", beta=0.5)
        out = kepo_objective(
            _logprobs(x, ids[rows]),
            old[rows],
            adv[rows],
            mask[rows],
            div,
            gate[rows],
            distill_coef=1.0,
            distill_normalize="all",
            ref_logprobs=ref[rows],
            clip=True,
            kl_coef=0.2,
            aggregation=mode,
            denominator=denominator,
        )
        out.loss.backward()
        return out, x.grad

    full, full_grad = run(slice(0, B), None)  # normalised over its own inputs
    denominator = mask.sum().item() if mode == "token_mean" else B
    first, g1 = run(slice(0, 2), denominator)
    second, g2 = run(slice(2, B), denominator)
    assert (first.loss + second.loss).item() == pytest.approx(full.loss.item(), rel=1e-12)
    for name in full.parts:
        total = first.parts[name] + second.parts[name]
        assert total.item() == pytest.approx(full.parts[name].item(), rel=1e-12, abs=1e-15)
    assert torch.allclose(torch.cat([g1, g2]), full_grad, rtol=1e-12, atol=1e-15)


def _constant_divergence_batch() -> tuple[Tensor, ...]:
    """4 rows x 3 valid tokens, D = 2 on every token, the gate open on row 0 only (1/4)."""
    rows, width = 4, 3
    logprobs = torch.full((rows, width), -1.0, dtype=torch.float64)
    mask = torch.ones(rows, width, dtype=torch.bool)
    divergence = torch.full((rows, width), 2.0, dtype=torch.float64)
    gate = torch.tensor([True, False, False, False])
    return logprobs, mask, divergence, gate


def test_kepo_distillation_default_averages_over_gate_open_tokens_only() -> None:
    # The authors: JSD summed over gate-open tokens / their count, so a constant D = 2 gives 2
    # whatever the gate-open fraction; averaging over all tokens would give 2 x 3/12 = 0.5.
    logprobs, mask, divergence, gate = _constant_divergence_batch()
    zeros = torch.zeros(4, dtype=torch.float64)
    out = kepo_objective(
        logprobs, logprobs, zeros, mask, divergence, gate, distill_coef=1.0, clip=False
    )
    assert out.parts["loss_distill"].item() == pytest.approx(2.0, rel=1e-12)
    assert out.loss.item() == pytest.approx(2.0, rel=1e-12)  # the policy term is 0 (A = 0)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_kepo_distillation_all_scales_the_term_by_the_gate_open_fraction(aggregation: str) -> None:
    logprobs, mask, divergence, gate = _constant_divergence_batch()
    zeros = torch.zeros(4, dtype=torch.float64)
    kwargs = {"distill_coef": 1.0, "clip": False, "aggregation": aggregation}
    opened = kepo_objective(
        logprobs, logprobs, zeros, mask, divergence, gate, distill_normalize="gate_open", **kwargs
    )
    everyone = kepo_objective(
        logprobs, logprobs, zeros, mask, divergence, gate, distill_normalize="all", **kwargs
    )
    assert opened.parts["loss_distill"].item() == pytest.approx(2.0, rel=1e-12)
    assert everyone.parts["loss_distill"].item() == pytest.approx(2.0 * 1 / 4, rel=1e-12)
    with pytest.raises(ValueError, match="gate_open"):
        kepo_objective(
            logprobs, logprobs, zeros, mask, divergence, gate, distill_normalize="x", **kwargs
        )


def test_gate_open_micro_batches_with_the_step_open_token_count_add_up() -> None:
    logits, teacher, ids, mask, old, _, adv = _inputs()
    gate = torch.tensor([True, False, True, True])
    open_tokens = mask[gate].sum().item()

    def run(rows: slice, denominator, distill_denominator):
        x = logits[rows].clone().requires_grad_(True)
        div = full_divergence(x, teacher[rows], kind="jsd", beta=0.5)
        out = kepo_objective(
            _logprobs(x, ids[rows]),
            old[rows],
            adv[rows],
            mask[rows],
            div,
            gate[rows],
            distill_coef=1.0,
            clip=False,
            aggregation="seq_mean_token_mean",
            denominator=denominator,
            distill_denominator=distill_denominator,
        )
        out.loss.backward()
        return out, x.grad

    full, full_grad = run(slice(0, B), None, None)
    expected = sum(
        full_divergence(logits, teacher, kind="jsd", beta=0.5)[b, t].item()
        for b in range(B)
        for t in range(T)
        if gate[b] and mask[b, t]
    )
    assert full.parts["loss_distill"].item() == pytest.approx(expected / open_tokens, rel=1e-12)
    first, g1 = run(slice(0, 2), B, open_tokens)
    second, g2 = run(slice(2, B), B, open_tokens)
    assert (first.loss + second.loss).item() == pytest.approx(full.loss.item(), rel=1e-12)
    assert torch.allclose(torch.cat([g1, g2]), full_grad, rtol=1e-12, atol=1e-15)


def test_online_divergence_runs_the_teacher_rows_in_order_and_zeroes_the_rest() -> None:
    logits, teacher, *_ = _inputs()
    gate = torch.tensor([False, True, False, True])
    t_open = teacher[gate][:, :3]  # the teacher saw only the open rows, 3 completion tokens
    x = logits.clone().requires_grad_(True)
    div = online_divergence(x, t_open, gate, kind="jsd", beta=0.3, temperature=2.0)
    ref = full_divergence(logits[gate][:, :3], t_open, kind="jsd", beta=0.3, temperature=2.0)
    assert div.shape == (B, T)
    assert torch.allclose(div[gate][:, :3], ref, rtol=1e-12)
    assert torch.count_nonzero(div[~gate]) == 0 and torch.count_nonzero(div[gate][:, 3:]) == 0
    div.sum().backward()
    assert torch.count_nonzero(x.grad[~gate]) == 0 and torch.count_nonzero(x.grad[gate]) > 0
    with pytest.raises(ValueError, match="exactly the gated-open rows"):
        online_divergence(logits, teacher, gate, kind="jsd")
    closed = online_divergence(logits, teacher[:0], torch.zeros(B, dtype=torch.bool), kind="jsd")
    assert torch.count_nonzero(closed) == 0


def test_online_divergence_cuts_a_wider_teacher_vocabulary() -> None:
    logits, teacher, *_ = _inputs()
    gate = torch.ones(B, dtype=torch.bool)
    wide = torch.cat([teacher, torch.full((B, T, 3), -1e4, dtype=teacher.dtype)], dim=-1)
    assert torch.allclose(
        online_divergence(logits, wide, gate, kind="forward_kl"),
        full_divergence(logits, teacher, kind="forward_kl"),
        rtol=1e-12,
    )


def test_offline_divergence_is_the_topk_divergence_and_exact_at_full_support() -> None:
    logits, teacher, *_ = _inputs()
    teacher_logp = torch.log_softmax(teacher, -1)
    values, ids = teacher_logp.topk(4, dim=-1)
    assert torch.equal(
        offline_divergence(logits, ids, values, kind="reverse_kl"),
        topk_divergence(logits, ids, values, kind="reverse_kl"),
    )
    values, ids = teacher_logp.topk(V, dim=-1)
    assert torch.allclose(
        offline_divergence(logits, ids, values, kind="jsd", beta=0.5),
        full_divergence(logits, teacher, kind="jsd", beta=0.5),
        atol=1e-10,
    )


def test_gkd_objective_is_the_token_mean_jsd() -> None:
    logits, teacher, _, mask, *_ = _inputs()
    out = gkd_objective(logits, teacher, mask, beta=0.25)
    jsd = generalized_jsd(logits, teacher, beta=0.25)
    assert out.loss.item() == pytest.approx(jsd[mask].mean().item(), rel=1e-12)
    assert set(out.parts) == {"loss_distill"}


def test_sft_objective_is_the_mean_negative_log_likelihood() -> None:
    logits, _, ids, mask, *_ = _inputs()
    out = sft_objective(logits, ids, mask, aggregation="seq_mean_token_sum")
    p = torch.softmax(logits, -1)
    per_row = [
        -sum(math.log(p[b, t, ids[b, t]].item()) for t in range(T) if mask[b, t]) for b in range(B)
    ]
    assert out.loss.item() == pytest.approx(sum(per_row) / B, rel=1e-12)
    assert set(out.parts) == {"loss_sft"}


def test_gkd_sources_lambda_one_only_samples_zero_only_targets_and_reproducible() -> None:
    ids = [f"q{i}" for i in range(50)]
    assert all(gkd_sources(ids, lam=1.0, seed=3).values())
    assert not any(gkd_sources(ids, lam=0.0, seed=3).values())
    half = gkd_sources(ids, lam=0.5, seed=3)
    assert half == gkd_sources(ids, lam=0.5, seed=3)
    assert 10 < sum(half.values()) < 40
    assert half != gkd_sources(ids, lam=0.5, seed=4)


def test_dataset_target_text() -> None:
    row = {"question_id": "q", "gold_letter": "C", "rationale": " the mass is bright "}
    assert (
        dataset_target_text(row, thinking=True)
        == "<think>the mass is bright</think><answer>C</answer>"
    )
    assert dataset_target_text(row, thinking=False) == "<answer>C</answer>"
    assert dataset_target_text({**row, "rationale": None}, thinking=True) == "<answer>C</answer>"
    with pytest.raises(ValueError, match="no gold_letter"):
        dataset_target_text({"question_id": "q", "gold_letter": None}, thinking=True)
