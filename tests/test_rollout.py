"""The rollout stage (kepo.rollout) on the bundled data: tables, invariants, log-probs, reruns.

What each test proves:
- `test_real_models_...`: the whole stage on the REAL tiny student and teacher (Hugging Face
  backend). Random tiny models never answer correctly, so there every prompt triggers, hints are
  malformed (use_raw) and the budget runs out: it proves the plumbing and the SQL invariants on
  real generations, not acceptance.
- `test_scripted_student_...`: acceptance and injection on the stage level. The student is
  scripted (predetermined texts tokenized with the real tokenizer) so that some prompts do not
  trigger, some are accepted at attempt 1 and some exhaust the budget; the teacher is real
  (hints and offline top-k log-probs from the tiny teacher).
- `test_injected_old_logprobs_...`: Done-when 3 with the real student scoring (see its docstring).
- rerun / kill / shard tests use scripted backends (fast, deterministic).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from scripted import ScriptedBackend, answer, prompt_kind

from kepo.config import parse_config, set_dotted
from kepo.generation.base import Completion, GenerationRequest
from kepo.prompts import PromptItem, build_messages
from kepo.rollout import (
    RolloutError,
    commit_shards,
    iteration_batch,
    rollout_shard,
    run_rollout,
    shard_entries,
)
from kepo.run import Run, derive_seed

G, P, B, K = 4, 4, 2, 2
TESTS_DIR = Path(__file__).resolve().parent


def make_run(
    tmp_path: Path, curated: Path, models: tuple[Path, Path] | None = None, **overrides
) -> Run:
    student, teacher = models or (tmp_path / "no-student", tmp_path / "no-teacher")
    data = {
        "run_id": "r1",
        "workdir": str(tmp_path / "run"),
        "seed": 7,
        "data": {"out_dir": str(curated)},
        "models": {
            "student": str(student),
            "teacher": str(teacher),
            "device": "cpu",
            "torch_threads": 1,
        },
        "rollout": {
            "prompts_per_iteration": P,
            "group_size": G,
            "sampling": {"max_new_tokens": 12},
            "exploration": {
                "budget": B,
                "inject_k": K,
                "hint_sampling": {"temperature": 0.0, "max_new_tokens": 12},
            },
        },
        "algorithm": {
            "name": "kepo",
            "kl_coef": 0.1,
            "distill": {"mode": "offline", "top_k": 4, "gate": {"tau": 1.0, "comparator": ">="}},
        },
    }
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return Run.create(parse_config(data))


# ------------------------------------------------------------------------------ invariants (SQL)
def q(run: Run, sql: str, iteration: int = 0) -> list[dict]:
    return run.store.query(sql, [run.run_id, iteration]).to_pylist()


def check_invariants(run: Run, iteration: int = 0) -> None:
    """Done-when 1, every invariant as SQL over the stored tables."""
    cfg = run.config
    g, b = cfg.rollout.group_size, cfg.rollout.exploration.budget
    gate = cfg.algorithm.distill.gate
    W = "run_id = ? AND iteration = ?"
    prompts = q(run, f"SELECT * FROM prompts WHERE {W}", iteration)
    assert len(prompts) == cfg.rollout.prompts_per_iteration

    # every prompt has exactly G trained rows, occupying slots 0..G-1 once each
    assert (
        q(
            run,
            f"""SELECT p.prompt_id FROM prompts p LEFT JOIN rollouts r
        ON r.run_id = p.run_id AND r.iteration = p.iteration AND r.prompt_id = p.prompt_id AND r.trained
        WHERE p.run_id = ? AND p.iteration = ? GROUP BY p.prompt_id
        HAVING count(r.sample_idx) != {g} OR count(DISTINCT r.slot) != {g}
            OR min(r.slot) != 0 OR max(r.slot) != {g - 1}""",
            iteration,
        )
        == []
    )
    # ... and exactly G policy rows (sample_idx 0..G-1)
    assert (
        q(
            run,
            f"""SELECT prompt_id FROM rollouts WHERE {W} AND source = 'policy'
        GROUP BY prompt_id HAVING count(*) != {g} OR max(sample_idx) != {g - 1}""",
            iteration,
        )
        == []
    )

    # every source='hint' row points to an accepted, injected attempt whose prompt has a hint
    assert (
        q(
            run,
            """SELECT r.prompt_id, r.sample_idx FROM rollouts r
        LEFT JOIN hint_attempts a ON a.run_id = r.run_id AND a.iteration = r.iteration
            AND a.attempt_id = r.attempt_id AND a.prompt_id = r.prompt_id
        LEFT JOIN hints h ON h.run_id = r.run_id AND h.iteration = r.iteration AND h.prompt_id = r.prompt_id
        WHERE r.run_id = ? AND r.iteration = ? AND r.source = 'hint'
          AND (a.attempt_id IS NULL OR NOT a.accepted OR NOT a.attempt_accepted OR NOT a.injected
               OR h.hint_text IS NULL OR r.completion_text != a.completion_text
               OR r.reward_accuracy != 1 OR NOT r.trained)""",
            iteration,
        )
        == []
    )
    # every injected attempt has its rollout row; replaced rows point to the hint row in their slot
    assert (
        q(
            run,
            """SELECT a.attempt_id FROM hint_attempts a LEFT JOIN rollouts r
        ON r.run_id = a.run_id AND r.iteration = a.iteration AND r.attempt_id = a.attempt_id
        WHERE a.run_id = ? AND a.iteration = ? AND a.injected AND r.sample_idx IS NULL""",
            iteration,
        )
        == []
    )
    assert (
        q(
            run,
            """SELECT o.prompt_id, o.sample_idx FROM rollouts o LEFT JOIN rollouts h
        ON h.run_id = o.run_id AND h.iteration = o.iteration AND h.prompt_id = o.prompt_id
           AND h.sample_idx = o.replaced_by
        WHERE o.run_id = ? AND o.iteration = ? AND o.source = 'policy'
          AND (o.trained != (o.replaced_by IS NULL)
               OR (o.replaced_by IS NOT NULL AND (h.source IS DISTINCT FROM 'hint' OR h.slot != o.slot)))""",
            iteration,
        )
        == []
    )

    # attempts per prompt <= B, and prompts.n_attempts / n_injected agree with the attempts table
    assert (
        q(
            run,
            f"""SELECT p.prompt_id FROM prompts p LEFT JOIN hint_attempts a
        ON a.run_id = p.run_id AND a.iteration = p.iteration AND a.prompt_id = p.prompt_id
        WHERE p.run_id = ? AND p.iteration = ? GROUP BY p.prompt_id, p.n_attempts, p.n_injected
        HAVING count(DISTINCT a.attempt_idx) > {b} OR coalesce(max(a.attempt_idx), -1) >= {b}
            OR count(DISTINCT a.attempt_idx) != p.n_attempts
            OR count(a.attempt_id) FILTER (WHERE a.injected) != p.n_injected""",
            iteration,
        )
        == []
    )
    # attempts stop at the first accepted one
    assert (
        q(
            run,
            f"""SELECT prompt_id FROM hint_attempts WHERE {W}
        GROUP BY prompt_id HAVING max(attempt_idx) FILTER (WHERE attempt_accepted) IS NOT NULL
           AND max(attempt_idx) FILTER (WHERE attempt_accepted) != max(attempt_idx)""",
            iteration,
        )
        == []
    )

    # triggered holds exactly for prompts whose G policy samples all scored 0 (prompt scope)
    part = f"reward_{cfg.rollout.exploration.trigger_reward}"
    expect = "(m.best = 0)" if cfg.exploration_active else "false"
    rows = run.store.query(
        f"""SELECT p.prompt_id FROM prompts p JOIN (
            SELECT prompt_id, max({part}) AS best FROM rollouts
            WHERE {W} AND source = 'policy' GROUP BY prompt_id) m USING (prompt_id)
        WHERE p.run_id = ? AND p.iteration = ? AND (p.triggered != {expect} OR p.max_trigger_reward != m.best)""",
        [run.run_id, iteration, run.run_id, iteration],
    ).to_pylist()
    assert rows == []
    # a prompt that triggered has a hints row, and only such prompts do
    assert (
        q(
            run,
            """SELECT p.prompt_id FROM prompts p LEFT JOIN hints h
        ON h.run_id = p.run_id AND h.iteration = p.iteration AND h.prompt_id = p.prompt_id
        WHERE p.run_id = ? AND p.iteration = ? AND p.triggered != (h.prompt_id IS NOT NULL)""",
            iteration,
        )
        == []
    )

    # gate_open agrees with tau, the comparator and the stored rewards (kepo only, trained only)
    value = f"reward_{gate.reward_part}"
    opens = (
        f"(trained AND {value} {gate.comparator} {gate.tau})"
        if cfg.algorithm.name == "kepo"
        else "false"
    )
    assert (
        q(
            run,
            f"SELECT prompt_id, sample_idx FROM rollouts WHERE {W} AND gate_open != {opens}",
            iteration,
        )
        == []
    )

    # log-probs: old for trained rows only, one per completion token; ref exactly when KL > 0
    ref_expected = "trained" if cfg.algorithm.kl_coef > 0 else "false"
    assert (
        q(
            run,
            f"""SELECT prompt_id, sample_idx FROM rollouts WHERE {W} AND (
        (old_logprobs IS NOT NULL) != trained OR (ref_logprobs IS NOT NULL) != {ref_expected}
        OR (trained AND len(old_logprobs) != n_tokens) OR len(completion_ids) != n_tokens
        OR len(sampled_logprobs) != n_tokens OR (advantage IS NOT NULL) != trained)""",
            iteration,
        )
        == []
    )

    # teacher_topk rows exist for exactly the gated-open trained rows in offline mode
    offline = cfg.algorithm.name == "kepo" and cfg.algorithm.distill.mode == "offline"
    want = f"SELECT prompt_id, sample_idx FROM rollouts WHERE {W} AND gate_open AND trained"
    have = f"SELECT prompt_id, sample_idx FROM teacher_topk WHERE {W}"
    if offline:
        assert (
            run.store.query(f"({want}) EXCEPT ({have})", [run.run_id, iteration] * 2).num_rows == 0
        )
        assert (
            run.store.query(f"({have}) EXCEPT ({want})", [run.run_id, iteration] * 2).num_rows == 0
        )
        assert (
            q(
                run,
                """SELECT t.prompt_id FROM teacher_topk t JOIN rollouts r USING (run_id, iteration, prompt_id, sample_idx)
            WHERE t.run_id = ? AND t.iteration = ? AND (len(t.topk_ids) != r.n_tokens
            OR len(t.topk_logprobs) != r.n_tokens OR len(t.topk_ids[1]) != t.k)""",
                iteration,
            )
            == []
        )
    else:
        assert q(run, have, iteration) == []

    # advantages: hand formula over each prompt's trained rows (std scaling with eps 1e-4)
    trained = q(
        run,
        f"SELECT prompt_id, reward_total, advantage FROM rollouts WHERE {W} AND trained",
        iteration,
    )
    groups: dict[str, list[dict]] = {}
    for row in trained:
        groups.setdefault(row["prompt_id"], []).append(row)
    for rows_ in groups.values():
        r = [x["reward_total"] for x in rows_]
        mean = sum(r) / len(r)
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
        for x in rows_:
            if cfg.algorithm.advantage_estimator == "grpo":
                adv = x["reward_total"] - mean
            else:  # rloo: against the mean of the other G - 1 rows
                adv = x["reward_total"] - (sum(r) - x["reward_total"]) / (len(r) - 1)
            if cfg.algorithm.scale_by_std:
                adv /= std + 1e-4
            assert x["advantage"] == pytest.approx(adv, abs=1e-9)


# ------------------------------------------------------------------------------ the batch
def test_iteration_batch_is_epoch_aware_and_reproducible():
    ids = [f"q{i:02d}" for i in range(10)]
    seed_fn = lambda *p: derive_seed("s", *p)  # noqa: E731
    batches = [iteration_batch(ids, 3, k, seed_fn) for k in range(9)]  # 3 batches per epoch
    assert [b[0].epoch for b in batches] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for b in batches:
        assert [e.position for e in b] == [0, 1, 2]
        assert len({e.prompt_id for e in b}) == 3  # never a question twice in a batch
    for epoch in range(3):
        seen = [e.prompt_id for b in batches[3 * epoch : 3 * epoch + 3] for e in b]
        assert len(set(seen)) == 9  # an epoch draws without replacement (one id sits it out)
    assert batches[0] != batches[3]  # each epoch has its own permutation
    assert (
        iteration_batch(list(reversed(ids)), 3, 4, seed_fn) == batches[4]
    )  # input order is irrelevant
    assert [e.position for e in shard_entries(batches[0], 1, 2)] == [1]
    with pytest.raises(RolloutError, match="exceeds the 10 training questions"):
        iteration_batch(ids, 11, 0, seed_fn)


# ------------------------------------------------------------------------------ scripted student
def gold_letters(run: Run) -> dict[str, str]:
    train = run.questions().train
    return dict(
        zip(train["question_id"].to_pylist(), train["gold_letter"].to_pylist(), strict=True)
    )


def category_of(run: Run, iteration: int = 0) -> dict[str, int]:
    """Batch position mod 3: 0 = no trigger, 1 = accepted at attempt 1, 2 = budget exhausted."""
    ids = run.questions().train["question_id"].to_pylist()
    return {e.prompt_id: e.position % 3 for e in iteration_batch(ids, P, iteration, run.seed)}


def scripted_student(
    run: Run, *, tokenizer=None, eos_id: int = 0, variant: str = "", **kw
) -> ScriptedBackend:
    gold, cat = gold_letters(run), category_of(run)
    other = {g: "A" if g != "A" else "B" for g in "ABCDEF"}

    def respond(kind, req, i):
        if kind == "train":
            pid = req.request_id
            if (
                cat[pid] == 0
            ):  # sample 0 correct, sample 1 well-formatted but wrong, others malformed
                return [answer(gold[pid]), answer(other[gold[pid]]), "unsure" + variant, "unsure"][
                    i
                ]
            return "unsure" + variant
        assert kind == "hint_aware"
        pid = req.request_id
        b = next(b for b in range(B) if req.seed == run.seed("hint", 0, pid, b))
        ok = cat[pid] == 1 and b == 1
        return answer(gold[pid] if ok else other[gold[pid]], reasoning=f"attempt {b} sample {i}")

    return ScriptedBackend(respond, name="student", tokenizer=tokenizer, eos_id=eos_id, **kw)


def scripted_teacher(**kw) -> ScriptedBackend:
    return ScriptedBackend(
        lambda kind, req, i: "<hint>Compare the shapes.</hint>", name="teacher", **kw
    )


@pytest.fixture(scope="module")
def tokenizer_info(tiny_models):
    from kepo.models import load_processor, stop_token_ids

    processor = load_processor(tiny_models[0])
    return processor.tokenizer, stop_token_ids(processor)[0]


def test_scripted_student_real_teacher_invariants(
    tmp_path, curated_bundled, tiny_models, tokenizer_info
):
    from kepo.generation import make_backend

    run = make_run(tmp_path, curated_bundled, tiny_models)
    tokenizer, eos = tokenizer_info
    student = scripted_student(run, tokenizer=tokenizer, eos_id=eos)
    teacher = make_backend("hf", tiny_models[1], device="cpu")
    try:
        result = run_rollout(run, 0, backend=student, teacher_backend=teacher)
    finally:
        teacher.close()
    check_invariants(run)
    cat = category_of(run)
    prompts = {
        p["prompt_id"]: p
        for p in q(run, "SELECT * FROM prompts WHERE run_id = ? AND iteration = ?")
    }
    for pid, c in cat.items():
        p = prompts[pid]
        assert p["triggered"] == (c != 0)
        assert (p["n_attempts"], p["n_injected"]) == {0: (0, 0), 1: (2, 2), 2: (B, 0)}[c]
    assert result.written["prompts"] == P and result.n_accepted == sum(c == 1 for c in cat.values())
    # the real teacher's hints (random model: malformed -> use_raw) are recorded with their prompt
    hints = q(run, "SELECT * FROM hints WHERE run_id = ? AND iteration = ?")
    assert {h["prompt_id"] for h in hints} == {pid for pid, c in cat.items() if c}
    assert all(
        h["teacher"] == tiny_models[1].name and "ground truth answer is" in h["hint_prompt"]
        for h in hints
    )
    # batching: one policy generate call for the whole batch, one student call per attempt round
    gens = student.generate_calls()
    assert [(c[1], len(c[2]), c[3]) for c in gens] == [
        ("policy samples", P, G),
        ("hint-aware attempt 1", sum(c != 0 for c in cat.values()), K),
        ("hint-aware attempt 2", sum(c != 0 for c in cat.values()), K),
    ]
    # the reference is the initial student, which is policy version 0: its log-probs are the old ones
    assert (
        q(
            run,
            "SELECT count(*) AS n FROM rollouts WHERE run_id = ? AND iteration = ? AND trained AND ref_logprobs != old_logprobs",
        )[0]["n"]
        == 0
    )
    # gates: the correct and the well-formatted wrong answer (total 1 >= tau 1) open, malformed rows do not
    opened = q(
        run,
        "SELECT source, reward_total FROM rollouts WHERE run_id = ? AND iteration = ? AND gate_open",
    )
    assert opened and all(r["reward_total"] >= 1 for r in opened)


@pytest.mark.parametrize("algorithm", ["grpo", "kepo-ke", "rloo"])
def test_exploration_off_records_why(tmp_path, curated_bundled, algorithm):
    overrides = {"algorithm.name": "rloo" if algorithm == "rloo" else algorithm.split("-")[0]}
    if algorithm == "kepo-ke":
        overrides["rollout.exploration.enabled"] = False
    run = make_run(tmp_path, curated_bundled, **overrides)
    student = scripted_student(run)
    # a KEPO-KE rollout uses its teacher only for offline top-k; GRPO/RLOO never
    teacher = scripted_teacher()
    run_rollout(run, 0, backend=student, teacher_backend=teacher)
    check_invariants(run)
    reasons = {
        p["trigger_reason"]
        for p in q(run, "SELECT trigger_reason FROM prompts WHERE run_id = ? AND iteration = ?")
    }
    assert reasons == {"exploration_off"}
    assert q(run, "SELECT * FROM hints WHERE run_id = ? AND iteration = ?") == []
    assert not teacher.generate_calls()
    if algorithm in ("grpo", "rloo"):
        assert teacher.calls == []  # never touched
        assert (
            q(run, "SELECT * FROM rollouts WHERE run_id = ? AND iteration = ? AND gate_open") == []
        )


def test_reference_backend_scores_ref_logprobs(tmp_path, curated_bundled):
    run = make_run(tmp_path, curated_bundled, **{"algorithm.distill.mode": "online"})
    ref = ScriptedBackend(lambda *a: "", name="reference")
    ref_lp = {}

    def spy(requests, ids, **kw):
        out = ScriptedBackend.score(ref, requests, ids, **kw)
        for r, _i, s in zip(requests, ids, out, strict=True):
            ref_lp[r.request_id] = [x - 1.0 for x in s.logprobs]
            s.logprobs = ref_lp[r.request_id]
        return out

    ref.score = spy
    run_rollout(
        run,
        0,
        backend=scripted_student(run),
        teacher_backend=scripted_teacher(),
        reference_backend=ref,
    )
    check_invariants(run)
    rows = q(
        run,
        "SELECT prompt_id, sample_idx, ref_logprobs, old_logprobs FROM rollouts WHERE run_id = ? AND iteration = ? AND trained",
    )
    assert len(rows) == P * G
    for r in rows:
        assert r["ref_logprobs"] == ref_lp[f"{r['prompt_id']}#{r['sample_idx']}"]
        assert r["ref_logprobs"] != r["old_logprobs"]
    assert (
        q(run, "SELECT * FROM teacher_topk WHERE run_id = ? AND iteration = ?") == []
    )  # online mode


# ------------------------------------------------------------------------------ real models
def test_real_models_rollout_invariants(tmp_path, curated_bundled, tiny_models):
    """Real tiny student and teacher end to end. tau = 0 opens every trained row's gate, so the
    real teacher's top-k is stored for every trained row."""
    run = make_run(tmp_path, curated_bundled, tiny_models, **{"algorithm.distill.gate.tau": 0.0})
    started = time.perf_counter()
    result = run_rollout(run, 0)
    elapsed = time.perf_counter() - started
    check_invariants(run)
    assert result.n_triggered == P  # a random model never answers: every prompt triggers
    attempts = q(run, "SELECT count(*) AS n FROM hint_attempts WHERE run_id = ? AND iteration = ?")[
        0
    ]["n"]
    usable = q(
        run,
        "SELECT count(*) AS n FROM hints WHERE run_id = ? AND iteration = ? AND hint_text IS NOT NULL",
    )[0]["n"]
    assert attempts == usable * B * K  # nothing is accepted, so every usable hint uses the budget
    topk = q(run, "SELECT count(*) AS n FROM teacher_topk WHERE run_id = ? AND iteration = ?")[0][
        "n"
    ]
    assert topk == P * G
    # policy rows are scored under the prompt they were sampled under: old = sampled log-probs
    for row in q(
        run,
        "SELECT old_logprobs, sampled_logprobs FROM rollouts WHERE run_id = ? AND iteration = ? AND source = 'policy'",
    ):
        assert row["old_logprobs"] == pytest.approx(row["sampled_logprobs"], abs=1e-4)
    print(f"real tiny rollout: {elapsed:.1f} s, timings {result.timings}")


