"""Evaluation of one policy version on the curated test split: per-item predictions and
per-modality accuracy with a 95 % Wilson interval, written back to the store for SQL.

`evaluate(run, k)` answers every test item of every modality with policy version k (0 = the
untrained student) and writes

- `eval_predictions` (run_id, iteration=k, question_id, ...): the output, the parsed letter, its
  format reward and whether it is correct;
- `eval_metrics` (run_id, iteration=k, modality): n, n_correct, accuracy and the Wilson interval,
  `in_domain` = the modality the run trains on (`cfg.in_domain_modality`).

Choices
-------
- Items: the curated test split, modality by modality in the paper's order. With
  `eval.max_items_per_modality = N` the first N items of each modality **by question_id** are
  taken (a deterministic, seed-free cut: the curated test sample is already a seeded random
  sample, so its first N ids by sort order are as good a subsample as any and do not move
  when the setting changes).
- Decoding: greedy by default (`eval.greedy`); otherwise `eval.sampling`, each item drawing from
  its own seed `run.seed("eval", k, question_id)`, so results do not depend on batching.
  `eval.sampling.max_new_tokens` bounds the output length in both cases.
- Prompt: `build_messages(item, "eval", thinking=prompts.thinking, eval_prompt=prompts.eval_prompt)`
  (the training prompt by default; "authors" selects the authors' evaluation prompt).
- Scoring: `kepo.rewards.score_completion`; `correct` is the accuracy reward (exact letter
  match of the single `<answer>` tag), independent of the format reward.
- Resuming: each modality's predictions are committed together with that modality's
  `eval_metrics` row (`replace_rows(where={run_id, iteration, modality})`), so the tables agree
  after every commit, crash or not. Finished modalities are committed together, in one
  transaction, once `COMMIT_EVERY_S` seconds of generation have passed since the last commit,
  at the end, and when a later modality fails (an exception), so a process killed outright
  loses at most that much finished generation. Each prediction carries the fingerprint of
  the weights that produced it (`model_sha256`, see `kepo.run.model_fingerprint`). A later call
  skips every modality whose stored predictions are exactly the expected question ids AND come
  from the same weights (another model, or a retrained checkpoint, is redone), so an interrupted evaluation
  resumes without redoing finished modalities, and a rerun with changed settings redoes only
  what no longer matches. Predictions of modalities no longer in the test split are removed.
- At the end, the checkpoint's metrics are recomputed from its stored predictions and the
  partition replaced (this also refreshes `in_domain` when the run's config changed), so
  `eval_metrics` always equals a recomputation from `eval_predictions`. A checkpoint whose
  evaluation was interrupted has metric rows only for its finished modalities.

Which flow stage this is, and its status, is recorded by the orchestration layer (`stages`);
this module only reads and writes the evaluation tables.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from kepo.prompts import PromptItem, build_messages
from kepo.rewards import score_completion
from kepo.run import Run, model_fingerprint
from kepo.store import StoreError
from schemas.tables import EVAL_METRICS, EVAL_PREDICTIONS, MODALITIES

log = logging.getLogger(__name__)

# Finished modalities wait at most this long (seconds of generation) for their commit: one commit
# costs milliseconds, so committing each modality alone buys nothing when modalities take less.
COMMIT_EVERY_S = 10.0

WILSON_Z = 1.959963984540054  # two-sided 95 % normal quantile


# ------------------------------------------------------------------------------ statistics
def wilson_interval(n_correct: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion n_correct / n (95 % by default).

    (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), clipped to [0, 1].
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1 items, got n={n}")
    if not 0 <= n_correct <= n:
        raise ValueError(f"n_correct={n_correct} must lie in [0, n={n}]")
    p = n_correct / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


# ------------------------------------------------------------------------------ results
@dataclass
class EvalResult:
    """What one `evaluate` call did, and the checkpoint's metrics as stored."""

    run_id: str
    iteration: int
    metrics: list[dict[str, Any]]
    """eval_metrics rows of the checkpoint (one per modality, paper order)."""
    evaluated_modalities: list[str] = field(default_factory=list)
    """Modalities generated in this call."""
    skipped_modalities: list[str] = field(default_factory=list)
    """Modalities already complete in the store (resumed)."""
    n_generated: int = 0
    """Items answered in this call."""
    generation_seconds: float = 0.0
    """Wall time spent generating and scoring those items (model loading excluded)."""

    @property
    def items_per_second(self) -> float | None:
        if not self.n_generated or self.generation_seconds <= 0:
            return None
        return self.n_generated / self.generation_seconds

    def accuracy(self, modality: str) -> float | None:
        for row in self.metrics:
            if row["modality"] == modality:
                return row["accuracy"]
        return None


