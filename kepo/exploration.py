"""Knowledge-enhanced exploration: Algorithm 1 of the paper (Appendix A), over any generation backend.

For each prompt x of a rollout batch the student has already drawn G trajectories (sampled and
scored by `kepo.rollout`). `explore` then, per prompt:

1. Trigger. The prompt triggers when all G policy samples score 0 on the trigger reward part
   (`trigger_reward`: "total" = format + accuracy, the authors' rule, or "accuracy").
   `trigger_scope = "batch"` reproduces the authors' code: when any prompt of the batch
   triggers, every prompt of the batch explores (trigger_reason "batch_scope").
2. Hint. The teacher answers the hint-request prompt (it sees the ground-truth answer), decoded
   with `hint_sampling`. `parse_hint` extracts the text inside <hint>...</hint>. A malformed
   output is never a crash; the rule `malformed_hint` decides:
   - "use_raw": the raw output (after any </think>), with the prompt tags removed, is the hint;
     `parse_ok` stays False and `malformed_rule = "use_raw"`. If nothing is left, the prompt is
     skipped (`malformed_rule = "skip_empty_raw"`).
   - "skip": no hint-aware attempts for the prompt (`malformed_rule = "skip"`).
3. Rejection sampling. Up to B rounds. In round b every still-open prompt draws K samples
   (`SamplingParams.n = K`) from the student under the hint-aware prompt (hint, and for "v1" the
   answer), all open prompts in ONE generate call. A sample is acceptable when its accuracy
   reward is 1 and, with `reject_leaks`, it does not mention the hint or the given answer
   (`mentions_hint_or_answer`; the flag is recorded either way). The attempt is accepted under
   `accept_rule` "any" (the paper: at least one acceptable sample; its acceptable samples are
   injected) or "all" (the authors: all K acceptable; all K injected). The first accepted round
   closes the prompt; after B rounds without acceptance nothing is injected and the original
   G samples are trained (Algorithm 1, line 16).
4. Injection. The n accepted trajectories replace n on-policy samples in distinct slots: the
   first n entries of a permutation of 0..G-1 seeded by seed("inject", iteration, prompt_id).
   The group stays G; the replaced samples are kept (the rollout stage marks them not trained).

Seeds: hint request seed("hint_request", iteration, prompt_id); attempt b
seed("hint", iteration, prompt_id, b). They depend on the prompt only, never on which other
prompts share a batch, so sharding a rollout does not change its result.

This module takes no store and no config object: `ExplorationSettings.from_config` maps the run
config onto the few settings the algorithm needs, so tests drive it with a scripted backend.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kepo.generation.base import Completion, GenerationBackend, GenerationRequest, SamplingParams
from kepo.prompts import (
    PromptItem,
    build_messages,
    build_prompt_text,
    mentions_hint_or_answer,
    parse_hint,
)
from kepo.rewards import RewardRecord, score_completion

log = logging.getLogger(__name__)

SeedFn = Callable[..., int]
"""seed(*parts) -> int, e.g. `Run.seed`."""

_PROMPT_TAGS = re.compile(r"</?(?:hint|think|answer)>")


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class ExplorationSettings:
    """What Algorithm 1 needs from the run config (see `from_config`)."""

    active: bool
    """Exploration runs at all (KEPO with exploration on); False for KEPO-KE, GRPO, RLOO, ..."""
    group_size: int
    """G: policy samples per prompt, and the size of the trained group."""
    student_sampling: SamplingParams
    """Student decoding for hint-aware attempts (its `n` is replaced by K)."""
    hint_sampling: SamplingParams
    """Teacher decoding for hints (its `n` is replaced by 1)."""
    trigger_reward: Literal["total", "accuracy"] = "total"
    trigger_scope: Literal["prompt", "batch"] = "prompt"
    budget: int = 5
    inject_k: int = 2
    accept_rule: Literal["any", "all"] = "any"
    malformed_hint: Literal["use_raw", "skip"] = "use_raw"
    reject_leaks: bool = False
    leak_span_words: int = 8
    thinking: bool = True
    hint_version: Literal["v0", "v1"] = "v1"

    def __post_init__(self) -> None:
        if self.budget < 1 or self.inject_k < 1:
            raise ValueError("exploration budget and inject_k must be >= 1")
        if self.inject_k > self.group_size:
            raise ValueError(
                f"inject_k ({self.inject_k}) exceeds group_size ({self.group_size}): "
                "lower rollout.exploration.inject_k or raise rollout.group_size"
            )
        if self.accept_rule not in ("any", "all"):
            raise ValueError(f"unknown accept_rule {self.accept_rule!r}; use 'any' or 'all'")
        if self.malformed_hint not in ("use_raw", "skip"):
            raise ValueError(
                f"unknown malformed_hint rule {self.malformed_hint!r}; use 'use_raw' or 'skip'"
            )
        if self.trigger_scope not in ("prompt", "batch"):
            raise ValueError(
                f"unknown trigger_scope {self.trigger_scope!r}; use 'prompt' or 'batch'"
            )

    @classmethod
    def from_config(cls, cfg: Any) -> ExplorationSettings:
        """Settings of a `kepo.config.RunConfig`."""
        ex = cfg.rollout.exploration
        return cls(
            active=cfg.exploration_active,
            group_size=cfg.rollout.group_size,
            student_sampling=sampling_params(cfg.rollout.sampling, n=ex.inject_k),
            hint_sampling=sampling_params(ex.hint_sampling, n=1),
            trigger_reward=ex.trigger_reward,
            trigger_scope=ex.trigger_scope,
            budget=ex.budget,
            inject_k=ex.inject_k,
            accept_rule=ex.accept_rule,
            malformed_hint=ex.malformed_hint,
            reject_leaks=ex.reject_leaks,
            leak_span_words=ex.leak_span_words,
            thinking=cfg.prompts.thinking,
            hint_version=cfg.prompts.hint_version,
        )


def sampling_params(section: Any, *, n: int) -> SamplingParams:
    """`SamplingParams` from a config `SamplingConfig` section."""
    return SamplingParams(
        n=n,
        temperature=section.temperature,
        top_p=section.top_p,
        top_k=section.top_k,
        max_new_tokens=section.max_new_tokens,
    )


# ------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class PolicyGroup:
    """One prompt of the batch with the rewards of its G on-policy samples."""

    prompt_id: str
    item: PromptItem
    image: Any
    rewards: Sequence[RewardRecord]


@dataclass(frozen=True)
class HintRecord:
    """The teacher's hint for one triggered prompt (a `hints` row)."""

    hint_prompt: str
    raw_output: str
    hint_text: str | None
    """The hint used in hint-aware prompts; None when the prompt was skipped."""
    parse_ok: bool
    parse_reason: str | None
    malformed_rule: str | None
    """None when parse_ok; else "use_raw", "skip" or "skip_empty_raw"."""


