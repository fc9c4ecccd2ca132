"""The training stage: `train_iteration(run, k)` turns policy version k into version k + 1.

Inputs come only from the store, the curated Parquet and checkpoint folders:

- `prompts` of iteration k (the batch; each stored `training_prompt` must equal the prompt the
  templates render today for that question, else the templates changed since the rollout);
- `rollouts WHERE trained` (G rows per prompt: completion ids, old/reference log-probs,
  advantage, gate) for grpo/rloo/kepo/gkd, and `teacher_topk` for offline distillation;
- images re-read from the curated dataset (`run.questions().image(prompt_id)`), and the plain
  training prompt rebuilt with `kepo.prompts.build_messages`: injected hint-aware trajectories
  are trained under the plain prompt x (eq. 7), as every other row.

Per algorithm (`kepo.objectives` holds the math):
- grpo/rloo: policy term on the stored advantages (clipped when `algorithm.clip`), plus
  kl_coef · k3 against the stored reference log-probs.
- kepo: the same plus distill.coef · gated D. Online mode runs the teacher (loaded here from
  `models.teacher`, eval mode, no grad, `models.dtype`) on the gated-open rows only; offline mode
  reads the stored top-k (`teacher_topk`).
- gkd (MM-GKD): per prompt, with probability λ (`choose_gkd_source`, seeded per iteration) ONE
  of the prompt's rollout rows (its lowest sample_idx), else its dataset-target sequence, so λ is
  the fraction of training samples that are on-policy (GKD's definition); generalized JSD(β)
  against the online teacher on every row (no gate, no reward term).
- sft: cross-entropy on the dataset target of every prompt of the iteration (no teacher).
  The dataset target is "<think>{rationale}</think><answer>{gold}</answer>" in thinking mode when
  the curated row has a rationale, "<answer>{gold}</answer>" otherwise, followed by the
  tokenizer's end-of-turn token (so the model also learns to stop).

Optimisation. Rows are shuffled per pass with `train.seed + k`; an optimizer step takes
micro_batch_size × grad_accum_steps × num_processes rows (the last one fewer). Within a step the
rows are cut into micro-batches of `micro_batch_size` per process; every process runs the same
number of micro-batches (a process without rows in the last one runs a zero-weight copy of a row,
so DDP's gradient all-reduce lines up). Every loss term is divided by the count of the WHOLE
step (completion tokens for token_mean, sequences otherwise; kepo's distillation term, with
distill.normalize 'gate_open', by the completion tokens of the step's gate-open rows), so
micro-batches and processes add up to exactly the full-batch loss: one process with accumulation
equals several processes.
`Accelerator.backward` divides by its gradient_accumulation_steps and DDP averages over
processes; the loss is pre-multiplied by both to undo that.

The student's head. For grpo/rloo/kepo the forward stops at the final hidden states, and
`kepo.chunked` turns them into per-token log-probs and the gated divergence in blocks of at
most `train.logits_chunk_elements` logits (the teacher likewise hands over hidden states), so
the (B, T, V) logits never exist at once; `train.logits_chunk_elements: null` computes them
whole. The G rows of a prompt share its prompt and image: each distinct prompt of a micro-batch
is rendered and its image processed once (`build_sequence_batch(prompt_of_row=...)`), the
vision tower encodes each distinct image once (`vision_once_per_image`), and, on the chunked
path, the prompt tokens run through the model once per prompt, the completions of its G rows
on top of its key/value cache (`shared_prompt_hidden`; the one-pass forward under DDP or with
activation checkpointing) - the same values within float rounding (tests compare).

AdamW (lr, betas, weight decay); learning rate from `learning_rate_at` over the run's nominal
optimizer steps (cfg.iterations × `nominal_steps_per_iteration`), global step = k × nominal +
step. Gradient clipping at max_grad_norm (the pre-clip norm is recorded). A step whose loss or
gradient norm is not finite is skipped (gradients zeroed) and recorded as skipped.

State continuity. The AdamW moments (and step counts) of iteration k − 1 are loaded from
version k's `optimizer.pt` when it exists, so the optimizer continues across iterations as one
run; without it (version 0, save_optimizer off, or a version that is no longer the newest: only
the newest keeps its optimizer.pt, see `kepo.checkpoints`) AdamW starts fresh. With mixed
precision the student trains in float32 (master weights: bf16 weights would round updates of
lr 2e-6 away). The weights are saved in `train.save_dtype` (auto = the training dtype: bf16
under mixed_precision bf16, 4.3 GB for a 2B model instead of 8.5 GB). When that is below the
float32 the trainer holds, `optimizer.pt` also stores the float32 master weights, and the next
iteration resumes from them, so the small updates are not lost; a version without optimizer.pt
resumes from its saved (rounded) weights, with a warning. The rollout/evaluation stages cast the
weights to `models.dtype` on load.

Outputs (main process only; under FSDP gathered from the shards first): version k + 1 in `run.new_checkpoint_dir(k + 1)` (`policy-NNNN`,
or `policy-NNNN-2`, ... beside a recorded copy) — the model via `save_pretrained`, the
processor/tokenizer files copied byte for byte from version k's folder (the image-only
processor kepo builds without torchvision would otherwise write a processor class only kepo
knows), `optimizer.pt` when train.save_optimizer — then `train_steps` of iteration k
(replacing any earlier attempt) and the `checkpoints` row of version k + 1 (with its dtype and
bytes on disk), and only then is the previously recorded folder of version k + 1 removed (write
new, record, remove old). Older versions' optimizer state and folders (train.keep_checkpoints)
are removed by the stage runner once the stage is recorded as succeeded (`kepo.checkpoints`).

Several processes: `train.launcher: accelerate` with `train.num_processes: N` (and
`train.strategy: ddp`, or `fsdp` on GPUs: the student sharded by Accelerate's FSDP2, its full
weights and AdamW state gathered on every rank for the checkpoint and a resumed AdamW state
loaded into the shards, `kepo.sharded`). The training stage's process, which holds the stage's lease and writes
its `stages` row, then runs `accelerate launch ... -m kepo.train_stage --db FILE --run R
--iteration K` (kepo/launch.py; GPUs, and also a CPU-only machine, where models.device: cpu
makes every process a CPU process talking gloo) and waits; `kepo run`, the flows and
deployment, `kepo train` and `python -m kepo.train_stage` all go through it.
`kepo.train_stage.main` is what the ranks run. A manual `accelerate launch --multi_gpu
--num_processes N -m kepo.train_stage ...` or `torchrun --nproc_per_node N -m
kepo.train_stage ...` is a recorded stage too (rank 0 takes the lease), but a
rank that dies there takes rank 0 down before it can record the failure (the row stays
`running` until a rerun takes the dead lease over); the launcher records it. Note that
`accelerate launch --cpu --num_processes N` starts a single process unless an MPI hostfile is
given (accelerate's multi-CPU launcher is mpirun).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from kepo.algorithms import spec_for
from kepo.checkpoints import OPTIMIZER_FILE
from kepo.chunked import OnlineTeacher, TopkTeacher, align_open_rows, chunked_head_terms
from kepo.config import RunConfig
from kepo.losses import token_logprobs
from kepo.models import (
    assert_shared_vocabulary,
    batch_to,
    build_sequence_batch,
    cache_argument,
    completion_logits,
    completion_mask_of,
    image_patch_slices,
    load_policy,
    resolve_device,
    resolve_dtype,
    save_model,
    teacher_placement,
    vision_once_per_image,
)
from kepo.objectives import (
    ObjectiveOutput,
    dataset_target_text,
    gkd_objective,
    gkd_sources,
    grpo_objective,
    kepo_objective,
    offline_divergence,
    online_divergence,
    sft_objective,
)
from kepo.progress import progress
from kepo.prompts import PromptItem, build_messages, build_prompt_text
from kepo.ranks import fail_rank_hook
from kepo.run import Run
from kepo.sharded import (
    full_model_state,
    full_optimizer_state,
    is_fsdp_module,
    load_full_optimizer_state,
    sharded,
)
from kepo.tracking import export_train_steps, open_trackers

log = logging.getLogger(__name__)

LossPart = Literal["loss_pg", "loss_kl", "loss_distill", "loss_sft"]
LOSS_PARTS: tuple[LossPart, ...] = ("loss_pg", "loss_kl", "loss_distill", "loss_sft")
# Metrics that are token means: summed over micro-batches weighted by their token counts.
TOKEN_METRICS = ("clipfrac", "approx_kl", "entropy")
# Token metrics every algorithm reports (the others only the policy-gradient ones).
ALL_ALGORITHM_METRICS = ("entropy",)


class TrainingDataError(ValueError):
    """The stored rows of an iteration cannot be trained on (the message names the row and fix)."""


# ============================================================================ data


@dataclass(frozen=True)
class TrainRow:
    """One sequence of the iteration's training data: a rollout row or a dataset target."""

    prompt_id: str
    sample_idx: int | None
    """rollouts.sample_idx; None for a dataset target (sft, gkd)."""
    completion_ids: tuple[int, ...]
    advantage: float | None = None
    gate_open: bool = False
    old_logprobs: tuple[float, ...] | None = None
    ref_logprobs: tuple[float, ...] | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None

    @property
    def is_target(self) -> bool:
        return self.sample_idx is None

    @property
    def n_tokens(self) -> int:
        return len(self.completion_ids)