# ------------------------------------------------------------------------------ item selection
def select_items(test: pa.Table, max_items_per_modality: int | None) -> dict[str, list[dict]]:
    """Test rows per modality (paper order), sorted by question_id, capped at N per modality."""
    needed = ("question_id", "modality", "question_type", "question", "options", "gold_letter")
    missing = [c for c in needed if c not in test.column_names]
    if missing:
        raise ValueError(
            f"the curated test split lacks columns {missing}; re-run `kepo curate` to rebuild it"
        )
    rows = test.select(list(needed)).to_pylist()
    by_modality: dict[str, list[dict]] = {m: [] for m in MODALITIES}
    for row in rows:
        if row["modality"] not in by_modality:
            raise ValueError(
                f"test item {row['question_id']!r} has modality {row['modality']!r}; expected one "
                f"of {', '.join(MODALITIES)} (re-run `kepo curate`)"
            )
        by_modality[row["modality"]].append(row)
    out: dict[str, list[dict]] = {}
    for modality, items in by_modality.items():
        if not items:
            continue
        items.sort(key=lambda r: r["question_id"])
        out[modality] = items[:max_items_per_modality] if max_items_per_modality else items
    return out


# ------------------------------------------------------------------------------ evaluation
def evaluate(
    run: Run,
    checkpoint: int,
    *,
    backend: Any = None,
    model_path: str | Path | None = None,
    modalities: Collection[str] | None = None,
) -> EvalResult:
    """Evaluate policy version `checkpoint` of `run` on the test split (see the module docstring).

    backend: a kepo.generation backend to use as is (its model is what gets evaluated);
    default: `make_backend(cfg.rollout.backend, model_path or run.policy_path(checkpoint))`,
    created only if some modality still needs generating, and closed afterwards.
    modalities: evaluate only these (an evaluation shard, `evaluate_shard`); None = all.
    """
    if checkpoint < 0:
        raise ValueError(f"checkpoint must be a policy version >= 0, got {checkpoint}")
    cfg = run.config
    questions = run.questions()
    selected = select_items(questions.test, cfg.eval.max_items_per_modality)
    if not selected:
        raise ValueError(
            f"the curated test split in {cfg.data.out_dir} is empty; run `kepo curate` first"
        )
    with run.store.connect(read_only=True):  # the two reads share one attachment of the file
        policy = None if model_path else _policy_path_or_none(run, checkpoint)
        stored_rows = _stored_predictions(run, checkpoint)
    fingerprint = model_fingerprint(model_path or policy)
    stored = _stored_question_ids(run, checkpoint, fingerprint, stored_rows)
    key = {"run_id": run.run_id, "iteration": checkpoint}

    # Predictions of modalities that left the test split would otherwise linger in the metrics.
    stale = sorted(set(stored) - set(selected))
    for modality in stale:
        log.info("removing stale %s predictions of %s/%d", modality, run.run_id, checkpoint)
    if stale:
        run.store.replace_rows(
            {EVAL_PREDICTIONS.name: [], EVAL_METRICS.name: []}, where={**key, "modality": stale}
        )

    if modalities is not None:
        selected = {m: items for m, items in selected.items() if m in set(modalities)}
    result = EvalResult(run_id=run.run_id, iteration=checkpoint, metrics=[])
    pending: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    commit_failed = False

    def commit() -> None:
        """The finished modalities' predictions and metric rows, in one transaction (a commit
        that failed is not tried again on the way out)."""
        nonlocal commit_failed
        if not pending or commit_failed:
            return
        commit_failed = True
        run.store.replace_rows(
            {
                EVAL_PREDICTIONS.name: [r for rows, _ in pending.values() for r in rows],
                EVAL_METRICS.name: [r for _, metric_rows in pending.values() for r in metric_rows],
            },
            where={**key, "modality": list(pending)},
        )
        commit_failed = False
        result.evaluated_modalities += list(pending)
        pending.clear()

    owned_backend = None
    last_commit = time.perf_counter()
    try:
        for modality, items in selected.items():
            if stored.get(modality) == {r["question_id"] for r in items}:
                result.skipped_modalities.append(modality)
                continue
            if backend is None:
                path = Path(model_path) if model_path else policy or run.policy_path(checkpoint)
                owned_backend = backend = run.generation_backend(path, purpose="eval")
            started = time.perf_counter()
            rows = _answer(run, checkpoint, items, backend, modality)
            for row in rows:
                row["model_sha256"] = fingerprint
            result.generation_seconds += time.perf_counter() - started
            # The modality's metric row commits with its predictions, so eval_metrics equals a
            # recomputation from eval_predictions even when a later modality crashes.
            metric_rows = compute_metrics(
                pa.Table.from_pylist(rows),
                run_id=run.run_id,
                iteration=checkpoint,
                in_domain_modality=cfg.in_domain_modality,
            )
            pending[modality] = (rows, metric_rows)
            result.n_generated += len(rows)
            log.info(
                "%s/%d %s: %d items, accuracy %.3f",
                run.run_id,
                checkpoint,
                modality,
                len(rows),
                sum(r["correct"] for r in rows) / len(rows),
            )
            if time.perf_counter() - last_commit >= COMMIT_EVERY_S:
                commit()
                last_commit = time.perf_counter()
        commit()
    except BaseException:
        try:  # keep what finished before the failure (unless committing it was the failure)
            commit()
        except StoreError as err:
            log.error("could not commit the finished modalities %s: %s", list(pending), err)
        raise
    finally:
        if owned_backend is not None:
            owned_backend.close()

    result.metrics = write_metrics(run, checkpoint)
    if cfg.train.report_to:
        from kepo.tracking import export_eval_metrics

        export_eval_metrics(run, checkpoint, result.metrics)
    return result