@dataclass
class AttemptSample:
    """One hint-aware sample (a `hint_attempts` row)."""

    prompt_id: str
    attempt_idx: int
    k_idx: int
    generation_prompt: str
    completion: Completion
    reward: RewardRecord
    leak_flag: bool
    acceptable: bool
    """Correct (accuracy 1) and not rejected for leakage."""
    attempt_accepted: bool = False
    """Its attempt met the accept rule."""
    injected: bool = False

    @property
    def attempt_id(self) -> str:
        return attempt_id(self.prompt_id, self.attempt_idx, self.k_idx)


def attempt_id(prompt_id: str, attempt_idx: int, k_idx: int) -> str:
    """The `hint_attempts.attempt_id` of one sample: '<prompt_id>/b<attempt_idx>/k<k_idx>'."""
    return f"{prompt_id}/b{attempt_idx}/k{k_idx}"


@dataclass(frozen=True)
class Injection:
    """An accepted hint-aware sample and the group slot whose policy sample it replaces."""

    sample: AttemptSample
    slot: int


@dataclass
class ExplorationOutcome:
    """Everything Algorithm 1 decided for one prompt."""

    prompt_id: str
    triggered: bool
    trigger_reason: str
    """exploration_off, not_all_zero, all_zero_total / all_zero_accuracy, or batch_scope."""
    max_trigger_reward: float
    hint: HintRecord | None = None
    attempts: list[AttemptSample] = field(default_factory=list)
    injections: list[Injection] = field(default_factory=list)

    @property
    def n_attempts(self) -> int:
        return len({a.attempt_idx for a in self.attempts})

    @property
    def accepted(self) -> bool:
        return bool(self.injections)

    @property
    def replaced_slots(self) -> dict[int, int]:
        """slot -> index j of the injection that took it (its rollout row is sample_idx G + j)."""
        return {inj.slot: j for j, inj in enumerate(self.injections)}