@dataclass
class TrainingData:
    """Rows to train on plus what rebuilding their prompts needs."""

    rows: list[TrainRow]
    items: dict[str, PromptItem]
    gkd_on_policy: dict[str, bool] = field(default_factory=dict)
    """gkd only: prompt_id -> True when its rollout rows are used (else its dataset target)."""


def target_token_ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    """Token ids of a target completion, ended by the end-of-turn (eos) token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise TrainingDataError("the tokenizer has no eos token; a target cannot be ended")
    return (*ids, int(tokenizer.eos_token_id))


def _as_tuple(values: Any) -> tuple | None:
    return None if values is None else tuple(values)


def load_training_data(run: Run, iteration: int, tokenizer: Any) -> TrainingData:
    """The iteration's training rows (module docstring), checked against the prompt templates."""
    cfg = run.config
    algo = cfg.algorithm
    where = {"run_id": run.run_id, "iteration": iteration}
    prompts = run.store.read("prompts", where, order_by=["batch_position", "prompt_id"]).to_pylist()
    if not prompts:
        raise TrainingDataError(
            f"run {run.run_id}: no prompts for iteration {iteration}; run the rollout stage of "
            f"iteration {iteration} first"
        )
    questions = run.questions()
    items: dict[str, PromptItem] = {}
    targets: dict[str, str] = {}
    for prompt in prompts:
        pid = prompt["prompt_id"]
        question = questions.row(pid)
        item = PromptItem.from_row(question)
        expected = build_prompt_text(item, "train", thinking=cfg.prompts.thinking)
        if prompt["training_prompt"] != expected:
            raise TrainingDataError(
                f"run {run.run_id}, iteration {iteration}, prompt {pid}: the stored "
                "training_prompt differs from the prompt the templates render now (the prompt "
                "templates or prompts.thinking changed since the rollout); rerun the rollout of "
                f"iteration {iteration}"
            )
        items[pid] = item
        targets[pid] = dataset_target_text(question, thinking=cfg.prompts.thinking)

    prompt_ids = [p["prompt_id"] for p in prompts]
    spec = spec_for(algo)
    if spec.trains_on == "targets":
        rows = [
            TrainRow(pid, None, target_token_ids(tokenizer, targets[pid])) for pid in prompt_ids
        ]
        return TrainingData(rows=rows, items=items)

    # gkd with λ = 0 trains on targets only: its rollout drew no samples
    uses_samples = spec.uses_policy_samples(algo)
    rollout_rows = _load_rollout_rows(run, iteration, set(prompt_ids)) if uses_samples else []
    if spec.trains_on == "rollouts_or_targets":
        on_policy = gkd_sources(prompt_ids, lam=algo.gkd_lambda, seed=run.seed("gkd", iteration))
        target_ids = {
            pid: target_token_ids(tokenizer, targets[pid])
            for pid in prompt_ids
            if not on_policy[pid]
        }
        rows = gkd_training_rows(prompt_ids, rollout_rows, target_ids, on_policy)
        return TrainingData(rows=rows, items=items, gkd_on_policy=on_policy)
    if spec.stores_teacher_topk(algo):
        rollout_rows = _attach_teacher_topk(run, iteration, rollout_rows)
    return TrainingData(rows=rollout_rows, items=items)


def gkd_training_rows(
    prompt_ids: Sequence[str],
    rollout_rows: Sequence[TrainRow],
    target_ids: dict[str, tuple[int, ...]],
    on_policy: dict[str, bool],
) -> list[TrainRow]:
    """MM-GKD's rows: ONE per prompt, its first trained rollout sample (on-policy, chosen with
    probability λ) or its dataset target, so λ is the fraction of training samples that are the
    student's own (GKD's definition; the authors generate one sample per prompt for an on-policy
    batch). `target_ids` holds the target of every off-policy prompt."""
    first_sample: dict[str, TrainRow] = {}
    for row in rollout_rows:
        best = first_sample.get(row.prompt_id)
        if best is None or (row.sample_idx or 0) < (best.sample_idx or 0):
            first_sample[row.prompt_id] = row
    rows = []
    for pid in prompt_ids:
        if not on_policy[pid]:
            rows.append(TrainRow(pid, None, target_ids[pid]))
        elif pid in first_sample:
            rows.append(first_sample[pid])
        else:
            raise TrainingDataError(
                f"prompt {pid}: MM-GKD chose the student's own sample but the prompt has no "
                "trained rollout row; rerun the rollout"
            )
    return rows