def shard_modalities(run: Run, shard_index: int, n_shards: int) -> list[str]:
    """The modalities of evaluation shard `shard_index` of `n_shards`: every n-th selected one."""
    if n_shards < 1 or not 0 <= shard_index < n_shards:
        raise ValueError(f"evaluation shard {shard_index} of {n_shards} does not exist")
    selected = select_items(run.questions().test, run.config.eval.max_items_per_modality)
    return list(selected)[shard_index::n_shards]


def evaluate_shard(run: Run, checkpoint: int, shard_index: int, n_shards: int) -> EvalResult:
    """Evaluate one shard's modalities of policy `checkpoint` (committed as `evaluate` does).

    A modality is the unit: its items are batched exactly as in the unsharded evaluation, so
    the predictions do not depend on the sharding. The stage's own `evaluate` afterwards finds
    these modalities stored, skips them, and writes the metrics of all modalities.
    """
    return evaluate(run, checkpoint, modalities=shard_modalities(run, shard_index, n_shards))


def _policy_path_or_none(run: Run, checkpoint: int) -> Path | None:
    try:
        return run.policy_path(checkpoint)
    except StoreError:
        return None


def _stored_predictions(run: Run, checkpoint: int) -> pa.Table:
    return run.store.read(
        EVAL_PREDICTIONS.name,
        {"run_id": run.run_id, "iteration": checkpoint},
        columns=["modality", "question_id", "model_sha256"],
    )


def _stored_question_ids(
    run: Run, checkpoint: int, fingerprint: str | None, table: pa.Table | None = None
) -> dict[str, set[str]]:
    """Question ids stored per modality; a modality with predictions of other weights counts
    as missing one id (so it is redone, never reused)."""
    if table is None:
        table = _stored_predictions(run, checkpoint)
    out: dict[str, set[str]] = {}
    foreign: set[str] = set()
    for modality, qid, sha in zip(
        table.column("modality").to_pylist(),
        table.column("question_id").to_pylist(),
        table.column("model_sha256").to_pylist(),
        strict=True,
    ):
        out.setdefault(modality, set()).add(qid)
        if sha != fingerprint:
            foreign.add(modality)
    for modality in foreign:
        log.info(
            "%s/%d %s: stored predictions come from other weights; redoing",
            run.run_id,
            checkpoint,
            modality,
        )
        out[modality] = out[modality] | {"\0other-weights"}
    return out


