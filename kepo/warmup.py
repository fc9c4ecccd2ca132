"""Warm-up of the tiny models: the role instruction tuning plays for real checkpoints.

A freshly built tiny Qwen3-VL model emits noise, so on its own it can neither follow the answer
format nor write a hint, and no RL method could show anything. Before a demo or a study, both
tiny models get a short supervised warm-up on the bundled data's reference texts:

- the **teacher** on every modality of the train pool (`pool.parquet`, never the test split):
  the plain prompt -> "<think>{rationale}</think><answer>{letter}</answer>", and the hint
  request (which contains the answer) -> "<hint>{reference hint}</hint>". It "knows the answers".
- the **student** on the answer format and on following hint-aware prompts, but only on the
  out-of-domain modalities: the plain prompt and the hint-aware prompt (hint + given answer) ->
  the same target. It never sees an in-domain item, so the in-domain task starts near chance —
  the learning-cliff regime the paper studies — while hint-aware prompts are already followed.

Which modalities the student sees and how long each model trains are settings (`WarmupSettings`).
Real checkpoints (Qwen3-VL-2B / 32B) need no warm-up.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kepo.dataset import QuestionSet
from kepo.losses import sft_loss
from kepo.models import (
    build_sequence_batch,
    completion_logits,
    completion_mask_of,
    load_policy,
    save_model,
)
from kepo.objectives import dataset_target_text
from kepo.progress import progress
from kepo.prompts import PromptItem, build_messages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SftExample:
    """One supervised example: a question, the prompt messages, and the target completion."""

    question_id: str
    messages: list[dict]
    target: str


@dataclass
class WarmupSettings:
    """How long and on what each tiny model is warmed up."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Examples per step."""
    learning_rate: float = 2e-3
    """AdamW learning rate (cosine decay to 10 %)."""
    seed: int = 0
    """Seed of the example order."""
    torch_threads: int | None = None
    """torch.set_num_threads during the warm-up."""
    answer_weight: float = 10.0
    """Loss weight of the tokens inside <answer>...</answer> (the letter) relative to the others:
    the rationale is long and easy to memorise, the one letter that matters is not."""


@dataclass
class WarmupReport:
    model_dir: Path
    n_examples: int
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list, repr=False)


def _item(row: dict) -> PromptItem:
    return PromptItem.from_row(row)


def teacher_examples(rows: Sequence[dict], *, thinking: bool) -> list[SftExample]:
    """Answering and hint writing on every given row (the teacher knows every modality)."""
    examples = []
    for row in rows:
        item = _item(row)
        examples.append(
            SftExample(
                row["question_id"],
                build_messages(item, "train", thinking=thinking),
                dataset_target_text(row, thinking=thinking),
            )
        )
        hint = (row.get("reference_hint") or "").strip()
        if hint:
            examples.append(
                SftExample(
                    row["question_id"], build_messages(item, "hint_request"), f"<hint>{hint}</hint>"
                )
            )
    return examples


def student_examples(
    rows: Sequence[dict], *, thinking: bool, hint_version: str = "v1"
) -> list[SftExample]:
    """Answer format (plain prompt) and hint-following (hint-aware prompt) on the given rows."""
    examples = []
    for row in rows:
        item = _item(row)
        target = dataset_target_text(row, thinking=thinking)
        examples.append(
            SftExample(row["question_id"], build_messages(item, "train", thinking=thinking), target)
        )
        hint = (row.get("reference_hint") or "").strip()
        if hint:
            messages = build_messages(
                item, "hint_aware", thinking=thinking, hint=hint, hint_version=hint_version
            )
            examples.append(SftExample(row["question_id"], messages, target))
    return examples


def warmup_rows(questions: QuestionSet, *, exclude_modalities: Sequence[str] = ()) -> list[dict]:
    """Rows of the train pool, minus the excluded modalities."""
    return [r for r in questions.pool.to_pylist() if r["modality"] not in set(exclude_modalities)]