class HintAnswersFromRealModel:
    """The real tiny student, except that hint-aware "samples" are a fixed correct completion.

    A random tiny model never answers correctly, so nothing would be injected. This backend keeps
    the real model in charge of every number: policy samples are real generations, and a
    hint-aware completion's generation-time log-probs are the real model's log-probs of those
    tokens under the hint-aware prompt (what `generate` returns for the tokens it samples, within
    1e-5, tests/test_generation.py). Only the choice of tokens is forced.
    """

    name = "hf-forced-hint-answers"

    def __init__(self, real, tokenizer, eos_id: int, gold: dict[str, str]) -> None:
        self.real, self.tokenizer, self.eos_id, self.gold = real, tokenizer, eos_id, gold

    def generate(self, requests, sampling, *, desc="generate"):
        if not any(prompt_kind(r) == "hint_aware" for r in requests):
            return self.real.generate(requests, sampling, desc=desc)
        out = []
        for r in requests:
            text = answer(
                self.gold[r.request_id], reasoning=f"comparing the structures {r.request_id}"
            )
            ids = [*self.tokenizer.encode(text, add_special_tokens=False), self.eos_id]
            [scores] = self.real.score([r], [ids])
            out.append(
                [
                    Completion(r.request_id, i, text, ids, scores.logprobs, "stop")
                    for i in range(sampling.n)
                ]
            )
        return out

    def score(self, requests, completion_ids, *, top_k=0, desc="score"):
        return self.real.score(requests, completion_ids, top_k=top_k, desc=desc)

    def load_policy(self, path):
        self.real.load_policy(path)

    def close(self):
        self.real.close()