def _sampling_params(run: Run) -> Any:
    from kepo.generation import SamplingParams

    s = run.config.eval.sampling
    if run.config.eval.greedy:
        return SamplingParams(
            n=1, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=s.max_new_tokens
        )
    return SamplingParams(
        n=1,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_new_tokens=s.max_new_tokens,
    )


def _answer(
    run: Run, checkpoint: int, items: Sequence[dict], backend: Any, modality: str
) -> list[dict[str, Any]]:
    """Generate and score one modality's items, in chunks of eval.batch_size prompts."""
    from kepo.generation import GenerationRequest

    cfg = run.config
    questions = run.questions()
    sampling = _sampling_params(run)
    rows: list[dict[str, Any]] = []
    batch = cfg.eval.batch_size
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        requests = []
        for row in chunk:
            item = PromptItem.from_row(row)
            messages = build_messages(
                item, "eval", thinking=cfg.prompts.thinking, eval_prompt=cfg.prompts.eval_prompt
            )
            requests.append(
                GenerationRequest(
                    request_id=item.question_id,
                    messages=messages,
                    image=questions.image(item.question_id),
                    seed=run.seed("eval", checkpoint, item.question_id),
                )
            )
        completions = backend.generate(
            requests, sampling, desc=f"eval {modality} {start + len(chunk)}/{len(items)}"
        )
        if len(completions) != len(requests):
            raise RuntimeError(
                f"the generation backend returned {len(completions)} results for "
                f"{len(requests)} requests ({modality}); it must return one list per request"
            )
        for row, samples in zip(chunk, completions, strict=True):
            rows.append(_prediction_row(run, checkpoint, row, samples[0]))
    return rows


def _prediction_row(run: Run, checkpoint: int, row: dict, completion: Any) -> dict[str, Any]:
    score = score_completion(
        completion.text,
        row["gold_letter"],
        thinking=run.config.prompts.thinking,
        n_options=len(row["options"]),
    )
    return {
        "run_id": run.run_id,
        "iteration": checkpoint,
        "question_id": row["question_id"],
        "modality": row["modality"],
        "question_type": row["question_type"],
        "output_text": completion.text,
        "parsed_answer": score.parsed_answer,
        "parse_reason": score.parse_reason,
        "gold_letter": row["gold_letter"],
        "correct": score.reward_accuracy == 1.0,
        "reward_format": score.reward_format,
        "n_tokens": len(completion.token_ids),
    }


# ------------------------------------------------------------------------------ metrics
def compute_metrics(
    predictions: pa.Table, *, run_id: str, iteration: int, in_domain_modality: str
) -> list[dict[str, Any]]:
    """eval_metrics rows (paper order) from one checkpoint's eval_predictions rows."""
    counts: dict[str, list[int]] = {}
    for modality, correct in zip(
        predictions.column("modality").to_pylist(),
        predictions.column("correct").to_pylist(),
        strict=True,
    ):
        n_and_k = counts.setdefault(modality, [0, 0])
        n_and_k[0] += 1
        n_and_k[1] += bool(correct)
    rows = []
    for modality in MODALITIES:
        if modality not in counts:
            continue
        n, k = counts[modality]
        low, high = wilson_interval(k, n)
        rows.append(
            {
                "run_id": run_id,
                "iteration": iteration,
                "modality": modality,
                "in_domain": modality == in_domain_modality,
                "n": n,
                "n_correct": k,
                "accuracy": k / n,
                "ci_low": low,
                "ci_high": high,
            }
        )
    return rows


def write_metrics(run: Run, checkpoint: int) -> list[dict[str, Any]]:
    """Recompute eval_metrics of (run, checkpoint) from the stored predictions and replace them."""
    with run.store.connect():  # the read and the write share one attachment of the file
        predictions = run.store.read(
            EVAL_PREDICTIONS.name,
            {"run_id": run.run_id, "iteration": checkpoint},
            columns=["modality", "correct"],
        )
        rows = compute_metrics(
            predictions,
            run_id=run.run_id,
            iteration=checkpoint,
            in_domain_modality=run.config.in_domain_modality,
        )
        run.store.overwrite_partition(EVAL_METRICS.name, rows, run.run_id, checkpoint)
    return rows


__all__ = [
    "EvalResult",
    "compute_metrics",
    "evaluate",
    "evaluate_shard",
    "select_items",
    "shard_modalities",
    "wilson_interval",
    "write_metrics",
]
