"""KEPO loss math as pure tensor functions (paper Section 3, eqs. 4–7, and the baselines of 4.3).

Choices the paper leaves open, and the defaults taken here (the trainer's config picks):
1. Advantages: eq. 6 mean baseline by default; `scale_by_std` (the authors' setting) divides by
   the group std + 1e-4, std unbiased as torch.std computes it (taken to match their code); a
   one-row group has std 0 and advantage 0.
2. Policy term: PPO form -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)·A) per token (eq. 5 prints the clip
   on ρ alone); `clip=False` gives -ρA, the authors' one-update-per-rollout setting.
3. Token aggregation is unspecified: `aggregate` offers token mean and two sequence means.
4. Generalized JSD(β) in TRL's GKD convention: m = β·p_T + (1-β)·p_S,
   JSD = β·KL(p_T‖m) + (1-β)·KL(p_S‖m); β = 0 is exactly KL(p_T‖p_S) (forward), β = 1 exactly
   KL(p_S‖p_T) (reverse), both special-cased since the weighted form vanishes there. Default 0.5.
5. Offline distillation over the teacher's stored top-k: both distributions become the k ids
   plus one tail bucket with the remaining mass, so the loss never exceeds the full one.
6. The gate (eq. 7): `quality_gate` decides 𝟙[r ⋈ τ] per row with ⋈ = ≥ (the authors) or >
   (the paper's text); the rollout stage applies it and stores the bool, `gated_distillation`
   zeroes the divergence of gated-out rows in the trainer.

Shapes: B rows (trajectories), T completion tokens, V vocabulary, k stored teacher ids.
Training terms return `(per_token_loss (B, T), metrics)`; metrics are detached 0-dim tensors,
so the caller decides when to synchronise.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Estimator = Literal["grpo", "rloo"]
AggregateMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
DivergenceKind = Literal["jsd", "forward_kl", "reverse_kl"]
DistillNormalize = Literal["gate_open", "all"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Smallest tail mass the top-k bucket may hold: keeps log(tail) finite when the stored ids
# already cover (numerically) all the mass; its contribution to any divergence is then ~0.
_MIN_TAIL = 1e-30


# ----------------------------------------------------------------------------- helpers


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}; these inputs must have the same shape")


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    # where, not multiply: a non-finite value at a padded position must not leak into the mean
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def _upcast(x: Tensor) -> Tensor:
    # softmax statistics in bf16/fp16 lose too much; fp32 and fp64 stay as they are (no copy)
    return x.float() if x.dtype in _LOW_PRECISION else x


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x ≤ 0, stable at both ends (Mächler's two-branch rule).

    x is first clamped just below 0, so a total mass that rounds to ≥ 1 gives a tail of
    `_MIN_TAIL` instead of log(0) or a NaN. Each branch sees an input clamped into its own safe
    range, so neither produces an inf whose zero-weighted gradient would still become NaN.
    """
    x = x.clamp(max=-_MIN_TAIL)
    near_zero = x > -math.log(2.0)
    small = torch.log(-torch.expm1(x.clamp(min=-math.log(2.0))))
    large = torch.log1p(-torch.exp(x.clamp(max=-math.log(2.0))))
    return torch.where(near_zero, small, large)