def test_injected_old_logprobs_are_scored_under_the_plain_prompt(
    tmp_path, curated_bundled, tiny_models, tokenizer_info
):
    """Done-when 3: an injected trajectory's old_logprobs equal the real student's score() of its
    tokens under the PLAIN training prompt, and differ from its generation-time log-probs (under
    the hint-aware prompt)."""
    from kepo.generation import make_backend

    run = make_run(tmp_path, curated_bundled, tiny_models, **{"rollout.exploration.budget": 1})
    real = make_backend("hf", tiny_models[0], device="cpu")
    tokenizer, eos = tokenizer_info
    try:
        student = HintAnswersFromRealModel(real, tokenizer, eos, gold_letters(run))
        run_rollout(run, 0, backend=student, teacher_backend=scripted_teacher())
        check_invariants(run)
        injected = q(
            run, "SELECT * FROM rollouts WHERE run_id = ? AND iteration = ? AND source = 'hint'"
        )
        assert len(injected) == P * K  # every prompt triggered and was accepted at attempt 0
        questions = run.questions()
        for row in injected:
            item = PromptItem.from_row(questions.row(row["prompt_id"]))
            plain = GenerationRequest(
                "x",
                build_messages(item, "train", thinking=True),
                questions.image(row["prompt_id"]),
                0,
            )
            [expected] = real.score([plain], [row["completion_ids"]])
            assert row["old_logprobs"] == pytest.approx(expected.logprobs, abs=1e-5)
            gap = max(
                abs(a - b)
                for a, b in zip(row["old_logprobs"], row["sampled_logprobs"], strict=True)
            )
            assert gap > 1e-3, "under the hint-aware prompt the same tokens must score differently"
            assert "The hint is <hint>" in row["generation_prompt"]
    finally:
        real.close()


