"""The rollout stage of iteration k: sample, explore (Algorithm 1), score, and record everything.

`run_rollout(run, k)`:

1. Batch. `iteration_batch` draws the iteration's P = rollout.prompts_per_iteration prompts from
   the curated train split: epoch e is a permutation of the question ids (sorted first, so the
   Parquet row order does not matter) seeded by seed("epoch", e), cut into floor(N / P) batches
   of P; iteration k takes batch k mod floor(N / P) of epoch k // floor(N / P). The N mod P ids
   at the end of each epoch's permutation sit that epoch out (different ones each epoch). Batches
   never straddle two epochs, so a question never appears twice in one batch (the `prompts` key
   is (run, iteration, prompt_id)). P > N is an error.
2. Policy samples. G trajectories per prompt from policy version k, all prompts in one generate
   call, each prompt with its own seed seed("rollout", k, prompt_id); scored with the rule-based
   rewards.
   An algorithm that never trains on policy samples (`AlgorithmSpec.uses_policy_samples`:
   sft, gkd with λ = 0) skips steps 2-4: the stage records the batch's `prompts` rows only
   (trigger_reason "no_policy_samples", sample counts NULL), loads no model and generates nothing.
3. Exploration. `kepo.exploration.explore` (Algorithm 1) for KEPO with exploration on; every
   other algorithm records trigger_reason "exploration_off". The teacher is loaded only when a
   prompt triggers (or offline distillation needs it).
4. Training view. The G trained rows per prompt (policy samples, with accepted hint-aware ones
   in the slots they replaced) are scored under the PLAIN training prompt x: old-policy
   log-probs for every trained row (policy rows too: one code path, and the stored numbers are
   what the trainer's ratio divides by), reference log-probs when the algorithm has a policy
   term and algorithm.kl_coef > 0, and in offline distillation mode the teacher's top-k only
   for rows whose gate is open. Advantages
   are computed per prompt over the trained rows from reward_total
   (`kepo.losses.group_advantages`). gate_open = trained AND reward part ⋈ τ
   (`kepo.losses.quality_gate`) AND the algorithm's distillation is gated (kepo); it is False
   for every other algorithm (GRPO/RLOO have no distillation term, and MM-GKD distils every row
   without a gate) and for rows not trained on (`assign_advantages_and_gates`, pure).
   When the reference is the same model folder as policy version k (iteration 0 with no
   `models.reference`), its log-probs ARE the old-policy ones and are copied, not recomputed.
5. Write. All tables of (run, k) in one store transaction: a rerun replaces them, and a process
   killed before the commit leaves the previous copy untouched.

Sharding. Prompt at batch position j belongs to shard j mod n. Everything in steps 2-4 is per
prompt (seeds, groups, advantages), so shards are independent and their union equals the
unsharded result. `rollout_shard` writes one shard's rows as Parquet (plus a manifest, written
last), `commit_shards` validates that the shards cover the batch exactly once and loads them in
one transaction. trigger_scope "batch" needs every prompt's rewards before any prompt can decide,
so it requires n_shards == 1 (a clear error otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kepo.exploration import (
    AttemptSample,
    ExplorationOutcome,
    ExplorationSettings,
    HintRecord,
    PolicyGroup,
    explore,
    sampling_params,
    teacher_name,
)
from kepo.generation.base import GenerationBackend, GenerationRequest
from kepo.prompts import PromptItem, build_messages, build_prompt_text
from kepo.rewards import RewardRecord, score_completion
from kepo.run import Run
from kepo.store import to_arrow
from schemas.tables import HINT_ATTEMPTS, HINTS, PROMPTS, ROLLOUTS, TEACHER_TOPK

log = logging.getLogger(__name__)

ROLLOUT_TABLES = (PROMPTS, ROLLOUTS, HINTS, HINT_ATTEMPTS, TEACHER_TOPK)
SHARD_MANIFEST = "manifest.json"
NO_POLICY_SAMPLES = "no_policy_samples"
"""prompts.trigger_reason of an algorithm that draws no policy samples (sft, gkd with λ = 0)."""


class RolloutError(RuntimeError):
    """A rollout that cannot run as configured (the message says how to fix it)."""


# ------------------------------------------------------------------------------ 1. the batch
class BatchEntry(NamedTuple):
    prompt_id: str
    epoch: int
    position: int
    """Position in the iteration's batch (0..P-1)."""