def _load_rollout_rows(run: Run, iteration: int, prompt_ids: set[str]) -> list[TrainRow]:
    spec = spec_for(run.config.algorithm)
    needs_ref = spec.needs_reference(run.config.algorithm)
    needs_rl = spec.policy_term
    table = run.store.read(
        "rollouts",
        {"run_id": run.run_id, "iteration": iteration, "trained": True},
        order_by=["prompt_id", "slot", "sample_idx"],
    )
    if not table.num_rows:
        raise TrainingDataError(
            f"run {run.run_id}: no trained rollout rows for iteration {iteration}; run the "
            f"rollout stage of iteration {iteration} first"
        )
    rows = []
    for r in table.to_pylist():
        name = f"run {run.run_id}, iteration {iteration}, rollout ({r['prompt_id']}, {r['sample_idx']})"
        if r["prompt_id"] not in prompt_ids:
            raise TrainingDataError(f"{name}: its prompt is not in `prompts`; rerun the rollout")
        ids = tuple(r["completion_ids"])
        if not ids:
            raise TrainingDataError(f"{name}: empty completion; rerun the rollout")
        if needs_rl:
            if r["advantage"] is None or r["old_logprobs"] is None:
                raise TrainingDataError(
                    f"{name}: trained row without advantage/old_logprobs; rerun the rollout"
                )
            if len(r["old_logprobs"]) != len(ids):
                raise TrainingDataError(
                    f"{name}: {len(r['old_logprobs'])} old log-probs for {len(ids)} tokens; "
                    "rerun the rollout"
                )
        if needs_ref and (r["ref_logprobs"] is None or len(r["ref_logprobs"]) != len(ids)):
            raise TrainingDataError(
                f"{name}: algorithm.kl_coef > 0 needs reference log-probs for every token; "
                "rerun the rollout with this config (it stores them when kl_coef > 0)"
            )
        rows.append(
            TrainRow(
                prompt_id=r["prompt_id"],
                sample_idx=int(r["sample_idx"]),
                completion_ids=ids,
                advantage=r["advantage"],
                gate_open=bool(r["gate_open"]),
                old_logprobs=_as_tuple(r["old_logprobs"]),
                ref_logprobs=_as_tuple(r["ref_logprobs"]) if needs_ref else None,
            )
        )
    return rows


def _attach_teacher_topk(run: Run, iteration: int, rows: list[TrainRow]) -> list[TrainRow]:
    if run.config.algorithm.distill.temperature != 1.0:
        raise TrainingDataError(
            "algorithm.distill.temperature applies to online distillation only (the stored top-k "
            "are temperature-1 log-probs); set it to 1.0 or use distill.mode: online"
        )
    stored = {
        (t["prompt_id"], int(t["sample_idx"])): t
        for t in run.store.read(
            "teacher_topk", {"run_id": run.run_id, "iteration": iteration}
        ).to_pylist()
    }
    out = []
    for row in rows:
        if not row.gate_open:
            out.append(row)
            continue
        t = stored.get((row.prompt_id, row.sample_idx))
        name = (
            f"run {run.run_id}, iteration {iteration}, rollout ({row.prompt_id}, {row.sample_idx})"
        )
        if t is None:
            raise TrainingDataError(
                f"{name}: gate open but no teacher_topk row; rerun the rollout with "
                "algorithm.distill.mode: offline"
            )
        if len(t["topk_ids"]) != row.n_tokens:
            raise TrainingDataError(
                f"{name}: teacher_topk has {len(t['topk_ids'])} positions for {row.n_tokens} "
                "tokens; rerun the rollout"
            )
        out.append(replace(row, topk_ids=t["topk_ids"], topk_logprobs=t["topk_logprobs"]))
    return out


# ============================================================================ plan


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: its rows, and which rows each process takes in each micro-batch."""

    pass_idx: int
    step: int
    rows: tuple[int, ...]
    micro_batches: tuple[tuple[tuple[int, ...], ...], ...]
    """micro_batches[j][p]: row indices process p runs in micro-batch j (possibly empty)."""


def plan_steps(
    n_rows: int,
    *,
    passes: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    num_processes: int,
    seed: int,
) -> list[StepPlan]:
    """Shuffled (per pass, seeded), deterministic split of rows into steps and shards."""
    rows_per_step = micro_batch_size * grad_accum_steps * num_processes
    per_micro = micro_batch_size * num_processes
    generator = torch.Generator().manual_seed(seed)
    plans = []
    for pass_idx in range(passes):
        order = torch.randperm(n_rows, generator=generator).tolist()
        for start in range(0, n_rows, rows_per_step):
            rows = tuple(order[start : start + rows_per_step])
            micro = []
            for m in range(0, len(rows), per_micro):
                chunk = rows[m : m + per_micro]
                micro.append(
                    tuple(
                        chunk[p * micro_batch_size : (p + 1) * micro_batch_size]
                        for p in range(num_processes)
                    )
                )
            plans.append(StepPlan(pass_idx, len(plans), rows, tuple(micro)))
    return plans


def nominal_steps_per_iteration(cfg: RunConfig, num_processes: int) -> int:
    """Optimizer steps of one iteration as planned from the config (for the LR schedule).

    Rows: prompts_per_iteration × group_size for the rollout-based policy algorithms,
    prompts_per_iteration for gkd (one sample or target per prompt) and sft.
    """
    t = cfg.train
    spec = spec_for(cfg.algorithm)
    rows = cfg.rollout.prompts_per_iteration
    if spec.trains_on == "rollouts":
        rows *= cfg.rollout.group_size
    passes = spec.passes(t)
    rows_per_step = t.micro_batch_size * t.grad_accum_steps * num_processes
    return passes * math.ceil(rows / rows_per_step)


def learning_rate_at(
    step: int,
    *,
    base_lr: float,
    schedule: Literal["constant", "linear", "cosine"],
    warmup_steps: int,
    total_steps: int,
) -> float:
    """LR of (0-based) global optimizer `step`: linear warm-up to base_lr over warmup_steps
    (step 0 already gets base_lr / warmup_steps), then constant, or linear / cosine decay that
    reaches 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r}; use constant, linear or cosine")


# ============================================================================ result


@dataclass(frozen=True)
class TrainResult:
    """What `train_iteration` did."""

    run_id: str
    iteration: int
    policy_version: int
    """The version written (iteration + 1)."""
    checkpoint_dir: Path
    optimizer_path: Path | None
    n_steps: int
    n_skipped: int
    n_sequences: int
    """Sequences trained on in one pass."""
    n_tokens: int
    """Completion tokens of those sequences."""
    final_loss: float | None
    wall_time_s: float
    steps: list[dict[str, Any]] = field(repr=False, default_factory=list)
    """The `train_steps` rows written."""


