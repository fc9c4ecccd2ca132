"""Log-probs, entropy and the distillation divergence from hidden states, chunk by chunk.

The plain path computes the student's logits z = h·Wᵀ for every completion position at once,
(B, T, V) in float32, plus the teacher's for the gated-open rows, then the same-shaped
log-softmax and divergence intermediates. At Qwen3-VL's vocabulary (V = 151,936) those tensors,
not the model, set the step's peak memory. Here the positions are flattened and cut into chunks
of `chunk_size`; each chunk computes its logits from the final hidden states and the LM head,
takes the per-token terms with the same pure functions of `kepo.losses`, and drops the logits.
Under autograd every chunk runs inside `torch.utils.checkpoint` (non-reentrant): its logits
are recomputed chunk by chunk in the backward pass, so at most one chunk of (c, V) logits and
their intermediates is alive at any time. The price is one more LM-head matmul per position.
The divergence, whose intermediates are a dozen (c, V) tensors, runs in its own loop over
the distilled positions only, in chunks of a quarter of `chunk_size`.

    logits_c    = h_c · Wᵀ                                      (c, V)     one chunk of positions
    logprob_c   = z_c[y] − logsumexp(z_c)                       (c,)
    entropy_c   = −Σ_v p_c log p_c                              (c,)       optional, detached
    D_c         = D(π_T ‖ π_θ) on positions of distilled rows   (c,)       0 elsewhere, no grad

Same values as the plain path within float rounding (tests/test_chunked.py compares both on
random inputs, gated rows, top-k and gradients included). Positions outside `mask` are not
computed at all (their outputs are 0), which also skips padding.

Shapes: B rows, T completion positions, H hidden width, V vocabulary, k stored teacher ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kepo.losses import (
    DivergenceKind,
    full_divergence,
    token_entropy,
    token_logprobs,
    topk_divergence,
)


@dataclass(frozen=True)
class OnlineTeacher:
    """A teacher run in the training step: its final hidden states and LM head.

    hidden: (B, T, H_T) aligned with the student's rows (rows that are not distilled may hold
    anything, e.g. zeros: they are never read); weight: (V_T, H_T). The two vocabularies are
    cut to their common width, as `kepo.objectives.shared_vocabulary` does for logits.
    """

    hidden: Tensor
    weight: Tensor
    temperature: float = 1.0


@dataclass(frozen=True)
class TopkTeacher:
    """The teacher's stored top-k support: ids (B, T, k) long, log-probs (B, T, k)."""

    ids: Tensor
    logprobs: Tensor


@dataclass(frozen=True)
class HeadTerms:
    """Per-token terms of one batch, (B, T) each, 0 at positions outside the mask."""

    logprobs: Tensor
    """log π_θ(y_t | …) of the given ids; differentiable."""
    divergence: Tensor | None
    """D(π_T‖π_θ) on the distilled rows, exactly 0 (no gradient) elsewhere; None without a teacher."""
    entropy: Tensor | None
    """H(π_θ) per position (detached); None unless asked for."""


def align_open_rows(values_open: Tensor, gate_open: Tensor, width: int) -> Tensor:
    """Scatter per-row tensors of the gated-open rows back into all B rows.

    values_open: (n_open, T', …) for the open rows in row order, T' ≤ width; gate_open: (B,)
    bool. Returns (B, width, …), zeros in closed rows and past T'.
    """
    open_rows = gate_open.nonzero().squeeze(-1)  # (n_open,)
    if values_open.shape[0] != open_rows.numel():
        raise ValueError(
            f"{values_open.shape[0]} rows given for {open_rows.numel()} open gates; run the "
            "teacher on exactly the gated-open rows, in row order"
        )
    if values_open.shape[1] > width:
        raise ValueError(f"teacher covers {values_open.shape[1]} positions, the student {width}")
    out = values_open.new_zeros((gate_open.shape[0], width, *values_open.shape[2:]))
    out[open_rows, : values_open.shape[1]] = values_open
    return out


