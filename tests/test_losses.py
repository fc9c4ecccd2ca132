"""kepo.losses against hand-computed values, float64 loop references and the properties the
paper's objective relies on (JSD limits and symmetry, clip identity at ρ = 1, group order, top-k
convergence, gate gradients)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kepo.losses import (
    aggregate,
    choose_gkd_source,
    forward_kl,
    full_divergence,
    gated_distillation,
    generalized_jsd,
    gkd_loss,
    group_advantages,
    kl_k3,
    policy_loss,
    quality_gate,
    reverse_kl,
    sft_loss,
    token_logprobs,
    topk_divergence,
)

torch.set_num_threads(1)
KINDS = ("forward_kl", "reverse_kl", "jsd")


# ----------------------------------------------------------------------------- float64 references
# Plain python loops over floats: deliberately share no code with the vectorised module.


def ref_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def ref_kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def ref_divergence(p_s: list[float], p_t: list[float], kind: str, beta: float) -> float:
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return ref_kl(p_t, p_s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return ref_kl(p_s, p_t)
    m = [beta * t + (1 - beta) * s for s, t in zip(p_s, p_t, strict=True)]
    return beta * ref_kl(p_t, m) + (1 - beta) * ref_kl(p_s, m)


def ref_full(student, teacher, kind, beta=0.5, temperature=1.0) -> torch.Tensor:
    b_, t_, _ = student.shape
    out = torch.zeros(b_, t_, dtype=torch.float64)
    for b in range(b_):
        for t in range(t_):
            p_s = ref_softmax(student[b, t].tolist(), temperature)
            p_t = ref_softmax(teacher[b, t].tolist(), temperature)
            out[b, t] = ref_divergence(p_s, p_t, kind, beta)
    return out


def ref_topk(student, ids, teacher_logprobs, kind, beta=0.5) -> torch.Tensor:
    b_, t_, _ = student.shape
    out = torch.zeros(b_, t_, dtype=torch.float64)
    for b in range(b_):
        for t in range(t_):
            p_full = ref_softmax(student[b, t].tolist())
            p_s = [p_full[i] for i in ids[b, t].tolist()]
            p_t = [math.exp(x) for x in teacher_logprobs[b, t].tolist()]
            p_s.append(max(1.0 - sum(p_s), 1e-30))
            p_t.append(max(1.0 - sum(p_t), 1e-30))
            out[b, t] = ref_divergence(p_s, p_t, kind, beta)
    return out


def ref_group_advantages(rewards, group_ids, estimator, scale_by_std, eps=1e-4) -> list[float]:
    out = []
    for i, (r, g) in enumerate(zip(rewards, group_ids, strict=True)):
        group = [rewards[j] for j in range(len(rewards)) if group_ids[j] == g]
        others = [rewards[j] for j in range(len(rewards)) if group_ids[j] == g and j != i]
        mean = sum(group) / len(group)
        a = r - mean  # GRPO, eq. 6
        if estimator == "rloo":  # eq. 4; a lone row has no others and gets 0
            a = r - sum(others) / len(others) if others else 0.0
        if scale_by_std:
            n = len(group)
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (n - 1)) if n > 1 else 0.0
            a = a / (std + eps)
        out.append(a)
    return out


def ref_policy_loss(logp, old, adv, mask, clip, eps_low, eps_high) -> torch.Tensor:
    out = torch.zeros(logp.shape, dtype=torch.float64)
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            rho = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b].item()
            obj = rho * a
            if clip:
                obj = min(obj, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
            out[b, t] = -obj
    return out


def random_logits(*shape: int, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_hand_values():
    # group 7: rewards 1, 0, 1, 0 -> mean 0.5 -> GRPO A = ±0.5
    #   unbiased std = sqrt(4 * 0.25 / 3) = 0.577350 -> scaled A = 0.5 / 0.577450 = ±0.865875
    #   RLOO: r=1 -> 1 - (1+0+0)/3 = 2/3 ; r=0 -> 0 - (1+1+0)/3 = -2/3
    # group 3: a single row with reward 2 -> 0 under every estimator
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0])
    groups = torch.tensor([7, 7, 3, 7, 7])
    grpo = group_advantages(rewards, groups, estimator="grpo")
    assert torch.allclose(grpo, torch.tensor([0.5, -0.5, 0.0, 0.5, -0.5]))
    scaled = group_advantages(rewards, groups, estimator="grpo", scale_by_std=True)
    assert torch.allclose(scaled, torch.tensor([0.865875, -0.865875, 0.0, 0.865875, -0.865875]))
    rloo = group_advantages(rewards, groups, estimator="rloo")
    assert torch.allclose(rloo, torch.tensor([2 / 3, -2 / 3, 0.0, 2 / 3, -2 / 3]))
    assert grpo.dtype == torch.float32


def test_group_advantages_all_equal_group_is_zero_even_scaled():
    rewards = torch.tensor([0.0, 0.0, 0.0, 2.0, 2.0])
    groups = torch.tensor([1, 1, 1, 2, 2])
    for est in ("grpo", "rloo"):
        adv = group_advantages(rewards, groups, estimator=est, scale_by_std=True)
        assert torch.equal(adv, torch.zeros(5))


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale_by_std", [False, True])
def test_group_advantages_match_loop_on_shuffled_rows(estimator, scale_by_std):
    rng = random.Random(1234)
    rewards, group_ids = [], []
    for g in rng.sample(range(1000), 12):  # sparse, non-contiguous ids
        for _ in range(rng.randint(1, 8)):
            rewards.append(rng.choice([0.0, 1.0, 2.0]) + rng.random() * 0.1)
            group_ids.append(g)
    order = list(range(len(rewards)))
    rng.shuffle(order)
    rewards = [rewards[i] for i in order]
    group_ids = [group_ids[i] for i in order]
    expected = ref_group_advantages(rewards, group_ids, estimator, scale_by_std)
    got = group_advantages(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(group_ids),
        estimator=estimator,
        scale_by_std=scale_by_std,
    )
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.ones(3), torch.ones(4, dtype=torch.long), estimator="grpo")
    with pytest.raises(ValueError, match="integer"):
        group_advantages(torch.ones(3), torch.ones(3), estimator="grpo")
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.ones(3), torch.ones(3, dtype=torch.long), estimator="ppo")


# ----------------------------------------------------------------------------- policy term


def test_policy_loss_hand_values():
    # four tokens of one trajectory pair; ε = 0.2 both sides
    #   ρ=1.5, A=+1: ρA=1.5, clipped 1.2A=1.2 -> min 1.2 -> loss -1.2 (clip binds)
    #   ρ=1.5, A=-1: -1.5 vs -1.2 -> -1.5 -> loss 1.5
    #   ρ=0.5, A=+1: 0.5 vs 0.8 -> 0.5 -> loss -0.5
    #   ρ=0.5, A=-1: -0.5 vs -0.8 -> -0.8 -> loss 0.8 (clip binds)
    old = torch.zeros(2, 2, dtype=torch.float64)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.5), math.log(0.5)]])
    logp = logp.to(torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, metrics = policy_loss(logp, old, adv, mask, clip=True)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5], [1.5, 0.8]], dtype=torch.float64))
    assert metrics["clipfrac"].item() == pytest.approx(0.5)
    # approx_kl: (ρ-1) - log ρ = 0.094535 for 1.5, 0.193147 for 0.5 -> mean 0.143841
    assert metrics["approx_kl"].item() == pytest.approx((0.0945349 + 0.1931472) / 2, abs=1e-6)
    unclipped, _ = policy_loss(logp, old, adv, mask, clip=False)
    assert torch.allclose(unclipped, torch.tensor([[-1.5, -0.5], [1.5, 0.5]], dtype=torch.float64))


def test_policy_loss_asymmetric_eps_and_mask():
    # ρ=1.25, A=+1: ε_high=0.3 leaves it (1.25 < 1.3) -> loss -1.25; ε_high=0.2 clips -> -1.2
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.25), float("nan")]])  # NaN at a padded position
    mask = torch.tensor([[True, False]])
    adv = torch.tensor([1.0])
    loose, m1 = policy_loss(logp, old, adv, mask, clip=True, eps_low=0.1, eps_high=0.3)
    tight, m2 = policy_loss(logp, old, adv, mask, clip=True, eps_low=0.1, eps_high=0.2)
    assert loose[0, 0].item() == pytest.approx(-1.25)
    assert tight[0, 0].item() == pytest.approx(-1.2)
    assert loose[0, 1].item() == 0.0 and tight[0, 1].item() == 0.0  # pad stays out
    assert m1["clipfrac"].item() == 0.0 and m2["clipfrac"].item() == 1.0


@pytest.mark.parametrize("clip", [False, True])
def test_policy_loss_matches_reference(clip):
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.3 - 1.0
    old = logp + torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) > 0.3
    got, _ = policy_loss(logp, old, adv, mask, clip=clip, eps_low=0.2, eps_high=0.28)
    assert torch.allclose(got, ref_policy_loss(logp, old, adv, mask, clip, 0.2, 0.28))


def test_clipped_equals_unclipped_when_ratio_is_one():
    g = torch.Generator().manual_seed(5)
    old = torch.randn(3, 5, generator=g) - 2.0
    adv = torch.randn(3, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    grads = []
    for clip in (False, True):
        logp = old.clone().requires_grad_(True)
        loss, metrics = policy_loss(logp, old, adv, mask, clip=clip)
        aggregate(loss, mask, "token_mean").backward()
        grads.append((loss.detach(), logp.grad))
        assert metrics["clipfrac"].item() == 0.0 and metrics["approx_kl"].item() == 0.0
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])
    # at ρ = 1 the per-token loss is -A
    assert torch.allclose(grads[0][0], -adv[:, None].expand(3, 5))


def test_policy_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(
            torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3), clip=True
        )
    with pytest.raises(ValueError, match="shape mismatch"):
        policy_loss(
            torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3), clip=True
        )


# ----------------------------------------------------------------------------- aggregate, k3


def test_aggregate_modes_on_ragged_mask():
    # row 0: tokens 1, 2, 3 (all valid); row 1: token 4 valid, then pads holding junk
    # row 2: no valid token at all
    # token_mean = (1+2+3+4)/4 = 2.5
    # seq_mean_token_mean = (6/3 + 4/1) / 2 = 3     (row 2 left out)
    # seq_mean_token_sum = (6 + 4) / 2 = 5
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx(2.5)
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx(3.0)
    assert aggregate(loss, mask, "seq_mean_token_sum").item() == pytest.approx(5.0)
    # a global denominator (e.g. tokens over all micro-batches) replaces the local count
    assert aggregate(loss, mask, "token_mean", denominator=8).item() == pytest.approx(10 / 8)
    assert aggregate(loss, mask, "seq_mean_token_sum", denominator=4).item() == pytest.approx(2.5)
    assert aggregate(loss, torch.zeros_like(mask), "token_mean").item() == 0.0
    with pytest.raises(ValueError, match="aggregate mode"):
        aggregate(loss, mask, "sum")


def test_aggregate_matches_loop_reference():
    g = torch.Generator().manual_seed(9)
    loss = torch.randn(5, 7, generator=g, dtype=torch.float64)
    lengths = [7, 3, 1, 5, 2]
    mask = torch.tensor([[t < n for t in range(7)] for n in lengths])
    rows = [[loss[b, t].item() for t in range(n)] for b, n in enumerate(lengths)]
    tokens = [x for row in rows for x in row]
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx(sum(tokens) / len(tokens))
    expected = sum(sum(r) / len(r) for r in rows) / len(rows)
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx(expected)
    expected = sum(sum(r) for r in rows) / len(rows)
    assert aggregate(loss, mask, "seq_mean_token_sum").item() == pytest.approx(expected)


def test_kl_k3_hand_and_reference():
    # logp = log 0.5, ref = log 0.25: δ = ref - logp = -log 2; e^δ - δ - 1 = 0.5 + 0.693147 - 1
    got = kl_k3(torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]]))
    assert got.item() == pytest.approx(0.1931472, abs=1e-6)
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ref = torch.randn(3, 4, generator=g, dtype=torch.float64)
    expected = torch.tensor(
        [
            [math.exp(r - p) - (r - p) - 1 for p, r in zip(pr, rr, strict=True)]
            for pr, rr in zip(logp.tolist(), ref.tolist(), strict=True)
        ],
        dtype=torch.float64,
    )
    out = kl_k3(logp, ref)
    assert torch.allclose(out, expected) and (out >= 0).all()
    assert torch.equal(kl_k3(logp, logp), torch.zeros(3, 4, dtype=torch.float64))


# ----------------------------------------------------------------------------- log-probs, SFT


def test_token_logprobs_hand_and_reference():
    # logits [0, log 3] -> softmax [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    got = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert torch.allclose(got, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    big = random_logits(2, 4, 11, seed=4)
    ids = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(4))
    expected = torch.tensor(
        [
            [math.log(ref_softmax(big[b, t].tolist())[ids[b, t]]) for t in range(4)]
            for b in range(2)
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(token_logprobs(big, ids), expected, atol=1e-12)
    low = token_logprobs(big.to(torch.bfloat16), ids)
    assert low.dtype == torch.float32 and torch.allclose(low.double(), expected, atol=0.1)


def test_sft_loss_hand_and_cross_entropy():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]], requires_grad=True)
    loss, metrics = sft_loss(logits, torch.tensor([[1, 0]]), torch.tensor([[1, 0]]))
    # -log 0.75 = 0.287682 on the valid token, 0 at the pad
    assert torch.allclose(loss, torch.tensor([[0.2876821, 0.0]]))
    assert metrics["nll"].item() == pytest.approx(0.2876821, abs=1e-6)
    big = random_logits(3, 5, 13, seed=8)
    ids = torch.randint(0, 13, (3, 5), generator=torch.Generator().manual_seed(8))
    loss, _ = sft_loss(big, ids, torch.ones(3, 5))
    ce = F.cross_entropy(big.reshape(-1, 13), ids.reshape(-1), reduction="none").reshape(3, 5)
    assert torch.allclose(loss, ce)


# ----------------------------------------------------------------------------- full divergences


def two_token_example() -> tuple[torch.Tensor, torch.Tensor]:
    # p_S = [0.25, 0.75], p_T = [0.5, 0.5], written as logits = log-probs
    student = torch.log(torch.tensor([[[0.25, 0.75]]], dtype=torch.float64))
    teacher = torch.log(torch.tensor([[[0.5, 0.5]]], dtype=torch.float64))
    return student, teacher


def test_divergences_hand_values():
    student, teacher = two_token_example()
    # KL(T‖S) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.346574 - 0.202733 = 0.143841
    assert forward_kl(student, teacher).item() == pytest.approx(0.1438410, abs=1e-6)
    # KL(S‖T) = 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5) = -0.173287 + 0.304099 = 0.130812
    assert reverse_kl(student, teacher).item() == pytest.approx(0.1308120, abs=1e-6)
    # m = [0.375, 0.625]; KL(T‖m) = 0.032269, KL(S‖m) = 0.035375; JSD(0.5) = 0.033822
    assert generalized_jsd(student, teacher, beta=0.5).item() == pytest.approx(0.0338221, abs=1e-6)
    # temperature 2 on the same logits: both flatten; recompute via the float64 reference
    expected = ref_full(student, teacher, "jsd", 0.5, temperature=2.0)
    assert torch.allclose(generalized_jsd(student, teacher, temperature=2.0), expected)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_reference(beta):
    student = random_logits(2, 3, 7, seed=1)
    teacher = random_logits(2, 3, 7, seed=2)
    for temperature in (1.0, 0.7):
        got = generalized_jsd(student, teacher, beta=beta, temperature=temperature)
        assert torch.allclose(got, ref_full(student, teacher, "jsd", beta, temperature), atol=1e-12)


def test_kls_match_reference_and_dispatch():
    student = random_logits(2, 3, 7, seed=3)
    teacher = random_logits(2, 3, 7, seed=4)
    assert torch.allclose(forward_kl(student, teacher), ref_full(student, teacher, "forward_kl"))
    assert torch.allclose(reverse_kl(student, teacher), ref_full(student, teacher, "reverse_kl"))
    for kind in KINDS:
        got = full_divergence(student, teacher, kind=kind, beta=0.3)
        assert torch.allclose(got, ref_full(student, teacher, kind, 0.3))


def test_jsd_properties():
    student = random_logits(3, 4, 9, seed=5)
    teacher = random_logits(3, 4, 9, seed=6)
    # zero at identical inputs, for every β and both KLs
    zeros = torch.zeros(3, 4, dtype=torch.float64)
    for beta in (0.0, 0.3, 0.5, 1.0):
        assert torch.allclose(generalized_jsd(student, student, beta=beta), zeros)
    assert torch.allclose(forward_kl(student, student), zeros)
    # symmetric at β = 0.5
    assert torch.allclose(
        generalized_jsd(student, teacher, beta=0.5), generalized_jsd(teacher, student, beta=0.5)
    )
    # not symmetric elsewhere (so the test above can fail)
    assert not torch.allclose(
        generalized_jsd(student, teacher, beta=0.2), generalized_jsd(teacher, student, beta=0.2)
    )
    # limits: β = 0 is forward KL(p_T‖p_S), β = 1 reverse KL(p_S‖p_T), exactly
    assert torch.equal(generalized_jsd(student, teacher, beta=0.0), forward_kl(student, teacher))
    assert torch.equal(generalized_jsd(student, teacher, beta=1.0), reverse_kl(student, teacher))
    # orientation of the weighted form: JSD(β)/β -> KL(p_T‖p_S) as β -> 0,
    # JSD(β)/(1-β) -> KL(p_S‖p_T) as β -> 1 (so the special cases continue the curve's direction)
    small = 1e-6
    assert torch.allclose(
        generalized_jsd(student, teacher, beta=small) / small,
        forward_kl(student, teacher),
        rtol=1e-3,
    )
    assert torch.allclose(
        generalized_jsd(student, teacher, beta=1 - small) / small,
        reverse_kl(student, teacher),
        rtol=1e-3,
    )
    # non-negative
    assert (generalized_jsd(student, teacher, beta=0.7) >= 0).all()


def test_divergences_are_stable_for_extreme_and_low_precision_logits():
    student = random_logits(2, 3, 50, scale=40.0, seed=7)  # very peaked: probs underflow in fp32
    teacher = random_logits(2, 3, 50, scale=40.0, seed=8)
    for kind in KINDS:
        got = full_divergence(student.float(), teacher.float(), kind=kind)
        assert torch.isfinite(got).all()
        assert torch.allclose(got.double(), ref_full(student, teacher, kind), rtol=1e-4, atol=1e-4)
        low = full_divergence(student.bfloat16(), teacher.bfloat16(), kind=kind)
        assert low.dtype == torch.float32 and torch.isfinite(low).all()


def test_divergence_rejects_bad_input():
    a = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="shared vocabulary"):
        forward_kl(a, torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(a, a, beta=1.5)
    with pytest.raises(ValueError, match="kind"):
        full_divergence(a, a, kind="tvd")


# ----------------------------------------------------------------------------- top-k divergences


def test_topk_divergence_hand_values():
    # V = 3: p_T = [0.5, 0.3, 0.2], p_S = [0.2, 0.2, 0.6]; stored k = 1: id 0
    # buckets: teacher [0.5, 0.5], student [0.2, 0.8]
    #   forward = 0.5 ln(0.5/0.2) + 0.5 ln(0.5/0.8) = 0.458145 - 0.235002 = 0.223144
    #   reverse = 0.2 ln(0.2/0.5) + 0.8 ln(0.8/0.5) = -0.183258 + 0.376003 = 0.192745
    #   JSD(0.5): m = [0.35, 0.65] -> 0.050672
    student = torch.log(torch.tensor([[[0.2, 0.2, 0.6]]], dtype=torch.float64))
    ids = torch.tensor([[[0]]])
    teacher_lp = torch.log(torch.tensor([[[0.5]]], dtype=torch.float64))
    hand = {"forward_kl": 0.2231436, "reverse_kl": 0.1927448, "jsd": 0.0506718}
    for kind, value in hand.items():
        got = topk_divergence(student, ids, teacher_lp, kind=kind, beta=0.5)
        assert got.item() == pytest.approx(value, abs=1e-6)


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(teacher_logits, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return ids, values


@pytest.mark.parametrize("kind", KINDS)
def test_topk_divergence_matches_reference(kind):
    student = random_logits(2, 3, 12, seed=10)
    teacher = random_logits(2, 3, 12, scale=3.0, seed=11)
    ids, values = teacher_topk(teacher, 4)
    got = topk_divergence(student, ids, values, kind=kind, beta=0.3)
    assert torch.allclose(got, ref_topk(student, ids, values, kind, 0.3), atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_divergence_approaches_full_as_k_grows(kind):
    vocab = 64
    student = random_logits(2, 5, vocab, scale=2.0, seed=12)
    teacher = student + random_logits(2, 5, vocab, scale=1.5, seed=13)
    full = full_divergence(student, teacher, kind=kind)
    gaps = []
    previous = torch.zeros_like(full)
    for k in (1, 2, 4, 8, 16, 32, 63, 64):
        ids, values = teacher_topk(teacher, k)
        approx = topk_divergence(student, ids, values, kind=kind)
        # coarse-graining never raises a divergence, and supports are nested in k
        assert (approx <= full + 1e-12).all()
        assert (approx >= previous - 1e-12).all()
        previous = approx
        gaps.append((full - approx).abs().max().item())
    assert gaps[0] > 1e-3  # the truncation really costs something at small k
    assert gaps[-1] < 1e-12  # k = V: the tail is empty and the full divergence is recovered


def test_topk_at_full_vocab_equals_full_in_float32_with_finite_gradients():
    student = random_logits(2, 3, 20, seed=14).float().requires_grad_(True)
    teacher = random_logits(2, 3, 20, seed=15).float()
    ids, values = teacher_topk(teacher, 20)
    for kind in KINDS:
        got = topk_divergence(student, ids, values, kind=kind)
        assert torch.allclose(got, full_divergence(student, teacher, kind=kind), atol=1e-5)
        (grad,) = torch.autograd.grad(got.sum(), student)
        assert torch.isfinite(grad).all()


def test_topk_gradient_matches_reference_autograd():
    student = random_logits(1, 2, 8, seed=16).requires_grad_(True)
    teacher = random_logits(1, 2, 8, seed=17)
    ids, values = teacher_topk(teacher, 3)
    got = topk_divergence(student, ids, values, kind="jsd")
    (grad,) = torch.autograd.grad(got.sum(), student)

    # the same buckets written out with elementary float64 ops, differentiated by autograd
    def explicit(logits):
        p = torch.softmax(logits, -1)
        p_top = p.gather(-1, ids)
        p_s = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
        t_top = values.exp()
        p_t = torch.cat([t_top, 1 - t_top.sum(-1, keepdim=True)], -1)
        m = 0.5 * p_t + 0.5 * p_s
        return 0.5 * (p_t * (p_t / m).log()).sum(-1) + 0.5 * (p_s * (p_s / m).log()).sum(-1)

    (expected,) = torch.autograd.grad(explicit(student).sum(), student)
    assert torch.allclose(grad, expected, atol=1e-12)


def test_topk_rejects_bad_input():
    student = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="distinct"):
        topk_divergence(student, torch.tensor([[[0, 0], [1, 2]]]), torch.zeros(1, 2, 2), kind="jsd")
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        topk_divergence(student, torch.zeros(1, 3, 2).long(), torch.zeros(1, 3, 2), kind="jsd")


# ----------------------------------------------------------------------------- gate (eq. 7)


@pytest.mark.parametrize("path", ["full", "topk"])
def test_gated_out_rows_get_exactly_zero_distillation_gradient(path):
    vocab = 16
    student = random_logits(4, 5, vocab, seed=20).requires_grad_(True)
    teacher = random_logits(4, 5, vocab, seed=21)
    gate_open = torch.tensor([True, False, True, False])
    mask = torch.ones(4, 5, dtype=torch.bool)
    if path == "full":
        divergence = generalized_jsd(student, teacher, beta=0.5)
    else:
        ids, values = teacher_topk(teacher, 4)
        divergence = topk_divergence(student, ids, values, kind="jsd")
    loss = aggregate(gated_distillation(divergence, gate_open), mask, "token_mean")
    loss.backward()
    grad = student.grad
    assert torch.count_nonzero(grad[~gate_open]) == 0  # exactly zero, not merely small
    assert (grad[gate_open].abs().sum(-1) > 0).all()  # every open token receives a gradient


def test_gate_keeps_nan_of_gated_rows_out():
    divergence = torch.tensor([[0.5, 0.25], [float("nan"), float("inf")]], requires_grad=True)
    gated = gated_distillation(divergence, torch.tensor([True, False]))
    assert torch.equal(gated.detach(), torch.tensor([[0.5, 0.25], [0.0, 0.0]]))
    gated.sum().backward()
    assert torch.equal(divergence.grad, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="bool"):
        gated_distillation(divergence, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="gate_open"):
        gated_distillation(divergence, torch.tensor([True]))


def test_quality_gate_hand_values_for_both_comparators():
    rewards = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    at_least = quality_gate(rewards, tau=1.0, comparator=">=")
    above = quality_gate(rewards, tau=1.0, comparator=">")
    assert at_least.dtype == torch.bool
    assert at_least.tolist() == [False, False, True, True, True]
    assert above.tolist() == [False, False, False, True, True]
    # τ = 0 with >= opens every gate (rewards are ≥ 0); τ above the maximum closes every gate
    assert quality_gate(rewards, tau=0.0, comparator=">=").all()
    assert not quality_gate(rewards, tau=2.0, comparator=">").any()
    with pytest.raises(ValueError, match="unknown gate comparator '=>'"):
        quality_gate(rewards, tau=1.0, comparator="=>")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- MM-GKD


def test_choose_gkd_source():
    pick = choose_gkd_source(torch.Generator().manual_seed(0), 0.5, 10_000)
    again = choose_gkd_source(torch.Generator().manual_seed(0), 0.5, 10_000)
    assert pick.dtype == torch.bool and pick.shape == (10_000,)
    assert torch.equal(pick, again)
    assert abs(pick.float().mean().item() - 0.5) < 0.02
    assert not choose_gkd_source(torch.Generator().manual_seed(1), 0.0, 100).any()
    assert choose_gkd_source(torch.Generator().manual_seed(1), 1.0, 100).all()
    with pytest.raises(ValueError, match="lam"):
        choose_gkd_source(torch.Generator(), 1.2, 3)


def test_gkd_loss_is_masked_jsd():
    student, teacher = two_token_example()
    student = student.expand(1, 2, 2)
    teacher = teacher.expand(1, 2, 2)
    loss, metrics = gkd_loss(student, teacher, torch.tensor([[1, 0]]), beta=0.5)
    # JSD(0.5) of the two-token example is 0.033822 on the valid token; pad -> 0
    assert torch.allclose(loss, torch.tensor([[0.0338221, 0.0]], dtype=torch.float64), atol=1e-6)
    assert metrics["jsd"].item() == pytest.approx(0.0338221, abs=1e-6)
    student = random_logits(2, 3, 6, seed=30)
    teacher = random_logits(2, 3, 6, seed=31)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, _ = gkd_loss(student, teacher, mask, beta=0.2, temperature=0.8)
    expected = ref_full(student, teacher, "jsd", 0.2, 0.8) * mask
    assert torch.allclose(loss, expected)


# ----------------------------------------------------------------------------- benchmark script


def test_topk_gap_benchmark_runs_and_gap_shrinks_with_k(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "topk_gap.py"
    spec = importlib.util.spec_from_file_location("topk_gap", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--vocab", "512", "--tokens", "8", "--ks", "8", "32", "512"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("topk_gap "))
    rows = json.loads(line.removeprefix("topk_gap "))["rows"]
    for kind in KINDS:
        gaps = [r["abs_gap"] for r in rows if r["divergence"] == kind]
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4  # k = V recovers the full loss