def _kl_from_logprobs(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p‖q) summed over the last dim, from log-probabilities; 0·log 0 counts as 0."""
    support = logp > -math.inf
    logp_safe = torch.where(support, logp, torch.zeros_like(logp))  # no -inf reaches exp/sub
    terms = torch.where(support, logp_safe.exp() * (logp_safe - logq), torch.zeros_like(logp))
    return terms.sum(-1)


def _divergence_from_logprobs(
    student_logp: Tensor, teacher_logp: Tensor, *, kind: DivergenceKind, beta: float
) -> Tensor:
    """The divergence between two (…, V') log-distributions, summed over the last dim."""
    if kind == "forward_kl":
        return _kl_from_logprobs(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return _kl_from_logprobs(student_logp, teacher_logp)
    if kind != "jsd":
        raise ValueError(
            f"unknown divergence kind {kind!r}; use 'jsd', 'forward_kl' or 'reverse_kl'"
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} is outside [0, 1]; the JSD weight must be a probability")
    if beta == 0.0:
        return _kl_from_logprobs(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl_from_logprobs(student_logp, teacher_logp)
    mixture_logp = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    return beta * _kl_from_logprobs(teacher_logp, mixture_logp) + (1.0 - beta) * _kl_from_logprobs(
        student_logp, mixture_logp
    )


# ----------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    estimator: Estimator,
    scale_by_std: bool = False,
    eps: float = 1e-4,
) -> Tensor:
    """Per-row advantage against the row's own group; rows may come in any order.

    rewards: (N,) float; group_ids: (N,) integer, any values (e.g. prompt ids), not contiguous.
    grpo: A_i = r_i - mean(group) (eq. 6). rloo: A_i = r_i - mean of the other rows (eq. 4);
    a one-row group gets 0. scale_by_std divides either by (unbiased group std + eps).
    Returns (N,) in the rewards' floating dtype (float32 for integer rewards).
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (N,)"
        )
    if group_ids.is_floating_point():
        raise ValueError("group_ids must be an integer tensor (e.g. the prompt id of each row)")
    if estimator not in ("grpo", "rloo"):
        raise ValueError(f"unknown estimator {estimator!r}; use 'grpo' or 'rloo'")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.to(torch.float64)  # (N,) group sums of a few rows: exactness is free here
    _, inverse = torch.unique(group_ids, return_inverse=True)  # (N,) in 0..G-1
    n_groups = int(inverse.max()) + 1 if r.numel() else 0
    count = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(
        0, inverse, torch.ones_like(r)
    )  # (G,)
    total = torch.zeros_like(count).index_add_(0, inverse, r)  # (G,)
    mean = total / count  # (G,)
    n_i = count[inverse]  # (N,)
    if estimator == "grpo":
        adv = r - mean[inverse]
    else:
        others = (total[inverse] - r) / (n_i - 1).clamp(min=1)
        adv = torch.where(n_i > 1, r - others, torch.zeros_like(r))
    if scale_by_std:
        sq_dev = torch.zeros_like(count).index_add_(0, inverse, (r - mean[inverse]) ** 2)
        std = torch.sqrt(sq_dev / (count - 1).clamp(min=1))  # (G,) unbiased; 0 for one row
        adv = adv / (std[inverse] + eps)
    return adv.to(out_dtype)


# ----------------------------------------------------------------------------- policy term


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip: bool,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token policy-gradient loss (eq. 5 with the PPO min; to be minimised).

    logprobs, old_logprobs, mask: (B, T); advantages: (B,), one per trajectory.
    clip: -min(ρA, clip(ρ, 1-eps_low, 1+eps_high)·A); else -ρA. ρ = exp(logprobs - old_logprobs).
    Returns loss (B, T), zero where mask is 0, and metrics
    `clipfrac` (share of valid tokens where the clip binds; reported even when clip=False, as a
    drift diagnostic) and `approx_kl` (k3 estimate of KL(old‖new) over valid tokens).
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} must be (B,) = {tuple(logprobs.shape[:1])}"
        )
    mask = mask.bool()
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None].to(ratio.dtype)  # (B, 1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    objective = torch.minimum(unclipped, clipped) if clip else unclipped
    loss = torch.where(mask, -objective, torch.zeros_like(objective))
    with torch.no_grad():
        binds = (clipped < unclipped).to(ratio.dtype)
        metrics = {
            "clipfrac": _masked_mean(binds, mask),
            "approx_kl": _masked_mean((ratio - 1.0) - log_ratio, mask),
        }
    return loss, metrics


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: AggregateMode,
    *,
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    token_mean: Σ valid / #valid tokens. seq_mean_token_mean: mean over rows of each row's token
    mean. seq_mean_token_sum: mean over rows of each row's token sum. Rows without a valid token
    are left out of the row means. `denominator` replaces #tokens (token_mean) or #rows (seq
    modes), e.g. a count over the global batch so micro-batches and processes add up exactly.
    """
    _check_same_shape(loss=loss, mask=mask)
    mask = mask.bool()
    masked = torch.where(mask, loss, torch.zeros_like(loss))  # (B, T); NaN at pads stays out
    if mode == "token_mean":
        count = mask.sum() if denominator is None else denominator
        return masked.sum() / (count.clamp(min=1) if isinstance(count, Tensor) else max(count, 1))
    tokens_per_row = mask.sum(-1)  # (B,)
    if mode == "seq_mean_token_mean":
        per_row = masked.sum(-1) / tokens_per_row.clamp(min=1)
    elif mode == "seq_mean_token_sum":
        per_row = masked.sum(-1)
    else:
        raise ValueError(
            f"unknown aggregate mode {mode!r}; use 'token_mean', 'seq_mean_token_mean' "
            "or 'seq_mean_token_sum'"
        )
    rows = (tokens_per_row > 0).sum() if denominator is None else denominator
    return per_row.sum() / (rows.clamp(min=1) if isinstance(rows, Tensor) else max(rows, 1))


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 estimate of KL(π_θ‖π_ref) per sampled token: exp(ref - logp) - (ref - logp) - 1.

    logprobs, ref_logprobs: (B, T) of the sampled tokens. Returns (B, T), ≥ 0; mask via aggregate.
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    delta = ref_logprobs - logprobs  # (B, T)
    return torch.exp(delta) - delta - 1.0


# ----------------------------------------------------------------------------- log-probs


def token_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """log softmax(logits)[ids] without materialising the (B, T, V) log-softmax.

    logits: (B, T, V), row t predicting ids[:, t]; ids: (B, T) long. Returns (B, T), in float32
    for bf16/fp16 logits (upcast one row at a time to bound memory), else in the logits' dtype.
    """
    if logits.shape[:-1] != ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)}: expected (B, T, V) and (B, T)"
        )
    picked = logits.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    if logits.dtype in _LOW_PRECISION:
        lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])  # (B, T)
        return picked.float() - lse
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy H(softmax(logits)) = -Σ_v p_v log p_v over the last dim, in float32 for
    bf16/fp16 logits: (…, V) → (…)."""
    logp = F.log_softmax(_upcast(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- divergences


def _logprobs_from_logits(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; slice both to the shared vocabulary first"
        )
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    student_logp = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)  # (B, T, V)
    teacher_logp = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)  # (B, T, V)
    return student_logp, teacher_logp


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Generalized JSD(β) per token over the full vocabulary (TRL's GKD convention).

    m = β·p_T + (1-β)·p_S; JSD = β·KL(p_T‖m) + (1-β)·KL(p_S‖m); β=0 → KL(p_T‖p_S),
    β=1 → KL(p_S‖p_T) exactly. Both logits (B, T, V) are divided by `temperature` first.
    Returns (B, T). Gradients flow into whichever input requires them (pass teacher detached).
    """
    student_logp, teacher_logp = _logprobs_from_logits(student_logits, teacher_logits, temperature)
    return _divergence_from_logprobs(student_logp, teacher_logp, kind="jsd", beta=beta)


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """KL(p_T‖p_S) per token over the full vocabulary: (B, T, V) logits → (B, T)."""
    student_logp, teacher_logp = _logprobs_from_logits(student_logits, teacher_logits, temperature)
    return _divergence_from_logprobs(student_logp, teacher_logp, kind="forward_kl", beta=0.0)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """KL(p_S‖p_T) per token over the full vocabulary: (B, T, V) logits → (B, T)."""
    student_logp, teacher_logp = _logprobs_from_logits(student_logits, teacher_logits, temperature)
    return _divergence_from_logprobs(student_logp, teacher_logp, kind="reverse_kl", beta=1.0)