# ============================================================================ the trainer


# The Accelerate distributed types each train.strategy may run as (1 process: NO).
STRATEGY_TYPES = {
    "ddp": ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_HPU"),
    "fsdp": ("FSDP",),
    "deepspeed_zero3": ("DEEPSPEED",),
}


def make_accelerator(cfg: RunConfig) -> Any:
    """The default Accelerator of a run: CPU when models.device resolves to the CPU.

    Under a launch (train.launcher: accelerate, or a manual `accelerate launch`) the launcher's
    environment selects the distributed type and plugin (FSDP, DeepSpeed); an Accelerator that
    does not run the configured train.strategy is refused rather than trained silently (on the
    CPU Accelerate turns an FSDP launch into DDP).
    """
    from accelerate import Accelerator

    cpu = resolve_device(cfg.models.device).type == "cpu"
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
    )
    running = accelerator.distributed_type.name
    if running not in STRATEGY_TYPES[cfg.train.strategy]:
        raise ValueError(
            f"train.strategy={cfg.train.strategy} but Accelerate runs {running} here "
            f"({accelerator.num_processes} process(es), device {accelerator.device}): launch with "
            "train.launcher: accelerate on GPUs, or set train.strategy: ddp"
        )
    return accelerator


def _train_dtype(cfg: RunConfig) -> str:
    # Mixed precision keeps float32 master weights; autocast computes in bf16/fp16.
    return "float32" if cfg.train.mixed_precision != "no" else cfg.models.dtype


def checkpoint_dtype(cfg: RunConfig) -> str:
    """train.save_dtype resolved: auto = the mixed-precision dtype, else models.dtype."""
    if cfg.train.save_dtype != "auto":
        return cfg.train.save_dtype
    mixed = {"bf16": "bfloat16", "fp16": "float16"}
    return mixed.get(cfg.train.mixed_precision, cfg.models.dtype)


def loses_precision(held: torch.dtype, saved: torch.dtype) -> bool:
    """Whether casting `held` floats to `saved` rounds (finer steps) or clips (smaller range)."""
    a, b = torch.finfo(held), torch.finfo(saved)
    return b.eps > a.eps or b.max < a.max


def _previous_optimizer_state(run: Run, iteration: int) -> Path | None:
    """optimizer.pt saved with policy version `iteration`, if any."""
    if iteration == 0 or not run.config.train.save_optimizer:
        return None
    row = run.checkpoint_row(iteration)
    if row is None or not row["optimizer_path"]:
        log.warning(
            "policy version %d has no optimizer state (only the newest version keeps it): "
            "AdamW starts fresh from the saved %s weights",
            iteration,
            (row or {}).get("weights_dtype") or "",
        )
        return None
    path = run.resolve(row["optimizer_path"])
    return path if path.is_file() else None


@dataclass
class _Context:
    """Everything a micro-batch needs (built once per iteration)."""

    cfg: RunConfig
    accelerator: Any
    model: Any
    processor: Any
    teacher: Any | None
    teacher_processor: Any | None
    data: TrainingData
    questions: Any
    denominator: float = 1.0
    distill_denominator: float = 1.0
    """kepo with distill.normalize 'gate_open': completion tokens of the step's gate-open rows."""

    def sequences(self, rows: Sequence[TrainRow], processor: Any) -> dict[str, torch.Tensor]:
        thinking = self.cfg.prompts.thinking
        distinct = list(dict.fromkeys(r.prompt_id for r in rows))  # each prompt rendered once
        slot = {prompt_id: i for i, prompt_id in enumerate(distinct)}
        messages = [
            build_messages(self.data.items[prompt_id], "train", thinking=thinking)
            for prompt_id in distinct
        ]
        images = [self.questions.image(prompt_id) for prompt_id in distinct]
        return build_sequence_batch(
            processor,
            messages,
            images,
            [list(r.completion_ids) for r in rows],
            prompt_of_row=[slot[r.prompt_id] for r in rows],
        )

    def student_batch(self, rows: Sequence[TrainRow]) -> dict[str, Any]:
        dtype = next(self.model.parameters()).dtype
        batch = batch_to(self.sequences(rows, self.processor), self.accelerator.device, dtype)
        with self.accelerator.autocast():
            return vision_once_per_image(self.model, batch, [r.prompt_id for r in rows])

    @torch.no_grad()
    def teacher_logits(self, rows: Sequence[TrainRow], *, hidden: bool = False) -> torch.Tensor:
        """Teacher completion logits (n, T', V) of `rows` (T' = their longest completion), or
        with `hidden` its final hidden states (n, T', H_T) before the LM head."""
        assert self.teacher is not None
        dtype = next(self.teacher.parameters()).dtype
        batch = batch_to(
            self.sequences(rows, self.teacher_processor), self.accelerator.device, dtype
        )
        with self.accelerator.autocast():
            keys = [r.prompt_id for r in rows]
            batch = vision_once_per_image(self.teacher, batch, keys)
            if hidden:
                shared = shared_prompt_hidden(self.teacher, batch, keys)
                return completion_hidden(self.teacher, batch) if shared is None else shared
            return completion_logits(self.teacher, batch)


def _padded(values: Sequence[Sequence[float] | None], width: int, device: Any) -> torch.Tensor:
    out = torch.zeros((len(values), width), dtype=torch.float32)  # (B, T)
    for i, v in enumerate(values):
        if v:
            out[i, : len(v)] = torch.as_tensor(v, dtype=torch.float32)
    return out.to(device)