# ------------------------------------------------------------------------------ reruns, kills, shards
def table_rows(run: Run, table: str, iteration: int = 0) -> list[dict]:
    return run.store.read(table, {"run_id": run.run_id, "iteration": iteration}).to_pylist()


def test_rerun_replaces_rows(tmp_path, curated_bundled):
    run = make_run(tmp_path, curated_bundled)
    run_rollout(run, 0, backend=scripted_student(run), teacher_backend=scripted_teacher())
    first = table_rows(run, "rollouts")
    run_rollout(
        run, 0, backend=scripted_student(run, variant=" again"), teacher_backend=scripted_teacher()
    )
    second = table_rows(run, "rollouts")
    assert len(first) == len(second)
    assert any("again" in r["completion_text"] for r in second)
    # only the second run's texts remain ("unsure" without the variant is sample 3 of category 0 alone)
    stale = [r for r in first if r["completion_text"] == "unsure" and r["sample_idx"] != 3]
    assert stale and not [
        r for r in second if r["completion_text"] == "unsure" and r["sample_idx"] != 3
    ]
    for table in ("prompts", "rollouts", "hints", "hint_attempts", "teacher_topk"):
        rows = table_rows(run, table)
        keys = {
            tuple(r[k] for k in ("prompt_id", "sample_idx", "attempt_id") if k in r) for r in rows
        }
        assert len(keys) == len(rows)  # no key twice
    check_invariants(run)