def full_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: DivergenceKind,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """One of the three divergences above, chosen by `kind` (beta used by 'jsd' only): (B, T)."""
    student_logp, teacher_logp = _logprobs_from_logits(student_logits, teacher_logits, temperature)
    return _divergence_from_logprobs(student_logp, teacher_logp, kind=kind, beta=beta)


def topk_divergence(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    kind: DivergenceKind,
    beta: float = 0.5,
) -> Tensor:
    """A divergence over the teacher's stored top-k support plus one tail bucket, per token.

    student_logits: (B, T, V); teacher_topk_ids: (B, T, k) long, distinct per position;
    teacher_topk_logprobs: (B, T, k), log-probs under the teacher's full distribution.
    Both distributions become k + 1 buckets: the k ids, and a tail holding 1 - (their mass),
    floored at 1e-30. Coarse-graining never raises a divergence, so the result is ≤ the
    full-vocabulary one, grows with k (nested supports), and equals it when k = V. Returns (B, T).
    """
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must have the same (B, T, k) shape"
        )
    if student_logits.shape[:-1] != teacher_topk_ids.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher top-k "
            f"{tuple(teacher_topk_ids.shape)} disagree on (B, T)"
        )
    ids = teacher_topk_ids.long()
    sorted_ids = ids.sort(dim=-1).values
    if (sorted_ids[..., 1:] == sorted_ids[..., :-1]).any():
        raise ValueError("teacher_topk_ids repeat an id at some position; store k distinct ids")
    logits = _upcast(student_logits)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, T, 1)
    student_top = logits.gather(-1, ids) - lse  # (B, T, k)
    teacher_top = _upcast(teacher_topk_logprobs).to(student_top.dtype)  # (B, T, k)
    student_tail = _log1mexp(torch.logsumexp(student_top, dim=-1, keepdim=True))  # (B, T, 1)
    teacher_tail = _log1mexp(torch.logsumexp(teacher_top, dim=-1, keepdim=True))  # (B, T, 1)
    student_logp = torch.cat([student_top, student_tail], dim=-1)  # (B, T, k+1)
    teacher_logp = torch.cat([teacher_top, teacher_tail], dim=-1)  # (B, T, k+1)
    return _divergence_from_logprobs(student_logp, teacher_logp, kind=kind, beta=beta)