def _topk_tensors(
    rows: Sequence[TrainRow], width: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, k) ids and log-probs; placeholders (distinct ids, uniform mass) where none stored."""
    k = next(len(r.topk_ids[0]) for r in rows if r.topk_ids)
    ids = torch.arange(k).expand(len(rows), width, k).clone()  # (B, T, k)
    logprobs = torch.full((len(rows), width, k), -math.log(k + 1), dtype=torch.float32)
    for i, r in enumerate(rows):
        if r.topk_ids:
            if any(len(pos) != k for pos in r.topk_ids):
                raise TrainingDataError(
                    f"rollout ({r.prompt_id}, {r.sample_idx}): teacher_topk rows mix support "
                    "sizes; rerun the rollout"
                )
            ids[i, : r.n_tokens] = torch.as_tensor(r.topk_ids, dtype=torch.long)
            logprobs[i, : r.n_tokens] = torch.as_tensor(r.topk_logprobs, dtype=torch.float32)
    return ids.to(device), logprobs.to(device)


def _rl_inputs(ctx: _Context, rows: Sequence[TrainRow], logprobs: torch.Tensor) -> dict:
    algo = ctx.cfg.algorithm
    width = logprobs.shape[1]
    device = logprobs.device
    return {
        "logprobs": logprobs,  # (B, T)
        "old_logprobs": _padded([r.old_logprobs for r in rows], width, device),
        "advantages": torch.tensor([r.advantage for r in rows], dtype=torch.float32, device=device),
        "ref_logprobs": _padded([r.ref_logprobs for r in rows], width, device)
        if algo.kl_coef > 0
        else None,
        "clip": algo.clip,
        "eps_low": algo.clip_eps_low,
        "eps_high": algo.clip_eps_high,
        "kl_coef": algo.kl_coef,
        "aggregation": algo.aggregation,
        "denominator": ctx.denominator,
    }


def completion_hidden(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states (B, Tc, H) at the positions `completion_logits` would turn into
    logits: the same forward (through any DDP wrapper) with the LM head swapped for identity."""
    inner = model.module if hasattr(model, "module") else model
    head = inner.lm_head
    if is_fsdp_module(head):
        # Accelerate's FSDP2 shards the LM head as a unit of its own: it stays in the module
        # tree (where FSDP finds its state) and runs its hooks, which gather its weight for
        # the chunked head and reduce its gradient in the backward; only its matmul is skipped.
        head.forward = _identity
        try:
            return completion_logits(model, batch)
        finally:
            del head.forward
    inner.lm_head = torch.nn.Identity()
    try:
        return completion_logits(model, batch)
    finally:
        inner.lm_head = head


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def shared_prompt_hidden(
    model: Any, batch: dict[str, Any], prompt_keys: Sequence[str]
) -> torch.Tensor | None:
    """`completion_hidden(model, batch)` with each distinct prompt run through the model ONCE.

    The G rows of a prompt share its P prompt tokens, and under the causal mask the prompt's
    hidden states and keys/values do not depend on the completion. So the prompt of each
    distinct key (`prompt_keys[b]` names row b's prompt) is run once, with a key/value cache;
    the cache is indexed out to the B rows (autograd sums the rows' gradients into it) and
    the completion tokens of every row run on top of it. The positions (Qwen3-VL's 3-D rope)
    are those the one-pass forward computes (`get_rope_index` on the whole batch), sliced, so
    the result equals the one-pass forward within float rounding. The position predicting the
    first completion token is the prompt's last one, shared by the rows.

    None (the caller runs the one-pass forward) when no prompt repeats, when rows with one key
    differ in their prompt tokens, when some row has no image while others do, under a DDP
    wrapper (two forwards per backward), for an FSDP-sharded model (the inner model called
    outside the model's forward sees shards) or with gradient checkpointing (no cache in
    training).
    """
    inner = getattr(model, "model", None)
    rope_index = getattr(inner, "get_rope_index", None)
    cache_name = cache_argument(inner) if inner is not None else None
    if (
        hasattr(model, "module")
        or is_fsdp_module(model)
        or inner is None
        or rope_index is None
        or cache_name is None
        or getattr(model, "is_gradient_checkpointing", False)
        or len(set(prompt_keys)) == len(prompt_keys)
        or len(prompt_keys) != batch["input_ids"].shape[0]
    ):
        return None
    first_row: dict[str, int] = {}
    source = [first_row.setdefault(key, row) for row, key in enumerate(prompt_keys)]
    distinct = sorted(first_row.values())
    slot = {row: i for i, row in enumerate(distinct)}
    rows = torch.tensor([slot[r] for r in source])  # (B,) on the CPU: indexes any device
    ids, attention = batch["input_ids"], batch["attention_mask"]  # (B, P + Tc)
    width = batch["completion_ids"].shape[1]
    prompt = ids.shape[1] - width
    same = torch.tensor(source, device=ids.device)
    if not (
        torch.equal(ids[:, :prompt], ids[same, :prompt])
        and torch.equal(attention[:, :prompt], attention[same, :prompt])
    ):
        return None
    grid = batch.get("image_grid_thw")
    encoded = batch.get("mm_encoder_outputs")
    prompt_inputs: dict[str, Any] = {}
    if grid is not None:
        if grid.shape[0] != len(prompt_keys):
            return None
        prompt_inputs["image_grid_thw"] = grid[distinct]
        if encoded is not None:
            prompt_inputs["mm_encoder_outputs"] = {
                "image": _features_of_rows(encoded["image"], distinct)
            }
        else:
            patches = image_patch_slices(grid)
            prompt_inputs["pixel_values"] = torch.cat(
                [batch["pixel_values"][patches[r]] for r in distinct]
            )
    position_ids, _ = rope_index(
        ids,
        image_grid_thw=grid,
        attention_mask=attention,
        mm_token_type_ids=batch.get("mm_token_type_ids"),
    )  # (3, B, P + Tc), as the one-pass forward computes them
    head = inner(
        input_ids=ids[distinct, :prompt],
        attention_mask=attention[distinct, :prompt],
        position_ids=position_ids[:, distinct, :prompt],
        use_cache=True,
        **prompt_inputs,
    )
    cache = getattr(head, "cache", None)  # 5.2x; `past_key_values` there warns as deprecated
    if cache is None:
        cache = head.past_key_values  # 5.19 and older
    cache.batch_select_indices(rows)  # (n_prompts, ...) -> (B, ...), differentiable
    tail = inner(
        input_ids=ids[:, prompt:],
        attention_mask=attention,
        position_ids=position_ids[:, :, prompt:],
        use_cache=False,
        **{cache_name: cache},
    )
    last_prompt = head.last_hidden_state[rows, -1:]  # (B, 1, H): predicts completion token 0
    return torch.cat([last_prompt, tail.last_hidden_state[:, :-1]], dim=1)  # (B, Tc, H)


def _features_of_rows(features: Any, rows: Sequence[int]) -> Any:
    """A copy of vision features whose per-row tuples keep only `rows`."""
    out = copy.copy(features)
    out.pooler_output = tuple(features.pooler_output[r] for r in rows)
    out.deepstack_features = [
        tuple(layer[r] for r in rows) for layer in features.deepstack_features
    ]
    return out


def _lm_head_weight(model: Any) -> torch.Tensor:
    inner = model.module if hasattr(model, "module") else model
    if getattr(inner.lm_head, "bias", None) is not None:
        raise ValueError(
            "the chunked log-prob path expects an LM head without bias; set "
            "train.logits_chunk_elements: null"
        )
    weight = inner.lm_head.weight  # (V, H)
    if is_fsdp_module(inner.lm_head) and not isinstance(weight, torch.nn.Parameter):
        raise RuntimeError(
            "the sharded LM head is not gathered: its (identity) forward in completion_hidden "
            "must run before its weight is used"
        )
    return weight