def chunked_head_terms(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    *,
    chunk_size: int,
    mask: Tensor | None = None,
    teacher: OnlineTeacher | TopkTeacher | None = None,
    distill_rows: Tensor | None = None,
    kind: DivergenceKind = "jsd",
    beta: float = 0.5,
    entropy: bool = False,
) -> HeadTerms:
    """Log-probs (and divergence, entropy) of `ids` from hidden states, `chunk_size` positions
    at a time (module docstring).

    hidden: (B, T, H), row t predicting ids[:, t]; weight: (V, H), the LM head (no bias);
    ids: (B, T); mask: (B, T) bool, positions to compute (default all); teacher: the online
    teacher or the stored top-k; distill_rows: (B,) bool, rows whose divergence is computed
    (the open gates; default all rows when a teacher is given).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be ≥ 1 (positions per chunk)")
    batch, width = ids.shape
    if hidden.shape[:2] != ids.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, ids {tuple(ids.shape)} and LM head "
            f"{tuple(weight.shape)}: expected (B, T, H), (B, T) and (V, H)"
        )
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    positions = mask.flatten().nonzero().squeeze(-1)  # (N,) flat indices of computed positions
    hidden_flat = hidden.reshape(batch * width, -1)[positions]  # (N, H)
    ids_flat = ids.reshape(-1)[positions].long()  # (N,)

    n = positions.numel()
    logprob_parts = _in_chunks(
        _chunk_logprobs,
        (hidden_flat, ids_flat),
        chunk_size=chunk_size,
        recompute=hidden.requires_grad,
        weight=weight,
        entropy=entropy,
    )

    def scatter(flat: Tensor, index: Tensor, size: int) -> Tensor:
        return flat.new_zeros(size).index_copy(0, index, flat)

    def to_rows(flat: Tensor) -> Tensor:
        return scatter(flat, positions, batch * width).reshape(batch, width)

    divergence = None
    if teacher is not None:
        rows = torch.ones(batch, dtype=torch.bool, device=ids.device)
        rows = rows if distill_rows is None else distill_rows.bool()
        distilled = rows[:, None].expand(batch, width).reshape(-1)[positions].nonzero()  # (n, 1)
        chosen = positions[distilled.squeeze(-1)]  # (N_d,) flat indices of distilled positions
        if isinstance(teacher, OnlineTeacher):
            teacher_flat: tuple[Tensor, ...] = (
                teacher.hidden.reshape(batch * width, -1)[chosen],  # (N_d, H_T)
            )
        else:
            k = teacher.ids.shape[-1]
            teacher_flat = (
                teacher.ids.reshape(batch * width, k)[chosen],  # (N_d, k)
                teacher.logprobs.reshape(batch * width, k)[chosen],  # (N_d, k)
            )
        # The divergence's intermediates are many (c, V) tensors: a quarter of the chunk.
        div_parts = _in_chunks(
            _chunk_divergence,
            (hidden.reshape(batch * width, -1)[chosen], *teacher_flat),
            chunk_size=max(1, chunk_size // 4),
            recompute=hidden.requires_grad,
            weight=weight,
            teacher=teacher,
            kind=kind,
            beta=beta,
        )
        flat = torch.cat(div_parts) if div_parts else hidden.new_zeros(0, dtype=torch.float32)
        divergence = scatter(flat, chosen, batch * width).reshape(batch, width)

    logprobs = torch.cat([lp for lp, _ in logprob_parts]) if n else hidden.new_zeros(0)
    return HeadTerms(
        logprobs=to_rows(logprobs),
        divergence=divergence,
        entropy=to_rows(torch.cat([e for _, e in logprob_parts])).detach() if entropy else None,
    )


def _in_chunks(fn, tensors: tuple[Tensor, ...], *, chunk_size: int, recompute: bool, **kwargs):
    """fn(*(t[start:end] for t in tensors), **kwargs) per chunk of rows; under autograd each
    call is checkpointed (recomputed in the backward pass) when there is more than one."""
    n = tensors[0].shape[0]
    bounds = [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    recompute = recompute and torch.is_grad_enabled() and len(bounds) > 1
    outputs = []
    for start, end in bounds:
        args = tuple(t[start:end] for t in tensors)
        if recompute:
            outputs.append(checkpoint(fn, *args, use_reentrant=False, **kwargs))
        else:
            outputs.append(fn(*args, **kwargs))
    return outputs


def _chunk_logprobs(
    hidden: Tensor, ids: Tensor, *, weight: Tensor, entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """One chunk of c positions: (log-prob of ids (c,), entropy (c,) or None)."""
    logits = F.linear(hidden, weight)  # (c, V)
    logprobs = token_logprobs(logits[None], ids[None])[0]  # (c,)
    if not entropy:
        return logprobs, None
    with torch.no_grad():
        return logprobs, token_entropy(logits)  # (c,)


def _chunk_divergence(
    hidden: Tensor,
    *teacher_inputs: Tensor,
    weight: Tensor,
    teacher: OnlineTeacher | TopkTeacher,
    kind: DivergenceKind,
    beta: float,
) -> Tensor:
    """One chunk of c distilled positions: D(π_T‖π_θ) (c,)."""
    student = F.linear(hidden, weight)  # (c, V)
    if isinstance(teacher, OnlineTeacher):
        with torch.no_grad():
            teacher_logits = F.linear(teacher_inputs[0], teacher.weight)  # (c, V_T)
        width = min(student.shape[-1], teacher_logits.shape[-1])
        return full_divergence(
            student[:, :width],
            teacher_logits[:, :width],
            kind=kind,
            beta=beta,
            temperature=teacher.temperature,
        )
    topk_ids, topk_logprobs = teacher_inputs
    return topk_divergence(
        student[None], topk_ids[None], topk_logprobs[None], kind=kind, beta=beta
    )[0]