def iteration_batch(
    question_ids: Sequence[str],
    prompts_per_iteration: int,
    iteration: int,
    seed_fn: Callable[..., int],
) -> list[BatchEntry]:
    """The prompts of iteration `iteration` (rules in the module docstring)."""
    ids = sorted(question_ids)
    n, p = len(ids), prompts_per_iteration
    if len(set(ids)) != n:
        raise RolloutError("the train split has duplicate question ids; re-curate the dataset")
    if p < 1 or iteration < 0:
        raise ValueError(
            f"prompts_per_iteration must be >= 1 and iteration >= 0 (got {p}, {iteration})"
        )
    if p > n:
        raise RolloutError(
            f"rollout.prompts_per_iteration ({p}) exceeds the {n} training questions: lower it "
            "or curate a larger train split (data.train_size)"
        )
    per_epoch = n // p
    epoch, index = divmod(iteration, per_epoch)
    order = np.random.default_rng(seed_fn("epoch", epoch)).permutation(n)
    chosen = order[index * p : (index + 1) * p]
    return [BatchEntry(ids[int(i)], epoch, j) for j, i in enumerate(chosen)]


def shard_entries(batch: Sequence[BatchEntry], shard_index: int, n_shards: int) -> list[BatchEntry]:
    """The prompts of one shard: batch positions j with j mod n_shards == shard_index."""
    if n_shards < 1 or not 0 <= shard_index < n_shards:
        raise ValueError(f"shard {shard_index} of {n_shards} does not exist")
    return [e for e in batch if e.position % n_shards == shard_index]


# ------------------------------------------------------------------------------ results
@dataclass
class RolloutResult:
    """What one rollout (or one shard of it) produced."""

    run_id: str
    iteration: int
    shard: tuple[int, int]
    tables: dict[str, pa.Table]
    """Validated rows per table name (prompts, rollouts, hints, hint_attempts, teacher_topk)."""
    written: dict[str, int] | None = None
    """Rows written per table when committed to the store; None for an uncommitted shard."""
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_prompts(self) -> int:
        return self.tables["prompts"].num_rows

    @property
    def n_triggered(self) -> int:
        return int(sum(self.tables["prompts"].column("triggered").to_pylist()))

    @property
    def n_accepted(self) -> int:
        """Prompts that got at least one injected trajectory."""
        return sum(1 for n in self.tables["prompts"].column("n_injected").to_pylist() if n)

    @property
    def n_injected(self) -> int:
        return int(sum(self.tables["prompts"].column("n_injected").to_pylist()))

    def summary(self) -> str:
        return (
            f"run {self.run_id} iteration {self.iteration}: {self.n_prompts} prompts, "
            f"{self.n_triggered} triggered, {self.n_accepted} accepted, "
            f"{self.n_injected} injected ({self.seconds:.1f} s)"
        )


# ------------------------------------------------------------------------------ backends
class _Backends:
    """Student / teacher / reference backends: given ones are used as is, missing ones are
    created on first use and closed by `close()` (given ones stay open: their caller owns them)."""

    def __init__(
        self, run: Run, iteration: int, student: Any, teacher: Any, reference: Any
    ) -> None:
        self.run, self.iteration = run, iteration
        self._given = {"student": student, "teacher": teacher, "reference": reference}
        self._made: dict[str, GenerationBackend] = {}

    def is_given(self, role: str) -> bool:
        return self._given[role] is not None

    def path(self, role: str) -> Path:
        models = self.run.config.models
        if role == "student":
            return Path(self.run.policy_path(self.iteration))
        if role == "teacher":
            if models.teacher is None:
                raise RolloutError("this rollout needs a teacher: set models.teacher")
            return Path(models.teacher)
        return Path(models.reference or models.student)

    def get(self, role: str) -> GenerationBackend:
        if self._given[role] is not None:
            return self._given[role]
        if role not in self._made:
            self._made[role] = _make_backend(self.run, self.path(role), role)
        return self._made[role]

    def close(self) -> None:
        for backend in self._made.values():
            backend.close()
        self._made.clear()