def _student_terms(
    ctx: _Context, rows: Sequence[TrainRow], batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The one place where the student's (and teacher's) head becomes per-token terms:
    log-probs of the completion (B, T), for kepo the gated divergence (B, T) (None when
    no row is distilled), and the policy's mean token entropy on the completions (a detached
    0-dim diagnostic). With `train.logits_chunk_elements` the (B, T, V) logits are never
    materialised (`kepo.chunked`); without it the plain path computes them at once."""
    cfg = ctx.cfg
    distill = cfg.algorithm.distill
    ids = batch["completion_ids"]
    mask = completion_mask_of(batch).bool()
    gate_open = torch.tensor([r.gate_open for r in rows], dtype=torch.bool, device=ids.device)
    distilled = spec_for(cfg.algorithm).gated and bool(gate_open.any())
    open_rows = [r for r in rows if r.gate_open]
    chunk_elements = cfg.train.logits_chunk_elements
    if chunk_elements is None:
        logits = completion_logits(ctx.model, batch)  # (B, T, V)
        logprobs = token_logprobs(logits, ids)  # (B, T)
        entropy = mean_token_entropy(logits, mask)
        if not distilled:
            return logprobs, None, entropy
        if distill.mode == "online":
            divergence = online_divergence(
                logits,
                ctx.teacher_logits(open_rows),  # the teacher runs on the open rows only
                gate_open,
                kind=distill.divergence,
                beta=distill.jsd_beta,
                temperature=distill.temperature,
            )
        else:
            topk_ids, topk_logprobs = _topk_tensors(rows, logits.shape[1], logits.device)
            divergence = offline_divergence(
                logits, topk_ids, topk_logprobs, kind=distill.divergence, beta=distill.jsd_beta
            )
        return logprobs, divergence, entropy

    # The shared-prompt forward calls the inner model, past the autocast and fp32-output
    # wrapper `accelerator.prepare` puts on the student's forward; it gets the same here.
    with ctx.accelerator.autocast():
        hidden = shared_prompt_hidden(ctx.model, batch, [r.prompt_id for r in rows])
    if hidden is None:
        hidden = completion_hidden(ctx.model, batch)  # (B, T, H)
    elif ctx.accelerator.mixed_precision != "no":
        hidden = hidden.float()
    teacher: OnlineTeacher | TopkTeacher | None = None
    if distilled and distill.mode == "online":
        teacher_hidden = ctx.teacher_logits(open_rows, hidden=True)  # (n_open, T', H_T)
        teacher = OnlineTeacher(
            align_open_rows(teacher_hidden, gate_open, ids.shape[1]),
            _lm_head_weight(ctx.teacher),
            temperature=distill.temperature,
        )
    elif distilled:
        teacher = TopkTeacher(*_topk_tensors(rows, ids.shape[1], ids.device))
    weight = _lm_head_weight(ctx.model)
    with ctx.accelerator.autocast():  # the LM head runs in the precision the forward uses
        terms = chunked_head_terms(
            hidden,
            weight,
            ids,
            chunk_size=max(1, chunk_elements // weight.shape[0]),  # positions per chunk
            mask=mask,
            teacher=teacher,
            distill_rows=gate_open,
            kind=distill.divergence,
            beta=distill.jsd_beta,
            entropy=True,
        )
    assert terms.entropy is not None
    entropy = (terms.entropy * mask).sum() / mask.sum().clamp(min=1)  # detached (B, T) -> ()
    return terms.logprobs, terms.divergence, entropy.float()


def _loss_policy(ctx: _Context, rows: Sequence[TrainRow]) -> ObjectiveOutput:
    """grpo / rloo."""
    batch = ctx.student_batch(rows)
    logprobs, _, entropy = _student_terms(ctx, rows, batch)
    mask = completion_mask_of(batch).bool()
    out = grpo_objective(mask=mask, **_rl_inputs(ctx, rows, logprobs))
    out.metrics["entropy"] = entropy
    return out


def _loss_kepo(ctx: _Context, rows: Sequence[TrainRow]) -> ObjectiveOutput:
    distill = ctx.cfg.algorithm.distill
    batch = ctx.student_batch(rows)
    logprobs, divergence, entropy = _student_terms(ctx, rows, batch)
    mask = completion_mask_of(batch).bool()
    gate_open = torch.tensor([r.gate_open for r in rows], dtype=torch.bool, device=mask.device)
    if divergence is None:
        divergence = logprobs.new_zeros(logprobs.shape)  # no open gate in this micro-batch
    out = kepo_objective(
        mask=mask,
        divergence=divergence,
        gate_open=gate_open,
        distill_coef=distill.coef,
        distill_normalize=distill.normalize,
        distill_denominator=ctx.distill_denominator,
        **_rl_inputs(ctx, rows, logprobs),
    )
    out.metrics["entropy"] = entropy
    return out


def _loss_gkd(ctx: _Context, rows: Sequence[TrainRow]) -> ObjectiveOutput:
    distill = ctx.cfg.algorithm.distill
    batch = ctx.student_batch(rows)
    logits = completion_logits(ctx.model, batch)  # (B, T, V)
    mask = completion_mask_of(batch).bool()
    teacher = ctx.teacher_logits(rows)  # (B, T, V'): same rows, same completion width
    out = gkd_objective(
        logits,
        teacher,
        mask,
        beta=distill.jsd_beta,
        temperature=distill.temperature,
        aggregation=ctx.cfg.algorithm.aggregation,
        denominator=ctx.denominator,
    )
    return _with_entropy(out, logits, mask)


def _loss_sft(ctx: _Context, rows: Sequence[TrainRow]) -> ObjectiveOutput:
    batch = ctx.student_batch(rows)
    logits = completion_logits(ctx.model, batch)  # (B, T, V)
    mask = completion_mask_of(batch).bool()
    out = sft_objective(
        logits,
        batch["completion_ids"],
        mask,
        aggregation=ctx.cfg.algorithm.aggregation,
        denominator=ctx.denominator,
    )
    return _with_entropy(out, logits, mask)


def mean_token_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked tokens of the policy's entropy H = -sum_v p_v log p_v (nats).

    logits (B, T, V), mask (B, T) bool; returns a detached 0-dim float32 tensor (0 when the mask
    is empty). A diagnostic: computed without grad from the logits the loss already holds, one
    sequence at a time, so the extra memory is a few (T, V) float32 blocks, not (B, T, V).
    """
    with torch.no_grad():
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for row_logits, row_mask in zip(logits, mask, strict=True):  # (T, V), (T,)
            if not row_mask.any():
                continue
            logp = torch.log_softmax(row_logits[row_mask].float(), dim=-1)  # (t, V)
            plogp = torch.where(logp > -math.inf, logp.exp() * logp, 0.0)  # 0 log 0 = 0
            total -= plogp.sum()
        return total / mask.sum().clamp(min=1)


def _with_entropy(
    out: ObjectiveOutput, logits: torch.Tensor, mask: torch.Tensor
) -> ObjectiveOutput:
    out.metrics["entropy"] = mean_token_entropy(logits, mask)
    return out