def supervised_finetune(
    model_dir: str | Path,
    examples: Sequence[SftExample],
    questions: QuestionSet,
    out_dir: str | Path,
    settings: WarmupSettings,
    *,
    desc: str = "warm-up",
) -> WarmupReport:
    """Token cross-entropy on `examples` starting from `model_dir`; saves the model to `out_dir`."""
    if not examples:
        raise ValueError(f"{desc}: no examples; is the train pool empty?")
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    torch.manual_seed(settings.seed)
    model, processor = load_policy(model_dir)
    tokenizer = getattr(processor, "tokenizer", processor)
    eos = tokenizer.eos_token_id
    answer_open, answer_close = (
        tokenizer.convert_tokens_to_ids(t) for t in ("<answer>", "</answer>")
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, settings.steps) / settings.steps))
        ),
    )
    order: list[int] = []
    rng = random.Random(settings.seed)
    target_ids = {
        e.target: (*tokenizer(e.target, add_special_tokens=False)["input_ids"], eos)
        for e in examples
    }
    losses: list[float] = []
    start = time.perf_counter()
    with progress(settings.steps, desc, unit="steps") as advance:
        for _step in range(settings.steps):
            if len(order) < settings.batch_size:
                perm = list(range(len(examples)))
                rng.shuffle(perm)
                order.extend(perm)
            batch_examples = [examples[order.pop()] for _ in range(settings.batch_size)]
            batch = build_sequence_batch(
                processor,
                [e.messages for e in batch_examples],
                [questions.image(e.question_id) for e in batch_examples],
                [target_ids[e.target] for e in batch_examples],
            )
            logits = completion_logits(model, batch)  # (B, Tc, V)
            mask = completion_mask_of(batch)  # (B, Tc)
            nll, _ = sft_loss(logits, batch["completion_ids"], mask)  # (B, Tc)
            weights = mask * answer_token_weights(
                batch["completion_ids"], answer_open, answer_close, settings.answer_weight
            )
            loss = (nll * weights).sum() / weights.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            recent = sum(losses[-10:]) / len(losses[-10:])
            advance(loss=recent)
    model.eval()
    save_model(model, model_dir, out_dir)
    report = WarmupReport(
        Path(out_dir),
        len(examples),
        settings.steps,
        losses[0],
        sum(losses[-10:]) / len(losses[-10:]),
        time.perf_counter() - start,
        losses,
    )
    log.info(
        "%s: %d examples, %d steps, loss %.3f -> %.3f (%.0f s)",
        desc,
        report.n_examples,
        report.steps,
        report.first_loss,
        report.last_loss,
        report.seconds,
    )
    return report


def answer_token_weights(
    ids: torch.Tensor, open_id: int, close_id: int, weight: float
) -> torch.Tensor:
    """(B, T) weights: `weight` on tokens strictly between <answer> and </answer>, else 1."""
    opened = (ids == open_id).long().cumsum(dim=1)
    closed = (ids == close_id).long().cumsum(dim=1)
    inside = (opened > closed) & (ids != open_id)
    return torch.where(
        inside,
        torch.full_like(ids, 0, dtype=torch.float32) + weight,
        torch.ones_like(ids, dtype=torch.float32),
    )


def warm_up_pair(
    questions: QuestionSet,
    base_student: Path,
    base_teacher: Path,
    out_student: Path,
    out_teacher: Path,
    *,
    in_domain: str,
    thinking: bool = True,
    student_settings: WarmupSettings | None = None,
    teacher_settings: WarmupSettings | None = None,
) -> tuple[WarmupReport, WarmupReport]:
    """Warm up the teacher on every modality and the student on the out-of-domain ones."""
    teacher = supervised_finetune(
        base_teacher,
        teacher_examples(warmup_rows(questions), thinking=thinking),
        questions,
        out_teacher,
        teacher_settings or WarmupSettings(),
        desc="warm-up teacher",
    )
    student = supervised_finetune(
        base_student,
        student_examples(warmup_rows(questions, exclude_modalities=[in_domain]), thinking=thinking),
        questions,
        out_student,
        student_settings or WarmupSettings(),
        desc="warm-up student",
    )
    return student, teacher