def test_rollout_killed_midway_leaves_one_consistent_copy(tmp_path, curated_bundled):
    run = make_run(tmp_path, curated_bundled)
    run_rollout(run, 0, backend=scripted_student(run), teacher_backend=scripted_teacher())
    before = {
        t: table_rows(run, t)
        for t in ("prompts", "rollouts", "hints", "hint_attempts", "teacher_topk")
    }
    marker = tmp_path / "generating"
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from scripted import ScriptedBackend
        from kepo.rollout import run_rollout
        from kepo.run import Run
        run = Run.open({str(run.config.db_path)!r}, {run.run_id!r})
        slow = ScriptedBackend(lambda k, r, i: "killed", generate_delay_s=120, started_marker=Path({str(marker)!r}))
        run_rollout(run, 0, backend=slow, teacher_backend=slow)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=TESTS_DIR.parent)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the rollout subprocess ended before generating"
            assert time.monotonic() < deadline, "the rollout subprocess never started generating"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    after = {t: table_rows(run, t) for t in before}
    assert after == before  # the previous copy is intact, nothing of the killed run is visible
    run_rollout(
        run, 0, backend=scripted_student(run, variant="!"), teacher_backend=scripted_teacher()
    )
    check_invariants(run)
    assert len(table_rows(run, "rollouts")) == len(before["rollouts"])