def _make_backend(run: Run, path: Path, role: str = "student") -> GenerationBackend:
    try:
        return run.generation_backend(path, role=role)  # type: ignore[arg-type]
    except FileNotFoundError as err:
        raise RolloutError(str(err)) from None


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


# ------------------------------------------------------------------------------ the stage
@dataclass
class _Prompt:
    entry: BatchEntry
    row: dict[str, Any]
    item: PromptItem
    image: Any
    training_prompt: str
    request: GenerationRequest
    completions: list[Any] = field(default_factory=list)
    rewards: list[RewardRecord] = field(default_factory=list)


def compute_rollout(
    run: Run,
    iteration: int,
    *,
    shard: tuple[int, int] = (0, 1),
    backend: GenerationBackend | None = None,
    teacher_backend: GenerationBackend | None = None,
    reference_backend: GenerationBackend | None = None,
) -> RolloutResult:
    """Steps 1-4 for the prompts of one shard; returns the validated rows, writes nothing."""
    cfg = run.config
    shard_index, n_shards = shard
    settings = ExplorationSettings.from_config(cfg)
    if n_shards > 1 and settings.active and settings.trigger_scope == "batch":
        raise RolloutError(
            "rollout.exploration.trigger_scope = 'batch' decides from every prompt of the batch, "
            f"so it cannot be split into {n_shards} shards: set rollout.shards to 1 or use "
            "trigger_scope 'prompt'"
        )
    if cfg.models.torch_threads:
        import torch

        torch.set_num_threads(cfg.models.torch_threads)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    questions = run.questions()
    batch = iteration_batch(
        questions.train.column("question_id").to_pylist(),
        cfg.rollout.prompts_per_iteration,
        iteration,
        run.seed,
    )
    prompts = [_load_prompt(run, iteration, e) for e in shard_entries(batch, shard_index, n_shards)]
    backends = _Backends(run, iteration, backend, teacher_backend, reference_backend)
    try:
        if not cfg.algorithm.spec.uses_policy_samples(cfg.algorithm):
            # the batch and its prompts only: training reads dataset targets, not samples
            tables = _build_tables(run, iteration, prompts, None, backends)
            return _result(run, iteration, (shard_index, n_shards), tables, started, timings)
        student = backends.get("student")
        tick = time.perf_counter()
        _sample_policy(run, prompts, student)
        timings["policy_sampling_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        groups = [PolicyGroup(p.entry.prompt_id, p.item, p.image, p.rewards) for p in prompts]
        outcomes = explore(
            groups,
            settings=settings,
            student=student,
            teacher=lambda: backends.get("teacher"),
            seed=run.seed,
            iteration=iteration,
        )
        timings["exploration_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        tables = _build_tables(run, iteration, prompts, outcomes, backends)
        timings["scoring_s"] = time.perf_counter() - tick
    finally:
        backends.close()
    return _result(run, iteration, (shard_index, n_shards), tables, started, timings)


def _result(
    run: Run,
    iteration: int,
    shard: tuple[int, int],
    tables: dict[str, pa.Table],
    started: float,
    timings: dict[str, float],
) -> RolloutResult:
    result = RolloutResult(
        run.run_id, iteration, shard, tables, None, time.perf_counter() - started, timings
    )
    log.info("%s", result.summary())
    return result


def _load_prompt(run: Run, iteration: int, entry: BatchEntry) -> _Prompt:
    questions = run.questions()
    row = questions.row(entry.prompt_id)
    item = PromptItem.from_row(row)
    if item.gold_letter is None:
        raise RolloutError(
            f"train question {entry.prompt_id!r} has no gold_letter; re-curate the dataset"
        )
    image = questions.image(entry.prompt_id)
    thinking = run.config.prompts.thinking
    request = GenerationRequest(
        request_id=entry.prompt_id,
        messages=build_messages(item, "train", thinking=thinking),
        image=image,
        seed=run.seed("rollout", iteration, entry.prompt_id),
    )
    return _Prompt(
        entry, row, item, image, build_prompt_text(item, "train", thinking=thinking), request
    )


def _sample_policy(run: Run, prompts: list[_Prompt], student: GenerationBackend) -> None:
    """Step 2: G samples for every prompt in one generate call, then their rewards."""
    cfg = run.config
    g = cfg.rollout.group_size
    outputs = student.generate(
        [p.request for p in prompts],
        sampling_params(cfg.rollout.sampling, n=g),
        desc="policy samples",
    )
    for prompt, completions in zip(prompts, outputs, strict=True):
        if len(completions) != g:
            raise RuntimeError(
                f"backend returned {len(completions)} samples for {prompt.entry.prompt_id!r}, asked for G = {g}"
            )
        prompt.completions = completions
        prompt.rewards = [
            score_completion(
                c.text,
                prompt.item.gold_letter,
                thinking=cfg.prompts.thinking,
                n_options=prompt.item.n_options,
            )
            for c in completions
        ]


def _reward_cols(r: RewardRecord) -> dict[str, Any]:
    return {
        "reward_format": r.reward_format,
        "reward_accuracy": r.reward_accuracy,
        "reward_total": r.reward_total,
        "parsed_answer": r.parsed_answer,
        "parse_reason": r.parse_reason,
    }


# ------------------------------------------------------------------------------ rows (pure)
@dataclass
class Trajectory:
    """One `rollouts` row being built, and the index of its prompt in the shard's batch."""

    group: int
    """Index of the prompt in the shard's prompt list (the advantage group)."""
    columns: dict[str, Any]
    """The `rollouts` columns."""

    @property
    def trained(self) -> bool:
        return bool(self.columns["trained"])


def policy_trajectories(
    key: dict[str, Any], group: int, prompt: _Prompt, outcome: ExplorationOutcome, group_size: int
) -> list[Trajectory]:
    """The G policy samples of one prompt; a slot taken by an injection is not trained."""
    replaced = outcome.replaced_slots
    rows = []
    for i, (completion, reward) in enumerate(zip(prompt.completions, prompt.rewards, strict=True)):
        rows.append(
            Trajectory(
                group,
                {
                    **key,
                    "prompt_id": prompt.entry.prompt_id,
                    "sample_idx": i,
                    "slot": i,
                    "source": "policy",
                    "trained": i not in replaced,
                    "replaced_by": group_size + replaced[i] if i in replaced else None,
                    "attempt_id": None,
                    "generation_prompt": prompt.training_prompt,
                    "completion_text": completion.text,
                    "completion_ids": list(completion.token_ids),
                    "sampled_logprobs": [float(x) for x in completion.logprobs],
                    "old_logprobs": None,
                    "ref_logprobs": None,
                    **_reward_cols(reward),
                    "advantage": None,
                    "gate_open": False,
                    "leak_flag": False,
                    "policy_version": key["iteration"],
                    "finish_reason": completion.finish_reason,
                    "n_tokens": len(completion.token_ids),
                },
            )
        )
    return rows


def injected_trajectories(
    key: dict[str, Any], group: int, prompt_id: str, outcome: ExplorationOutcome, group_size: int
) -> list[Trajectory]:
    """The accepted hint-aware samples of one prompt, as rows G, G+1, ... in their slots."""
    rows = []
    for j, injection in enumerate(outcome.injections):
        sample = injection.sample
        rows.append(
            Trajectory(
                group,
                {
                    **key,
                    "prompt_id": prompt_id,
                    "sample_idx": group_size + j,
                    "slot": injection.slot,
                    "source": "hint",
                    "trained": True,
                    "replaced_by": None,
                    "attempt_id": sample.attempt_id,
                    "generation_prompt": sample.generation_prompt,
                    "completion_text": sample.completion.text,
                    "completion_ids": list(sample.completion.token_ids),
                    "sampled_logprobs": [float(x) for x in sample.completion.logprobs],
                    "old_logprobs": None,
                    "ref_logprobs": None,
                    **_reward_cols(sample.reward),
                    "advantage": None,
                    "gate_open": False,
                    "leak_flag": sample.leak_flag,
                    "policy_version": key["iteration"],
                    "finish_reason": sample.completion.finish_reason,
                    "n_tokens": len(sample.completion.token_ids),
                },
            )
        )
    return rows


def prompt_record(
    key: dict[str, Any], prompt: _Prompt, outcome: ExplorationOutcome | None
) -> dict[str, Any]:
    """The `prompts` row of one prompt; outcome None when the algorithm draws no policy samples
    (its counts are then NULL, and trigger_reason says so)."""
    row = {
        **key,
        "prompt_id": prompt.entry.prompt_id,
        "batch_position": prompt.entry.position,
        "epoch": prompt.entry.epoch,
        "modality": prompt.row["modality"],
        "question_type": prompt.row["question_type"],
        "gold_letter": prompt.item.gold_letter,
        "training_prompt": prompt.training_prompt,
        "sampling_seed": prompt.request.seed,
    }
    if outcome is None:
        return {
            **row,
            "n_policy_correct": None,
            "max_trigger_reward": None,
            "triggered": False,
            "trigger_reason": NO_POLICY_SAMPLES,
            "n_attempts": 0,
            "n_injected": 0,
        }
    return {
        **row,
        "n_policy_correct": sum(r.reward_accuracy == 1.0 for r in prompt.rewards),
        "max_trigger_reward": outcome.max_trigger_reward,
        "triggered": outcome.triggered,
        "trigger_reason": outcome.trigger_reason,
        "n_attempts": outcome.n_attempts,
        "n_injected": len(outcome.injections),
    }


def hint_record(
    key: dict[str, Any], prompt_id: str, teacher: str, hint: HintRecord
) -> dict[str, Any]:
    """The `hints` row of a triggered prompt."""
    return {
        **key,
        "prompt_id": prompt_id,
        "teacher": teacher,
        "hint_prompt": hint.hint_prompt,
        "raw_output": hint.raw_output,
        "hint_text": hint.hint_text,
        "parse_ok": hint.parse_ok,
        "parse_reason": hint.parse_reason,
        "malformed_rule": hint.malformed_rule,
    }


def attempt_records(
    key: dict[str, Any], prompt_id: str, attempts: Sequence[AttemptSample]
) -> list[dict[str, Any]]:
    """The `hint_attempts` rows of one prompt."""
    return [
        {
            **key,
            "prompt_id": prompt_id,
            "attempt_id": a.attempt_id,
            "attempt_idx": a.attempt_idx,
            "k_idx": a.k_idx,
            "generation_prompt": a.generation_prompt,
            "completion_text": a.completion.text,
            "completion_ids": list(a.completion.token_ids),
            "sampled_logprobs": [float(x) for x in a.completion.logprobs],
            **_reward_cols(a.reward),
            "accepted": a.acceptable,
            "attempt_accepted": a.attempt_accepted,
            "injected": a.injected,
            "leak_flag": a.leak_flag,
            "finish_reason": a.completion.finish_reason,
        }
        for a in attempts
    ]


def assign_advantages_and_gates(
    trajectories: Sequence[Trajectory],
    *,
    estimator: Literal["grpo", "rloo"],
    scale_by_std: bool,
    gate: Any | None,
) -> list[Trajectory]:
    """Copies of `trajectories` with `advantage` and `gate_open` set on the trained rows.

    Advantages are computed per group over its trained rows from reward_total
    (`kepo.losses.group_advantages`). gate: a `GateConfig` (tau, comparator, reward_part) for a
    gated algorithm, whose trained rows get gate_open = `kepo.losses.quality_gate` of their
    reward part; None for every other algorithm (all gates stay closed). Rows not trained keep
    advantage None and a closed gate. No model and no I/O.
    """
    out = [Trajectory(t.group, dict(t.columns)) for t in trajectories]
    trained = [t for t in out if t.trained]
    if not trained:
        return out
    import torch

    from kepo.losses import group_advantages, quality_gate

    advantages = group_advantages(
        torch.tensor([t.columns["reward_total"] for t in trained], dtype=torch.float64),
        torch.tensor([t.group for t in trained], dtype=torch.int64),
        estimator=estimator,
        scale_by_std=scale_by_std,
    )
    if gate is None:
        gates = [False] * len(trained)
    else:
        part = "reward_total" if gate.reward_part == "total" else "reward_accuracy"
        gates = quality_gate(
            torch.tensor([t.columns[part] for t in trained], dtype=torch.float64),
            tau=gate.tau,
            comparator=gate.comparator,
        ).tolist()
    for t, adv, gate_open in zip(trained, advantages.tolist(), gates, strict=True):
        t.columns["advantage"] = float(adv)
        t.columns["gate_open"] = bool(gate_open)
    return out


# ------------------------------------------------------------------------------ scoring passes
def _plain_requests(
    prompts: Sequence[_Prompt], rows: Sequence[Trajectory]
) -> list[GenerationRequest]:
    """Scoring requests under the PLAIN training prompt x (eq. 7), one per row."""
    requests = []
    for t in rows:
        p = prompts[t.group]
        requests.append(
            GenerationRequest(
                f"{p.entry.prompt_id}#{t.columns['sample_idx']}",
                p.request.messages,
                p.image,
                p.request.seed,
            )
        )
    return requests


def _score_old_and_reference(
    prompts: Sequence[_Prompt],
    trained: Sequence[Trajectory],
    backends: _Backends,
    *,
    needs_reference: bool,
) -> None:
    """Old-policy log-probs of every trained row, and reference log-probs when needed."""
    if not trained:
        return
    requests = _plain_requests(prompts, trained)
    ids = [t.columns["completion_ids"] for t in trained]
    old = backends.get("student").score(requests, ids, desc="old log-probs")
    for t, s in zip(trained, old, strict=True):
        t.columns["old_logprobs"] = [float(x) for x in s.logprobs]
    if not needs_reference:
        return
    if not backends.is_given("reference") and _same_folder(
        backends.path("reference"), backends.path("student")
    ):
        # the reference is policy version k itself: its log-probs are the old ones
        for t in trained:
            t.columns["ref_logprobs"] = list(t.columns["old_logprobs"])
        return
    ref = backends.get("reference").score(requests, ids, desc="reference log-probs")
    for t, s in zip(trained, ref, strict=True):
        t.columns["ref_logprobs"] = [float(x) for x in s.logprobs]


def _score_teacher_topk(
    key: dict[str, Any],
    prompts: Sequence[_Prompt],
    gated: Sequence[Trajectory],
    backends: _Backends,
    *,
    k: int,
    teacher: str,
) -> list[dict[str, Any]]:
    """`teacher_topk` rows: the teacher's top-k log-probs of every gated-open trained row."""
    if not gated:
        return []
    scores = backends.get("teacher").score(
        _plain_requests(prompts, gated),
        [t.columns["completion_ids"] for t in gated],
        top_k=k,
        desc="teacher top-k",
    )
    rows = []
    for t, s in zip(gated, scores, strict=True):
        if s.topk_ids is None or s.topk_logprobs is None:
            raise RuntimeError("the teacher backend returned no top-k although top_k was asked for")
        rows.append(
            {
                **key,
                "prompt_id": t.columns["prompt_id"],
                "sample_idx": t.columns["sample_idx"],
                "teacher": teacher,
                "k": k,
                "topk_ids": [list(map(int, ids)) for ids in s.topk_ids],
                "topk_logprobs": [[float(x) for x in lp] for lp in s.topk_logprobs],
            }
        )
    return rows


# ------------------------------------------------------------------------------ tables
def _build_tables(
    run: Run,
    iteration: int,
    prompts: list[_Prompt],
    outcomes: list[ExplorationOutcome] | None,
    backends: _Backends,
) -> dict[str, pa.Table]:
    """Step 4: every table, with log-probs, advantages and gates. outcomes None: the algorithm
    draws no policy samples, and only the `prompts` rows are written."""
    cfg = run.config
    g = cfg.rollout.group_size
    algo = cfg.algorithm
    spec = algo.spec
    key = {"run_id": run.run_id, "iteration": iteration}
    teacher = teacher_name(cfg.models.teacher)

    prompt_rows, trajectories, hint_rows, attempt_rows = [], [], [], []
    for gi, prompt in enumerate(prompts):
        outcome = None if outcomes is None else outcomes[gi]
        prompt_rows.append(prompt_record(key, prompt, outcome))
        if outcome is None:
            continue
        pid = prompt.entry.prompt_id
        trajectories += policy_trajectories(key, gi, prompt, outcome, g)
        trajectories += injected_trajectories(key, gi, pid, outcome, g)
        if outcome.hint is not None:
            hint_rows.append(hint_record(key, pid, teacher, outcome.hint))
        attempt_rows += attempt_records(key, pid, outcome.attempts)

    trajectories = assign_advantages_and_gates(
        trajectories,
        estimator=algo.advantage_estimator,
        scale_by_std=algo.scale_by_std,
        gate=algo.distill.gate if spec.gated else None,
    )
    # the rows the trainer uses, scored under the plain prompt
    trained = [t for t in trajectories if t.trained]
    _score_old_and_reference(prompts, trained, backends, needs_reference=spec.needs_reference(algo))
    topk_rows = (
        _score_teacher_topk(
            key,
            prompts,
            [t for t in trained if t.columns["gate_open"]],
            backends,
            k=algo.distill.top_k,
            teacher=teacher,
        )
        if spec.stores_teacher_topk(algo)
        else []
    )
    rows = {
        PROMPTS.name: prompt_rows,
        ROLLOUTS.name: [t.columns for t in trajectories],
        HINTS.name: hint_rows,
        HINT_ATTEMPTS.name: attempt_rows,
        TEACHER_TOPK.name: topk_rows,
    }
    return {t.name: to_arrow(t, rows[t.name]) for t in ROLLOUT_TABLES}


# ------------------------------------------------------------------------------ entry points
def run_rollout(
    run: Run,
    iteration: int,
    *,
    backend: GenerationBackend | None = None,
    teacher_backend: GenerationBackend | None = None,
    reference_backend: GenerationBackend | None = None,
    shard: tuple[int, int] | None = None,
) -> RolloutResult:
    """The rollout stage of iteration `iteration`: compute and write all its tables at once.

    Backends default to `make_backend(cfg.rollout.backend, ...)` on policy version `iteration`,
    the teacher and the reference (created only when needed, closed at the end); backends passed
    in are used as they are and left open. With `shard=(i, n)` only shard i's prompts are
    computed and nothing is written (`result.written is None`): parallel workers use
    `rollout_shard` and one `commit_shards` instead.
    """
    result = compute_rollout(
        run,
        iteration,
        shard=shard or (0, 1),
        backend=backend,
        teacher_backend=teacher_backend,
        reference_backend=reference_backend,
    )
    if shard is None:
        result.written = run.store.write_partitions(
            result.tables, run_id=run.run_id, iteration=iteration
        )
    return result


def rollout_shard(
    run: Run,
    iteration: int,
    shard_index: int,
    n_shards: int,
    out_dir: str | Path,
    *,
    backend: GenerationBackend | None = None,
    teacher_backend: GenerationBackend | None = None,
    reference_backend: GenerationBackend | None = None,
) -> Path:
    """Roll out one shard and write its rows to `out_dir/<table>.parquet` (+ manifest, last)."""
    result = compute_rollout(
        run,
        iteration,
        shard=(shard_index, n_shards),
        backend=backend,
        teacher_backend=teacher_backend,
        reference_backend=reference_backend,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SHARD_MANIFEST).unlink(missing_ok=True)  # an old manifest must not vouch for new files
    for name, table in result.tables.items():
        tmp = out / f".{name}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, out / f"{name}.parquet")
    manifest = {
        "run_id": run.run_id,
        "iteration": iteration,
        "shard_index": shard_index,
        "n_shards": n_shards,
        "config_sha256": run.config.sha256(),
        "prompt_ids": result.tables["prompts"].column("prompt_id").to_pylist(),
        "rows": {name: t.num_rows for name, t in result.tables.items()},
        "seconds": result.seconds,
    }
    tmp = out / f".{SHARD_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / SHARD_MANIFEST)
    return out


def commit_shards(run: Run, iteration: int, shard_dirs: Sequence[str | Path]) -> RolloutResult:
    """Load every shard of iteration `iteration` into the store in one transaction.

    Checks first that the shards belong to this run, iteration and config, that shard indices
    0..n-1 each appear once, and that together they hold exactly the iteration's batch.
    """
    started = time.perf_counter()
    manifests = []
    for d in map(Path, shard_dirs):
        path = d / SHARD_MANIFEST
        if not path.is_file():
            raise RolloutError(
                f"{d}: no {SHARD_MANIFEST}, the shard is incomplete; rerun rollout_shard for it"
            )
        m = json.loads(path.read_text())
        if (m["run_id"], m["iteration"]) != (run.run_id, iteration):
            raise RolloutError(
                f"{d}: shard of run {m['run_id']!r} iteration {m['iteration']}, not of run "
                f"{run.run_id!r} iteration {iteration}; pass this iteration's shard folders"
            )
        if m["config_sha256"] != run.config.sha256():
            raise RolloutError(
                f"{d}: written under another config of run {run.run_id!r}; rerun the shard"
            )
        manifests.append((d, m))
    counts = {m["n_shards"] for _, m in manifests}
    indices = sorted(m["shard_index"] for _, m in manifests)
    if len(counts) != 1 or indices != list(range(counts.pop())):
        raise RolloutError(
            f"shards {indices} of iteration {iteration} do not form one complete set 0..n-1 "
            f"(n_shards in the manifests: {sorted({m['n_shards'] for _, m in manifests})}); "
            "rerun the missing shards"
        )
    expected = {
        e.prompt_id
        for e in iteration_batch(
            run.questions().train.column("question_id").to_pylist(),
            run.config.rollout.prompts_per_iteration,
            iteration,
            run.seed,
        )
    }
    got = [pid for _, m in manifests for pid in m["prompt_ids"]]
    if len(got) != len(set(got)) or set(got) != expected:
        raise RolloutError(
            f"the shards of iteration {iteration} hold {len(set(got))} distinct of "
            f"{len(got)} prompts, the batch has {len(expected)}; rerun the shards with one n_shards"
        )
    tables = {
        t.name: pa.concat_tables(
            [pq.read_table(d / f"{t.name}.parquet") for d, _ in manifests]
        ).cast(t.arrow_schema())
        for t in ROLLOUT_TABLES
    }
    written = run.store.write_partitions(tables, run_id=run.run_id, iteration=iteration)
    result = RolloutResult(
        run.run_id,
        iteration,
        (0, len(manifests)),
        tables,
        written,
        time.perf_counter() - started,
    )
    log.info("committed %d shards: %s", len(manifests), result.summary())
    return result


__all__ = [
    "BatchEntry",
    "RolloutError",
    "RolloutResult",
    "Trajectory",
    "assign_advantages_and_gates",
    "commit_shards",
    "compute_rollout",
    "iteration_batch",
    "rollout_shard",
    "run_rollout",
    "shard_entries",
]
