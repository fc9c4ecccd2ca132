"""kepo.chunked against the plain (B, T, V) path: same values and gradients on random inputs
(full-vocabulary divergences, top-k mode, gated rows, masks, every chunk size), and the
(B, T, V) logits never saved for the backward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kepo.chunked import OnlineTeacher, TopkTeacher, align_open_rows, chunked_head_terms
from kepo.losses import full_divergence, token_logprobs, topk_divergence
from kepo.objectives import offline_divergence, online_divergence

torch.set_num_threads(1)
B, T, H, V = 4, 7, 8, 50
KINDS = [
    ("jsd", 0.5),
    ("jsd", 0.0),
    ("jsd", 1.0),
    ("jsd", 0.3),
    ("forward_kl", 0.0),
    ("reverse_kl", 1.0),
]


def _inputs(dtype=torch.float64, seed=0, teacher_vocab=V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 0.7).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    t_hidden = torch.randn(B, T, H + 2, generator=g, dtype=dtype)
    t_weight = torch.randn(teacher_vocab, H + 2, generator=g, dtype=dtype) * 0.7
    return hidden, weight, ids, t_hidden, t_weight


def _grads(outputs, weights, params):
    total = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
    return torch.autograd.grad(total, params)


@pytest.mark.parametrize("chunk_size", [1, 3, B * T, 1000])
def test_logprobs_and_entropy_equal_the_plain_path(chunk_size):
    hidden, weight, ids, _, _ = _inputs()
    logits = hidden @ weight.T  # (B, T, V)
    plain = token_logprobs(logits, ids)
    logp = F.log_softmax(logits, -1)
    plain_entropy = -(logp.exp() * logp).sum(-1)
    terms = chunked_head_terms(hidden, weight, ids, chunk_size=chunk_size, entropy=True)
    assert terms.divergence is None
    torch.testing.assert_close(terms.logprobs, plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(terms.entropy, plain_entropy.detach(), rtol=0, atol=1e-12)
    assert not terms.entropy.requires_grad
    upstream = torch.randn(B, T, dtype=torch.float64)
    expected = _grads([plain], [upstream], [hidden, weight])
    got = _grads([terms.logprobs], [upstream], [hidden, weight])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("kind", "beta"), KINDS)
@pytest.mark.parametrize("chunk_size", [2, 5, 1000])
def test_online_divergence_with_gated_rows_equals_the_plain_path(kind, beta, chunk_size):
    # The teacher pads its vocabulary wider (V + 6): both are cut to the shared width.
    hidden, weight, ids, t_hidden, t_weight = _inputs(teacher_vocab=V + 6)
    gate_open = torch.tensor([True, False, True, False])
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 5:] = False  # a shorter row
    logits = hidden @ weight.T
    teacher_open = (t_hidden[gate_open] @ t_weight.T).detach()  # the teacher ran on open rows
    plain_logp = token_logprobs(logits, ids)
    plain_div = online_divergence(
        logits, teacher_open, gate_open, kind=kind, beta=beta, temperature=1.3
    )
    terms = chunked_head_terms(
        hidden,
        weight,
        ids,
        chunk_size=chunk_size,
        mask=mask,
        teacher=OnlineTeacher(t_hidden, t_weight, temperature=1.3),
        distill_rows=gate_open,
        kind=kind,
        beta=beta,
    )
    torch.testing.assert_close(terms.logprobs[mask], plain_logp[mask], rtol=0, atol=1e-12)
    torch.testing.assert_close(terms.divergence[mask], plain_div[mask], rtol=1e-10, atol=1e-12)
    assert (terms.logprobs[~mask] == 0).all() and (terms.divergence[~mask] == 0).all()
    assert (terms.divergence[~gate_open] == 0).all()
    up_logp, up_div = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    m = mask.double()
    expected = _grads([plain_logp, plain_div], [up_logp * m, up_div * m], [hidden, weight])
    got = _grads([terms.logprobs, terms.divergence], [up_logp, up_div], [hidden, weight])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gated_out_rows_get_exactly_zero_distillation_gradient():
    hidden, weight, ids, t_hidden, t_weight = _inputs(dtype=torch.float32)
    gate_open = torch.tensor([False, True, False, False])
    terms = chunked_head_terms(
        hidden,
        weight,
        ids,
        chunk_size=3,
        teacher=OnlineTeacher(t_hidden, t_weight),
        distill_rows=gate_open,
    )
    (grad_hidden,) = torch.autograd.grad(terms.divergence.sum(), [hidden])
    assert (grad_hidden[~gate_open] == 0).all()  # exactly zero, not merely small
    assert grad_hidden[gate_open].abs().sum() > 0
    # All gates closed: divergence exactly 0 and no gradient anywhere.
    closed = chunked_head_terms(
        hidden,
        weight,
        ids,
        chunk_size=3,
        teacher=OnlineTeacher(t_hidden, t_weight),
        distill_rows=torch.zeros(B, dtype=torch.bool),
    )
    assert (closed.divergence == 0).all()
    if closed.divergence.requires_grad:
        (grad_closed,) = torch.autograd.grad(closed.divergence.sum(), [hidden], allow_unused=True)
        assert grad_closed is None or (grad_closed == 0).all()


@pytest.mark.parametrize(("kind", "beta"), KINDS)
def test_topk_divergence_equals_the_plain_path(kind, beta):
    hidden, weight, ids, t_hidden, t_weight = _inputs()
    k = 6
    teacher_logp = F.log_softmax(t_hidden @ t_weight.T, -1)
    top = teacher_logp.topk(k, dim=-1)
    gate_open = torch.tensor([True, True, False, True])
    logits = hidden @ weight.T
    plain = offline_divergence(logits, top.indices, top.values, kind=kind, beta=beta)
    plain = torch.where(gate_open[:, None], plain, torch.zeros_like(plain))
    terms = chunked_head_terms(
        hidden,
        weight,
        ids,
        chunk_size=4,
        teacher=TopkTeacher(top.indices, top.values),
        distill_rows=gate_open,
        kind=kind,
        beta=beta,
    )
    torch.testing.assert_close(terms.divergence, plain, rtol=1e-10, atol=1e-12)
    upstream = torch.randn(B, T, dtype=torch.float64)
    expected = _grads([plain], [upstream], [hidden, weight])
    got = _grads([terms.divergence], [upstream], [hidden, weight])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_float32_values_within_float_tolerance_of_the_plain_path():
    hidden, weight, ids, t_hidden, t_weight = _inputs(dtype=torch.float32, seed=3)
    logits = hidden @ weight.T
    teacher_logits = (t_hidden @ t_weight.T).detach()
    terms = chunked_head_terms(
        hidden, weight, ids, chunk_size=5, teacher=OnlineTeacher(t_hidden, t_weight)
    )
    torch.testing.assert_close(terms.logprobs, token_logprobs(logits, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        terms.divergence,
        full_divergence(logits, teacher_logits, kind="jsd", beta=0.5),
        rtol=1e-5,
        atol=1e-6,
    )
    k_ids = torch.arange(4).expand(B, T, 4)
    k_logp = torch.full((B, T, 4), -2.0)
    top = chunked_head_terms(hidden, weight, ids, chunk_size=5, teacher=TopkTeacher(k_ids, k_logp))
    torch.testing.assert_close(
        top.divergence,
        topk_divergence(logits, k_ids, k_logp, kind="jsd", beta=0.5),
        rtol=1e-5,
        atol=1e-6,
    )


def test_the_full_logits_are_never_saved_for_backward():
    """Every tensor autograd keeps between forward and backward is recorded; the chunked path
    keeps none of (B·T, V) logits' size, the plain path does."""
    hidden, weight, ids, t_hidden, t_weight = _inputs(dtype=torch.float32)

    def largest_saved(fn) -> int:
        sizes = [0]

        def pack(tensor):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        out.sum().backward()
        return max(sizes)

    def chunked():
        terms = chunked_head_terms(
            hidden, weight, ids, chunk_size=4, teacher=OnlineTeacher(t_hidden, t_weight)
        )
        return terms.logprobs + terms.divergence

    def plain():
        logits = hidden @ weight.T
        teacher_logits = (t_hidden @ t_weight.T).detach()
        return token_logprobs(logits, ids) + full_divergence(logits, teacher_logits, kind="jsd")

    assert largest_saved(plain) >= B * T * V
    # the chunked path keeps only inputs: hidden states and LM heads (student and teacher)
    assert largest_saved(chunked) <= max(V * H, B * T * (H + 2)) < B * T * V


def test_align_open_rows_and_bad_input():
    values = torch.arange(2 * 3, dtype=torch.float32).reshape(2, 3)
    aligned = align_open_rows(values, torch.tensor([False, True, True]), width=4)
    assert aligned.tolist() == [[0, 0, 0, 0], [0, 1, 2, 0], [3, 4, 5, 0]]
    with pytest.raises(ValueError, match="open gates"):
        align_open_rows(values, torch.tensor([True, False, False]), width=4)
    hidden, weight, ids, _, _ = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_head_terms(hidden, weight, ids, chunk_size=0)
    with pytest.raises(ValueError, match=r"\(B, T, H\)"):
        chunked_head_terms(hidden[:, :3], weight, ids, chunk_size=4)