def test_shards_commit_to_the_unsharded_result(tmp_path, curated_bundled):
    run = make_run(tmp_path, curated_bundled)
    run_rollout(run, 0, backend=scripted_student(run), teacher_backend=scripted_teacher())
    whole = {
        t: table_rows(run, t)
        for t in ("prompts", "rollouts", "hints", "hint_attempts", "teacher_topk")
    }
    dirs = [
        rollout_shard(
            run,
            0,
            i,
            3,
            tmp_path / f"shard-{i}",
            backend=scripted_student(run),
            teacher_backend=scripted_teacher(),
        )
        for i in range(3)
    ]
    with pytest.raises(RolloutError, match="do not form one complete set"):
        commit_shards(run, 0, dirs[:2])
    assert {t: table_rows(run, t) for t in whole} == whole  # a refused commit writes nothing
    part = run_rollout(
        run, 0, shard=(1, 3), backend=scripted_student(run), teacher_backend=scripted_teacher()
    )
    assert part.written is None and part.tables["prompts"]["batch_position"].to_pylist() == [1]
    result = commit_shards(run, 0, list(reversed(dirs)))
    assert result.written["prompts"] == P
    assert {t: table_rows(run, t) for t in whole} == whole
    check_invariants(run)


def test_batch_scope_cannot_be_sharded_but_runs_unsharded(tmp_path, curated_bundled):
    run = make_run(tmp_path, curated_bundled, **{"rollout.exploration.trigger_scope": "batch"})
    with pytest.raises(RolloutError, match="trigger_scope = 'batch'"):
        rollout_shard(
            run,
            0,
            0,
            2,
            tmp_path / "s",
            backend=scripted_student(run),
            teacher_backend=scripted_teacher(),
        )
    run_rollout(run, 0, backend=scripted_student(run), teacher_backend=scripted_teacher())
    prompts = q(
        run, "SELECT trigger_reason, triggered FROM prompts WHERE run_id = ? AND iteration = ?"
    )
    assert all(p["triggered"] for p in prompts)
    assert "batch_scope" in {p["trigger_reason"] for p in prompts}