def _loss_padding(ctx: _Context, rows: Sequence[TrainRow]) -> ObjectiveOutput:
    """A zero-weight forward for a process without rows in a micro-batch (keeps DDP in step)."""
    batch = ctx.student_batch(rows)
    return ObjectiveOutput(loss=completion_logits(ctx.model, batch).sum() * 0.0)


# One function per loss, all with the signature (context, rows) -> ObjectiveOutput; each
# algorithm names its own in `kepo.algorithms.AlgorithmSpec.loss`.
MICRO_BATCH_LOSS = {
    "policy": _loss_policy,
    "kepo": _loss_kepo,
    "gkd": _loss_gkd,
    "sft": _loss_sft,
}


def _step_denominator(cfg: RunConfig, rows: Sequence[TrainRow]) -> float:
    if cfg.algorithm.aggregation == "token_mean":
        return float(sum(r.n_tokens for r in rows))
    return float(sum(1 for r in rows if r.n_tokens > 0))


def _needs_teacher(cfg: RunConfig, data: TrainingData) -> bool:
    return spec_for(cfg.algorithm).teacher_in_trainer(
        cfg.algorithm, any(r.gate_open for r in data.rows)
    )


def train_iteration(run: Run, iteration: int, *, accelerator: Any = None) -> TrainResult:
    """Train policy version `iteration` on the iteration's stored rows; write version + 1.

    Callable in-process (one process; a default Accelerator from the config) or under
    `accelerate launch` / `torchrun` (pass nothing: the launched environment configures the
    Accelerator); `accelerator` lets a caller pass its own.
    Only the main process writes the checkpoint and the store.
    """
    t_start = time.perf_counter()
    cfg = run.config
    if iteration < 0:
        raise ValueError(f"iteration must be ≥ 0, got {iteration}")
    if cfg.models.torch_threads:
        torch.set_num_threads(cfg.models.torch_threads)
    accelerator = accelerator or make_accelerator(cfg)
    torch.manual_seed(cfg.train.seed + iteration)  # dropout, if the model has any
    # Trackers of train.report_to start before any work, so a missing package fails fast.
    trackers = open_trackers(run) if accelerator.is_main_process else []

    policy_dir = run.policy_path(iteration)
    model, processor = load_policy(
        policy_dir,
        dtype=_train_dtype(cfg),
        device=accelerator.device,
        attn_implementation=cfg.models.attn_implementation,
    )
    previous = _previous_optimizer_state(run, iteration)
    previous_state = (
        torch.load(previous, map_location="cpu", weights_only=True) if previous else None
    )
    if previous_state is not None and "master_weights" in previous_state:
        # the float32 weights the previous iteration ended with (the folder holds a rounded copy)
        model.load_state_dict(previous_state["master_weights"])
        log.info("resumed from the float32 master weights in %s", previous)
    tokenizer = getattr(processor, "tokenizer", processor)
    data = load_training_data(run, iteration, tokenizer)

    teacher = teacher_processor = None
    if _needs_teacher(cfg, data):
        if cfg.models.teacher is None:  # the config validator already prevents this
            raise ValueError(f"algorithm {cfg.algorithm.name} needs models.teacher")
        teacher, teacher_processor = load_policy(
            cfg.models.teacher,
            dtype=cfg.models.dtype,
            device=accelerator.device,
            attn_implementation=cfg.models.attn_implementation,
            **teacher_placement(cfg.models),
        )
        teacher.requires_grad_(False)
        assert_shared_vocabulary(processor, teacher_processor)

    model.train()
    if cfg.train.gradient_checkpointing:
        # non-reentrant checkpointing works under DDP and with frozen inputs
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.train.learning_rate,
        betas=tuple(cfg.train.adam_betas),
        weight_decay=cfg.train.weight_decay,
    )
    shards = sharded(accelerator)  # FSDP: each rank holds a shard of weights and AdamW state
    if previous_state is not None and not shards:
        optimizer.load_state_dict(previous_state["optimizer"])
        log.info("loaded AdamW state of version %d from %s", iteration, previous)
    resume_optimizer = (
        previous_state["optimizer"] if previous_state is not None and shards else None
    )
    del previous_state
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_optimizer is not None:
        # into the sharded optimizer, after prepare: collective, every rank passes the full state
        load_full_optimizer_state(model, optimizer, resume_optimizer)
        log.info("loaded AdamW state of version %d from %s into its shards", iteration, previous)
        del resume_optimizer

    n_proc = accelerator.num_processes
    spec = spec_for(cfg.algorithm)
    plans = plan_steps(
        len(data.rows),
        passes=spec.passes(cfg.train),
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum_steps=cfg.train.grad_accum_steps,
        num_processes=n_proc,
        seed=cfg.train.seed + iteration,
    )
    nominal = nominal_steps_per_iteration(cfg, n_proc)
    total_steps = max(cfg.iterations, iteration + 1) * nominal
    ctx = _Context(
        cfg, accelerator, model, processor, teacher, teacher_processor, data, run.questions()
    )
    loss_fn = MICRO_BATCH_LOSS[spec.loss]
    # Undo Accelerator.backward's division by its accumulation steps and DDP's mean over
    # processes: the loss is already normalised by the whole step's count.
    backward_scale = float(accelerator.gradient_accumulation_steps * n_proc)
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else math.inf

    step_rows: list[dict[str, Any]] = []
    with progress(
        len(plans),
        f"train iteration {iteration}",
        unit="optimizer steps",
        enabled=accelerator.is_main_process,
    ) as advance:
        for plan in plans:
            step_rows.append(
                _optimizer_step(
                    ctx,
                    plan,
                    loss_fn,
                    optimizer,
                    backward_scale,
                    max_norm,
                    global_step=iteration * nominal + plan.step,
                    total_steps=total_steps,
                    run_id=run.run_id,
                    iteration=iteration,
                )
            )
            advance()

    accelerator.wait_for_everyone()
    version = iteration + 1
    full_weights = full_optimizer = None
    if shards:
        # Gathered on EVERY rank (collective calls; the main process alone would wait forever),
        # kept by the main process only.
        full_weights = full_model_state(model)
        if cfg.train.save_optimizer:
            full_optimizer = full_optimizer_state(model, optimizer)
    if accelerator.is_main_process:
        last_global = step_rows[-1]["global_step"] if step_rows else iteration * nominal - 1
        trained = accelerator.unwrap_model(model).eval()
        save_dtype = checkpoint_dtype(cfg)
        # Saved below the precision trained in: optimizer.pt keeps the exact weights to resume.
        lossy = any(
            p.is_floating_point() and loses_precision(p.dtype, resolve_dtype(save_dtype))
            for p in trained.parameters()
        )
        master = {}
        if lossy:
            master["master_weights"] = full_weights if shards else trained.state_dict()
        optimizer_state = (
            {
                "optimizer": optimizer.state_dict() if full_optimizer is None else full_optimizer,
                "scheduler": {
                    "schedule": cfg.train.lr_schedule,
                    "warmup_steps": cfg.train.warmup_steps_for(total_steps),
                    "total_steps": total_steps,
                    "last_global_step": last_global,
                },
                "iteration": iteration,
                **master,
            }
            if cfg.train.save_optimizer
            else None
        )
        # Write new, record, then remove old: a kill at any point leaves the row pointing at a
        # complete folder (a rerun writes beside the recorded copy, never over it).
        previous_dir = run.recorded_checkpoint(version)
        out_dir = save_model(
            trained,
            policy_dir,
            run.new_checkpoint_dir(version),
            extra={OPTIMIZER_FILE: optimizer_state} if optimizer_state is not None else None,
            dtype=save_dtype,
            state_dict=full_weights,
        )
        optimizer_path = out_dir / OPTIMIZER_FILE if optimizer_state is not None else None
        run.store.overwrite_partition("train_steps", step_rows, run.run_id, iteration)
        run.record_checkpoint(
            version,
            out_dir,
            optimizer_path=optimizer_path,
            n_params=n_params,
            weights_dtype=save_dtype,
        )
        export_train_steps(trackers, step_rows)
        if previous_dir is not None and previous_dir != out_dir and run.owns(previous_dir):
            shutil.rmtree(previous_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    out_dir = run.policy_path(version)

    finite = [
        r["loss_total"] for r in step_rows if r["loss_total"] is not None and not r["skipped"]
    ]
    result = TrainResult(
        run_id=run.run_id,
        iteration=iteration,
        policy_version=version,
        checkpoint_dir=out_dir,
        optimizer_path=out_dir / OPTIMIZER_FILE if cfg.train.save_optimizer else None,
        n_steps=len(step_rows),
        n_skipped=sum(1 for r in step_rows if r["skipped"]),
        n_sequences=len(data.rows),
        n_tokens=sum(r.n_tokens for r in data.rows),
        final_loss=finite[-1] if finite else None,
        wall_time_s=time.perf_counter() - t_start,
        steps=step_rows,
    )
    if accelerator.is_main_process:
        log.info(
            "run %s iteration %d: %d steps (%d skipped) on %d sequences, final loss %s, %.1f s "
            "on %d process%s",
            run.run_id,
            iteration,
            result.n_steps,
            result.n_skipped,
            result.n_sequences,
            f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a",
            result.wall_time_s,
            n_proc,
            "es" if n_proc > 1 else "",
        )
    return result


def _optimizer_step(
    ctx: _Context,
    plan: StepPlan,
    loss_fn: Any,
    optimizer: Any,
    backward_scale: float,
    max_norm: float,
    *,
    global_step: int,
    total_steps: int,
    run_id: str,
    iteration: int,
) -> dict[str, Any]:
    """Run one optimizer step of `plan`; return its `train_steps` row."""
    t0 = time.perf_counter()
    cfg, accelerator, model = ctx.cfg, ctx.accelerator, ctx.model
    rows = [ctx.data.rows[i] for i in plan.rows]
    ctx.denominator = _step_denominator(cfg, rows)
    ctx.distill_denominator = float(sum(r.n_tokens for r in rows if r.gate_open))
    n_tokens = sum(r.n_tokens for r in rows)

    # [total loss, each loss part, token-weighted metric sums, "part present" flags]
    n_parts, n_metrics = len(LOSS_PARTS), len(TOKEN_METRICS)
    sums = torch.zeros(1 + 2 * n_parts + n_metrics, dtype=torch.float64)
    last = len(plan.micro_batches) - 1
    for j, micro in enumerate(plan.micro_batches):
        local = [ctx.data.rows[i] for i in micro[accelerator.process_index]]
        fn = loss_fn if local else _loss_padding
        local = local or [rows[0]]
        sync = j == last
        context = contextlib.nullcontext() if sync else accelerator.no_sync(model)
        with context:
            out = fn(ctx, local)
            fail_rank_hook(accelerator.process_index)  # test hook (KEPO_FAIL_RANK); no-op
            accelerator.backward(out.loss * backward_scale)
        if fn is _loss_padding:
            continue
        sums[0] += float(out.loss.detach())
        for p, name in enumerate(LOSS_PARTS):
            if name in out.parts:
                sums[1 + p] += float(out.parts[name])
                sums[1 + n_parts + p] = 1.0
        local_tokens = sum(r.n_tokens for r in local)
        for m, name in enumerate(TOKEN_METRICS):
            if name in out.metrics:
                sums[1 + 2 * n_parts + m] += float(out.metrics[name]) * local_tokens

    sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    loss_total = float(sums[0])
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    lr = learning_rate_at(
        global_step,
        base_lr=cfg.train.learning_rate,
        schedule=cfg.train.lr_schedule,
        warmup_steps=cfg.train.warmup_steps_for(total_steps),
        total_steps=total_steps,
    )
    skip_reason = None
    if not math.isfinite(loss_total):
        skip_reason = f"non-finite loss ({loss_total})"
    elif not math.isfinite(grad_norm):
        skip_reason = f"non-finite gradient norm ({grad_norm})"
    if skip_reason is None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    else:
        log.warning("iteration %d step %d skipped: %s", iteration, plan.step, skip_reason)
    optimizer.zero_grad(set_to_none=True)

    def part(p: int) -> float | None:
        return float(sums[1 + p]) if sums[1 + n_parts + p] > 0 else None

    metrics = spec_for(cfg.algorithm).metrics

    def metric(m: int) -> float | None:
        present = TOKEN_METRICS[m] in metrics or TOKEN_METRICS[m] in ALL_ALGORITHM_METRICS
        return float(sums[1 + 2 * n_parts + m]) / max(n_tokens, 1) if present else None

    def finite_or_none(x: float) -> float | None:
        return x if math.isfinite(x) else None

    row = {
        "run_id": run_id,
        "iteration": iteration,
        "step": plan.step,
        "global_step": global_step,
        "pass_idx": plan.pass_idx,
        "loss_total": finite_or_none(loss_total),
        **{name: part(p) for p, name in enumerate(LOSS_PARTS)},
        **{name: metric(m) for m, name in enumerate(TOKEN_METRICS)},
        "gate_frac_open": (sum(r.gate_open for r in rows) / len(rows))
        if "gate_frac_open" in metrics
        else None,
        "grad_norm": finite_or_none(grad_norm),
        "lr": lr,
        "n_sequences": len(rows),
        "n_tokens": n_tokens,
        "step_time_s": time.perf_counter() - t0,
        "skipped": skip_reason is not None,
        "skip_reason": skip_reason,
    }
    for name in LOSS_PARTS:
        if row[name] is not None and not math.isfinite(row[name]):
            row[name] = None
    return row