GateComparator = Literal[">=", ">"]


def quality_gate(rewards: Tensor, *, tau: float, comparator: GateComparator) -> Tensor:
    """Eq. 7's indicator 𝟙[r_i ⋈ τ] per row: rewards (N,) → (N,) bool.

    comparator ">=" opens the gate at r_i ≥ τ (the authors' code), ">" at r_i > τ (the paper's
    text, §3.2.1). The reward is whichever part the caller gates on (total or accuracy).
    """
    if comparator == ">=":
        return rewards >= tau
    if comparator == ">":
        return rewards > tau
    raise ValueError(f"unknown gate comparator {comparator!r}; use '>=' or '>'")


def gated_distillation(divergence: Tensor, gate_open: Tensor) -> Tensor:
    """Eq. 7's indicator: keep a row's per-token divergence when its gate is open, else 0.

    divergence: (B, T); gate_open: (B,) bool. Gated-out rows are exactly 0 with exactly zero
    gradient into `divergence`; a NaN or inf there does not reach the output. Returns (B, T).
    """
    if gate_open.shape != divergence.shape[:1]:
        raise ValueError(
            f"gate_open {tuple(gate_open.shape)} must be (B,) = {tuple(divergence.shape[:1])}"
        )
    if gate_open.dtype != torch.bool:
        raise ValueError("gate_open must be a bool tensor (True where r_i passes the gate τ)")
    return torch.where(gate_open[:, None], divergence, torch.zeros_like(divergence))


# ----------------------------------------------------------------------------- baselines


def choose_gkd_source(generator: torch.Generator, lam: float, n: int) -> Tensor:
    """MM-GKD data selection: (n,) bool, True = train on the student's own sample (prob. λ),
    False = on the dataset's target. Reproducible from `generator`."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam} is outside [0, 1]; it is the probability of on-policy data")
    return torch.rand(n, generator=generator, device=generator.device) < lam


def gkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MM-GKD term: generalized JSD(β) on every valid token of the given sequences.

    student_logits, teacher_logits: (B, T, V); mask: (B, T). Which sequences (student sample or
    dataset target) is decided beforehand by `choose_gkd_source`. Returns loss (B, T), zero
    where mask is 0, and metrics `jsd` (mean over valid tokens).
    """
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask {tuple(mask.shape)} must be (B, T) = {tuple(student_logits.shape[:-1])}"
        )
    jsd = generalized_jsd(student_logits, teacher_logits, beta=beta, temperature=temperature)
    loss = torch.where(mask.bool(), jsd, torch.zeros_like(jsd))
    return loss, {"jsd": _masked_mean(jsd.detach(), mask)}


def sft_loss(logits: Tensor, target_ids: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Token cross-entropy on the dataset target: -log p(target).

    logits: (B, T, V), row t predicting target_ids[:, t]; target_ids, mask: (B, T).
    Returns loss (B, T), zero where mask is 0, and metrics `nll` (mean over valid tokens).
    """
    if mask.shape != target_ids.shape:
        raise ValueError(
            f"mask {tuple(mask.shape)} and target_ids {tuple(target_ids.shape)} differ"
        )
    nll = -token_logprobs(logits, target_ids)  # (B, T)
    loss = torch.where(mask.bool(), nll, torch.zeros_like(nll))
    return loss, {"nll": _masked_mean(nll.detach(), mask)}