def test_missing_model_folder_is_a_clear_error(tmp_path, curated_bundled):
    run = make_run(tmp_path, curated_bundled)
    with pytest.raises(RolloutError, match="no-student does not exist"):
        run_rollout(run, 0)


# ------------------------------------------------------------------------------ advantages and gates
def _trajectory(group: int, total: float, *, accuracy: float = 0.0, trained: bool = True):
    from kepo.rollout import Trajectory

    return Trajectory(
        group,
        {
            "reward_total": total,
            "reward_accuracy": accuracy,
            "trained": trained,
            "advantage": None,
            "gate_open": False,
        },
    )


def test_assign_advantages_and_gates_hand_values():
    """Two prompts interleaved (groups need not be contiguous), one row replaced (not trained).
    Group 0 trains totals (2, 1, 0): mean 1, unbiased std 1; group 1 trains (1, 1): std 0."""
    from kepo.config import GateConfig
    from kepo.rollout import assign_advantages_and_gates

    rows = [
        _trajectory(0, 2.0, accuracy=1.0),
        _trajectory(1, 1.0),
        _trajectory(0, 2.0, accuracy=1.0, trained=False),  # replaced: no advantage, gate closed
        _trajectory(0, 1.0),
        _trajectory(1, 1.0, accuracy=1.0),
        _trajectory(0, 0.0),
    ]
    before = [dict(r.columns) for r in rows]

    def run(**kw):
        out = assign_advantages_and_gates(rows, **kw)
        return [r.columns["advantage"] for r in out], [r.columns["gate_open"] for r in out]

    s = 1.0 + 1e-4  # std + eps
    adv, gates = run(estimator="grpo", scale_by_std=True, gate=GateConfig(tau=1.0, comparator=">="))
    assert adv == pytest.approx([1 / s, 0.0, None, 0.0, 0.0, -1 / s], abs=1e-12)
    assert gates == [True, True, False, True, True, False]
    adv, gates = run(estimator="grpo", scale_by_std=False, gate=GateConfig(tau=1.0, comparator=">"))
    assert adv == [1.0, 0.0, None, 0.0, 0.0, -1.0]
    assert gates == [True, False, False, False, False, False]
    # rloo: against the mean of the other trained rows of the group: 2 - 0.5, 1 - 1, 0 - 1.5
    adv, gates = run(
        estimator="rloo",
        scale_by_std=False,
        gate=GateConfig(tau=1.0, comparator=">=", reward_part="accuracy"),
    )
    assert adv == [1.5, 0.0, None, 0.0, 0.0, -1.5]
    assert gates == [True, False, False, False, True, False]
    # an algorithm without a gate (grpo, rloo, gkd): every gate stays closed
    _, gates = run(estimator="grpo", scale_by_std=True, gate=None)
    assert gates == [False] * 6
    assert [r.columns for r in rows] == before  # the input rows are left as they were


