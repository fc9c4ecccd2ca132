"""The training objective of each algorithm, composed from the pure terms in `kepo.losses`.

Each function reads like its definition in the paper (Section 3, eq. 7) or in the baselines of
Section 4.3, takes tensors plus explicit keyword arguments (no config object), and returns an
`ObjectiveOutput`: the scalar to minimise, every loss part, and diagnostics.

    grpo / rloo  L = L_pg(ρ, A) + β·KL_k3(π_θ‖π_ref)               (eqs. 4–6; A stored by the rollout)
    kepo         L = L_grpo + c·𝟙[r_i ⋈ τ]·D(π_T‖π_θ)(y_i | x)      (eq. 7)
    gkd          L = JSD_β(π_T‖π_θ) on the student's sample (prob. λ) or the dataset target
    sft          L = −log π_θ(y* | x) on the dataset target

GRPO and RLOO share one objective: they differ only in the advantage estimator, which the rollout
stage applies when it stores `rollouts.advantage`.

Normalisation. Every term is reduced with `kepo.losses.aggregate(..., denominator=...)`, where
the trainer passes the count of the whole optimizer step (all micro-batches, all processes):
completion tokens for `token_mean`, sequences for the two sequence means. The parts of the
micro-batches and processes of one step then add up exactly to the loss of the full batch, so
one process with gradient accumulation equals several processes. With `denominator=None` a call
normalises over its own inputs (a single micro-batch). The distillation term is, by default
(`distill_normalize='gate_open'`, the authors' choice), the token mean of D over the gate-open
rows of the step (their token count is its denominator); with 'all' it uses the policy term's
denominator, so a gated-out row counts in the average with a zero divergence (eq. 7's indicator
inside the expectation), which scales the term by the gate-open fraction.

Shapes: B rows, T completion tokens, V vocabulary, k stored teacher ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kepo.losses import (
    AggregateMode,
    DistillNormalize,
    DivergenceKind,
    aggregate,
    choose_gkd_source,
    full_divergence,
    gated_distillation,
    gkd_loss,
    kl_k3,
    policy_loss,
    sft_loss,
    topk_divergence,
)


@dataclass
class ObjectiveOutput:
    """What one objective returns for one micro-batch.

    loss: 0-dim, to be minimised (differentiable). parts: the named terms `loss_pg`, `loss_kl`,
    `loss_distill`, `loss_sft` (those that apply), detached 0-dim, with the same normalisation
    as `loss` (so parts of micro-batches add up). metrics: token means over this call's valid
    tokens (`clipfrac`, `approx_kl`), detached; the trainer weights them by token counts.
    """

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------- RL objectives


def grpo_objective(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    clip: bool,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_coef: float = 0.0,
    aggregation: AggregateMode = "token_mean",
    denominator: float | Tensor | None = None,
) -> ObjectiveOutput:
    """GRPO (eqs. 5–6): policy term on stored advantages + kl_coef · k3 KL to the reference.

    logprobs (B, T): current policy log-probs of the sampled tokens (differentiable);
    old_logprobs, ref_logprobs (B, T): stored; advantages (B,); mask (B, T).
    `ref_logprobs` is needed only when kl_coef > 0.
    """
    pg_tokens, metrics = policy_loss(
        logprobs, old_logprobs, advantages, mask, clip=clip, eps_low=eps_low, eps_high=eps_high
    )  # (B, T)
    loss_pg = aggregate(pg_tokens, mask, aggregation, denominator=denominator)
    loss = loss_pg
    parts = {"loss_pg": loss_pg.detach()}
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError(
                "kl_coef > 0 needs ref_logprobs; the rollout stores them when algorithm.kl_coef > 0"
            )
        loss_kl = aggregate(
            kl_k3(logprobs, ref_logprobs), mask, aggregation, denominator=denominator
        )
        loss = loss + kl_coef * loss_kl
        parts["loss_kl"] = loss_kl.detach()
    return ObjectiveOutput(loss=loss, parts=parts, metrics=metrics)


# RLOO differs from GRPO only in the advantage estimator (eq. 4), applied by the rollout stage.
rloo_objective = grpo_objective


def kepo_objective(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    divergence: Tensor,
    gate_open: Tensor,
    *,
    distill_coef: float,
    distill_normalize: DistillNormalize = "gate_open",
    distill_denominator: float | Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    clip: bool,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_coef: float = 0.0,
    aggregation: AggregateMode = "token_mean",
    denominator: float | Tensor | None = None,
) -> ObjectiveOutput:
    """KEPO (eq. 7): the GRPO objective + distill_coef · 𝟙[r_i ⋈ τ] · D(π_T‖π_θ)(y_i | x).

    divergence (B, T): per-token D from `online_divergence` or `offline_divergence`;
    gate_open (B,) bool: the stored quality gate. Other arguments as `grpo_objective`.
    distill_normalize: 'gate_open' (authors) averages D over the valid tokens of gate-open rows
    (`distill_denominator` = their count over the whole step; None = this call's own count);
    'all' reduces the gated D like the policy term (`aggregation`, `denominator`), so gated-out
    rows count with 0 and the term shrinks by the gate-open fraction.
    """
    rl = grpo_objective(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs=ref_logprobs,
        clip=clip,
        eps_low=eps_low,
        eps_high=eps_high,
        kl_coef=kl_coef,
        aggregation=aggregation,
        denominator=denominator,
    )
    gated = gated_distillation(divergence, gate_open)  # (B, T), exactly 0 on gated-out rows
    if distill_normalize == "gate_open":
        open_mask = mask.bool() & gate_open[:, None]  # (B, T): valid tokens of gate-open rows
        loss_distill = aggregate(gated, open_mask, "token_mean", denominator=distill_denominator)
    elif distill_normalize == "all":
        loss_distill = aggregate(gated, mask, aggregation, denominator=denominator)
    else:
        raise ValueError(
            f"unknown distill_normalize {distill_normalize!r}; use 'gate_open' or 'all'"
        )
    return ObjectiveOutput(
        loss=rl.loss + distill_coef * loss_distill,
        parts={**rl.parts, "loss_distill": loss_distill.detach()},
        metrics=rl.metrics,
    )


# ----------------------------------------------------------------------------- divergences


def shared_vocabulary(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Both (…, V) logits cut to the common vocabulary width.

    Checkpoints of one family may pad the embedding matrix to different widths beyond the
    tokenizer; the ids below the smaller width are the shared tokenizer's (checked at load time
    with `kepo.models.assert_shared_vocabulary`).
    """
    width = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :width], teacher_logits[..., :width]