# ------------------------------------------------------------------------------ Algorithm 1
def trigger_value(reward: RewardRecord, part: str) -> float:
    """The reward part the trigger looks at."""
    if part == "total":
        return reward.reward_total
    if part == "accuracy":
        return reward.reward_accuracy
    raise ValueError(f"unknown trigger reward part {part!r}; use 'total' or 'accuracy'")


def decide_triggers(
    groups: Sequence[PolicyGroup], settings: ExplorationSettings
) -> list[ExplorationOutcome]:
    """Step 1 for every prompt: whether exploration triggers, and why."""
    outcomes = []
    for group in groups:
        if len(group.rewards) != settings.group_size:
            raise ValueError(
                f"prompt {group.prompt_id!r}: {len(group.rewards)} policy samples, expected "
                f"G = {settings.group_size}"
            )
        best = max(trigger_value(r, settings.trigger_reward) for r in group.rewards)
        if not settings.active:
            reason, triggered = "exploration_off", False
        elif best <= 0.0:
            reason, triggered = f"all_zero_{settings.trigger_reward}", True
        else:
            reason, triggered = "not_all_zero", False
        outcomes.append(ExplorationOutcome(group.prompt_id, triggered, reason, best))
    if settings.active and settings.trigger_scope == "batch" and any(o.triggered for o in outcomes):
        for outcome in outcomes:
            if not outcome.triggered:
                outcome.triggered, outcome.trigger_reason = True, "batch_scope"
    return outcomes


def hint_from_output(raw_output: str, hint_prompt: str, rule: str) -> HintRecord:
    """Parse a teacher output and apply the malformed-hint rule (never raises on bad output)."""
    parsed = parse_hint(raw_output)
    if parsed.parse_ok:
        return HintRecord(hint_prompt, raw_output, parsed.hint_text, True, None, None)
    if rule == "skip":
        return HintRecord(hint_prompt, raw_output, None, False, parsed.reason, "skip")
    if rule != "use_raw":
        raise ValueError(f"unknown malformed_hint rule {rule!r}; use 'use_raw' or 'skip'")
    # The raw text after any reasoning block, without tags (a hint-aware prompt forbids <hint>).
    text = _PROMPT_TAGS.sub(" ", raw_output.rsplit("</think>", 1)[-1])
    text = " ".join(text.split())
    if not text:
        return HintRecord(hint_prompt, raw_output, None, False, parsed.reason, "skip_empty_raw")
    return HintRecord(hint_prompt, raw_output, text, False, parsed.reason, "use_raw")


def injection_slots(seed: int, group_size: int, n: int) -> list[int]:
    """n distinct slots of 0..G-1, reproducible from `seed` (the head of a seeded permutation)."""
    if not 0 <= n <= group_size:
        raise ValueError(f"cannot inject {n} trajectories into a group of {group_size}")
    permutation = np.random.default_rng(seed).permutation(group_size)
    return [int(s) for s in permutation[:n]]


def explore(
    groups: Sequence[PolicyGroup],
    *,
    settings: ExplorationSettings,
    student: GenerationBackend | None,
    teacher: GenerationBackend | Callable[[], GenerationBackend] | None,
    seed: SeedFn,
    iteration: int,
) -> list[ExplorationOutcome]:
    """Algorithm 1 for a batch of prompts; one outcome per group, in order.

    `teacher` may be a zero-argument factory, called only when some prompt triggers (so a
    batch where no prompt triggers never loads the teacher). `student` and `teacher` are
    needed only when a prompt triggers.
    """
    outcomes = decide_triggers(groups, settings)
    triggered = [(g, o) for g, o in zip(groups, outcomes, strict=True) if o.triggered]
    if not triggered:
        return outcomes
    if student is None or teacher is None:
        raise ValueError("exploration triggered but no student/teacher backend was given")
    teacher_backend = teacher if hasattr(teacher, "generate") else teacher()  # type: ignore[operator]

    _request_hints(triggered, settings, teacher_backend, seed, iteration)
    open_prompts = [(g, o) for g, o in triggered if o.hint is not None and o.hint.hint_text]
    for b in range(settings.budget):
        if not open_prompts:
            break
        _attempt_round(open_prompts, b, settings, student, seed, iteration)
        open_prompts = [(g, o) for g, o in open_prompts if not o.accepted]

    for group, outcome in triggered:
        if outcome.accepted:
            slots = injection_slots(
                seed("inject", iteration, group.prompt_id),
                settings.group_size,
                len(outcome.injections),
            )
            outcome.injections = [
                replace(inj, slot=slot) for inj, slot in zip(outcome.injections, slots, strict=True)
            ]
    log.info(
        "exploration: %d/%d prompts triggered, %d accepted, %d trajectories injected",
        len(triggered),
        len(groups),
        sum(o.accepted for o in outcomes),
        sum(len(o.injections) for o in outcomes),
    )
    return outcomes