# ------------------------------------------------------------------------------ no policy samples
@pytest.mark.parametrize(
    "overrides",
    [{"algorithm.name": "sft"}, {"algorithm.name": "gkd", "algorithm.gkd_lambda": 0.0}],
    ids=["sft", "gkd-lambda0"],
)
def test_algorithms_without_policy_samples_generate_nothing(tmp_path, curated_bundled, overrides):
    """SFT and MM-GKD with λ = 0 train on dataset targets only: the rollout stage records the
    batch's prompts and never asks a backend for a sample or a score."""
    from kepo.audit import prompt_story

    run = make_run(tmp_path, curated_bundled, **overrides)
    student, teacher = scripted_student(run), scripted_teacher()
    result = run_rollout(run, 0, backend=student, teacher_backend=teacher)
    assert student.calls == [] and teacher.calls == []
    prompts = q(run, "SELECT * FROM prompts WHERE run_id = ? AND iteration = ?")
    batch = iteration_batch(run.questions().train["question_id"].to_pylist(), P, 0, run.seed)
    assert sorted(p["prompt_id"] for p in prompts) == sorted(e.prompt_id for e in batch)
    assert result.written["prompts"] == P
    for p in prompts:
        assert p["trigger_reason"] == "no_policy_samples" and not p["triggered"]
        assert p["n_policy_correct"] is None and p["max_trigger_reward"] is None
    for table in ("rollouts", "hints", "hint_attempts", "teacher_topk"):
        assert table_rows(run, table) == [], table
    story = prompt_story(run.store, run.run_id, 0, prompts[0]["prompt_id"])
    assert story["samples"] == [] and "no policy samples" in story["trigger"]["explanation"]