def online_divergence(
    student_logits: Tensor,
    teacher_logits_open: Tensor,
    gate_open: Tensor,
    *,
    kind: DivergenceKind,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token D(π_T‖π_θ) over the full vocabulary, for a teacher run on gated-open rows only.

    student_logits: (B, T, V); gate_open: (B,) bool; teacher_logits_open: (n_open, T', V') for
    the open rows in row order, T' ≤ T (their longest completion). Returns (B, T): the
    divergence on open rows, 0 elsewhere (and no gradient there).
    """
    if gate_open.dtype != torch.bool or gate_open.shape != student_logits.shape[:1]:
        raise ValueError(f"gate_open must be a (B,) bool tensor, got {tuple(gate_open.shape)}")
    open_rows = gate_open.nonzero().squeeze(-1)  # (n_open,)
    if teacher_logits_open.shape[0] != open_rows.numel():
        raise ValueError(
            f"teacher logits for {teacher_logits_open.shape[0]} rows, but {open_rows.numel()} "
            "gates are open; run the teacher on exactly the gated-open rows, in row order"
        )
    batch, width = student_logits.shape[:2]
    out = student_logits.new_zeros((batch, width), dtype=torch.float32)  # (B, T)
    if open_rows.numel() == 0:
        return out
    t_open = teacher_logits_open.shape[1]
    if t_open > width:
        raise ValueError(f"teacher logits cover {t_open} tokens, the student only {width}")
    student_open, teacher_open = shared_vocabulary(
        student_logits[open_rows, :t_open], teacher_logits_open
    )  # (n_open, T', V)
    div_open = full_divergence(
        student_open, teacher_open, kind=kind, beta=beta, temperature=temperature
    )  # (n_open, T')
    div_open = F.pad(div_open, (0, width - t_open))  # (n_open, T)
    return out.to(div_open.dtype).index_copy(0, open_rows, div_open)


def offline_divergence(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    kind: DivergenceKind,
    beta: float = 0.5,
) -> Tensor:
    """Per-token D over the teacher's stored top-k support plus a tail bucket: (B, T).

    student_logits (B, T, V); teacher_topk_ids, teacher_topk_logprobs (B, T, k). Rows or
    positions without stored top-k must hold placeholder ids (distinct) and be masked or gated
    out by the caller.
    """
    return topk_divergence(
        student_logits, teacher_topk_ids, teacher_topk_logprobs, kind=kind, beta=beta
    )


# ----------------------------------------------------------------------------- baselines


def gkd_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    aggregation: AggregateMode = "token_mean",
    denominator: float | Tensor | None = None,
) -> ObjectiveOutput:
    """MM-GKD: generalized JSD(β) between teacher and student on every token of the given
    sequences (the student's own samples or the dataset targets, chosen beforehand with
    `kepo.losses.choose_gkd_source`). No gate and no reward term.

    student_logits, teacher_logits: (B, T, V) (teacher detached); mask (B, T).
    """
    student_logits, teacher_logits = shared_vocabulary(student_logits, teacher_logits)
    jsd_tokens, _ = gkd_loss(
        student_logits, teacher_logits, mask, beta=beta, temperature=temperature
    )  # (B, T)
    loss = aggregate(jsd_tokens, mask, aggregation, denominator=denominator)
    return ObjectiveOutput(loss=loss, parts={"loss_distill": loss.detach()})


def sft_objective(
    logits: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    *,
    aggregation: AggregateMode = "token_mean",
    denominator: float | Tensor | None = None,
) -> ObjectiveOutput:
    """SFT: token cross-entropy −log π_θ(y*_t | x, y*_<t) on the dataset target.

    logits (B, T, V), row t predicting target_ids[:, t]; target_ids, mask (B, T).
    """
    nll_tokens, _ = sft_loss(logits, target_ids, mask)  # (B, T)
    loss = aggregate(nll_tokens, mask, aggregation, denominator=denominator)
    return ObjectiveOutput(loss=loss, parts={"loss_sft": loss.detach()})


# ----------------------------------------------------------------------------- baseline data


def dataset_target_text(row: Mapping[str, Any], *, thinking: bool) -> str:
    """The SFT / MM-GKD dataset target of a curated question row.

    "<think>{rationale}</think><answer>{gold}</answer>" in thinking mode when the row has a
    rationale (bundled data), else "<answer>{gold}</answer>" (OmniMedVQA has no reasoning
    traces, which is why the paper runs supervised KD and SFT non-thinking only).
    """
    gold = row.get("gold_letter")
    if not gold:
        raise ValueError(
            f"question {row.get('question_id')!r} has no gold_letter; the dataset target needs one"
        )
    rationale = (row.get("rationale") or "").strip()
    if thinking and rationale:
        return f"<think>{rationale}</think><answer>{gold}</answer>"
    return f"<answer>{gold}</answer>"


def gkd_sources(prompt_ids: Sequence[str], *, lam: float, seed: int) -> dict[str, bool]:
    """MM-GKD data choice per prompt: True = train on the prompt's own rollout samples (with
    probability λ), False = on its dataset target. Reproducible from `seed`; λ = 1 picks only
    samples, λ = 0 only targets."""
    generator = torch.Generator().manual_seed(seed)
    chosen = choose_gkd_source(generator, lam, len(prompt_ids))
    return {pid: bool(on) for pid, on in zip(prompt_ids, chosen.tolist(), strict=True)}


__all__ = [
    "ObjectiveOutput",
    "dataset_target_text",
    "gkd_objective",
    "gkd_sources",
    "grpo_objective",
    "kepo_objective",
    "offline_divergence",
    "online_divergence",
    "rloo_objective",
    "sft_objective",
    "shared_vocabulary",
]