def _request_hints(
    triggered: Sequence[tuple[PolicyGroup, ExplorationOutcome]],
    settings: ExplorationSettings,
    teacher: GenerationBackend,
    seed: SeedFn,
    iteration: int,
) -> None:
    """Step 2 for every triggered prompt, in one teacher generate call."""
    requests = [
        GenerationRequest(
            request_id=g.prompt_id,
            messages=build_messages(g.item, "hint_request"),
            image=g.image,
            seed=seed("hint_request", iteration, g.prompt_id),
        )
        for g, _ in triggered
    ]
    outputs = teacher.generate(requests, replace(settings.hint_sampling, n=1), desc="teacher hints")
    for (group, outcome), completions in zip(triggered, outputs, strict=True):
        outcome.hint = hint_from_output(
            completions[0].text,
            build_prompt_text(group.item, "hint_request"),
            settings.malformed_hint,
        )


def _attempt_round(
    open_prompts: Sequence[tuple[PolicyGroup, ExplorationOutcome]],
    b: int,
    settings: ExplorationSettings,
    student: GenerationBackend,
    seed: SeedFn,
    iteration: int,
) -> None:
    """Round b of step 3 for every still-open prompt, in one student generate call."""
    k = settings.inject_k
    prompt_texts, requests = [], []
    for group, outcome in open_prompts:
        hint = outcome.hint.hint_text  # type: ignore[union-attr]  # open prompts have a hint
        kwargs = {
            "thinking": settings.thinking,
            "hint": hint,
            "hint_version": settings.hint_version,
        }
        prompt_texts.append(build_prompt_text(group.item, "hint_aware", **kwargs))
        requests.append(
            GenerationRequest(
                request_id=group.prompt_id,
                messages=build_messages(group.item, "hint_aware", **kwargs),
                image=group.image,
                seed=seed("hint", iteration, group.prompt_id, b),
            )
        )
    outputs = student.generate(
        requests, replace(settings.student_sampling, n=k), desc=f"hint-aware attempt {b + 1}"
    )
    for (group, outcome), prompt_text, completions in zip(
        open_prompts, prompt_texts, outputs, strict=True
    ):
        if len(completions) != k:
            raise RuntimeError(
                f"backend returned {len(completions)} samples for prompt {group.prompt_id!r}, "
                f"asked for K = {k}"
            )
        samples = []
        for k_idx, completion in enumerate(completions):
            reward = score_completion(
                completion.text,
                group.item.gold_letter,  # type: ignore[arg-type]  # training items have one
                thinking=settings.thinking,
                n_options=group.item.n_options,
            )
            leak = mentions_hint_or_answer(
                completion.text,
                hint=outcome.hint.hint_text,  # type: ignore[union-attr]
                gold_letter=group.item.gold_letter,  # type: ignore[arg-type]
                gold_text=group.item.gold_text,
                min_span_words=settings.leak_span_words,
            )
            acceptable = reward.reward_accuracy == 1.0 and not (settings.reject_leaks and leak)
            samples.append(
                AttemptSample(
                    prompt_id=group.prompt_id,
                    attempt_idx=b,
                    k_idx=k_idx,
                    generation_prompt=prompt_text,
                    completion=completion,
                    reward=reward,
                    leak_flag=leak,
                    acceptable=acceptable,
                )
            )
        n_ok = sum(s.acceptable for s in samples)
        accepted = n_ok == k if settings.accept_rule == "all" else n_ok >= 1
        if accepted:
            for sample in samples:
                sample.attempt_accepted = True
                if sample.acceptable:
                    sample.injected = True
                    # slot is assigned once the round loop ends (seeded permutation)
                    outcome.injections.append(Injection(sample, slot=-1))
        outcome.attempts.extend(samples)


def teacher_name(path: str | Path | None) -> str:
    """How the `hints`/`teacher_topk` tables name a teacher: its folder name."""
    return Path(path).name if path is not None else "unknown"


__all__ = [
    "AttemptSample",
    "ExplorationOutcome",
    "ExplorationSettings",
    "HintRecord",
    "Injection",
    "PolicyGroup",
    "attempt_id",
    "decide_triggers",
    "explore",
    "hint_from_output",
    "injection_slots",
    "sampling_params",
    "teacher_name",
    "trigger_value",
]
