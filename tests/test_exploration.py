"""Algorithm 1 (kepo.exploration) driven by a scripted generator: every branch of the algorithm.

The scripted backend returns predetermined texts, so each test states exactly which samples
are correct and checks the decisions Algorithm 1 takes on them.
"""

from __future__ import annotations

import pytest
from scripted import ScriptedBackend, answer, wrong_letter

from kepo.exploration import (
    ExplorationSettings,
    PolicyGroup,
    decide_triggers,
    explore,
    hint_from_output,
    injection_slots,
)
from kepo.generation.base import SamplingParams
from kepo.prompts import PromptItem
from kepo.rewards import score_completion
from kepo.run import derive_seed

G = 4
ITERATION = 3


def seed(*parts: object) -> int:
    return derive_seed("test-run", *parts)


def item(qid: str, gold: str = "B") -> PromptItem:
    return PromptItem(
        qid, f"Which structure is shown in {qid}?", ("Liver", "Kidney", "Heart", "Lung"), gold
    )


def group(qid: str, texts: list[str], gold: str = "B") -> PolicyGroup:
    it = item(qid, gold)
    rewards = [score_completion(t, gold, thinking=True, n_options=4) for t in texts]
    return PolicyGroup(qid, it, None, rewards)


ALL_ZERO = ["I am not sure."] * G  # format 0, accuracy 0: total 0


def settings(**kw) -> ExplorationSettings:
    base = dict(
        active=True,
        group_size=G,
        student_sampling=SamplingParams(n=1, temperature=0.9, max_new_tokens=32),
        hint_sampling=SamplingParams(n=1, temperature=0.0, max_new_tokens=32),
        budget=3,
        inject_k=2,
    )
    base.update(kw)
    return ExplorationSettings(**base)


def attempt_of(request) -> int:
    """Which attempt round b a hint-aware request belongs to (from its seed)."""
    for b in range(20):
        if request.seed == seed("hint", ITERATION, request.request_id, b):
            return b
    raise AssertionError("request seed is not an attempt seed")


def teacher_saying(text: str = "<hint>Look at the bean shape.</hint>") -> ScriptedBackend:
    return ScriptedBackend(lambda kind, req, i: text, name="teacher")


def student(correct_from: dict[str, int] | None = None, per_sample=None) -> ScriptedBackend:
    """Hint-aware samples are correct from attempt `correct_from[prompt]` on (never if absent);
    `per_sample(prompt, b, i)` overrides with an explicit letter (or None: malformed)."""

    def respond(kind, req, i):
        assert kind == "hint_aware", "the student is only asked hint-aware prompts in explore()"
        b = attempt_of(req)
        if per_sample is not None:
            return answer(per_sample(req.request_id, b, i))
        ok = (
            correct_from is not None
            and req.request_id in correct_from
            and b >= correct_from[req.request_id]
        )
        return answer("B" if ok else wrong_letter("B"))

    return ScriptedBackend(respond, name="student")


def run_explore(groups, s, stud, teach):
    return explore(groups, settings=s, student=stud, teacher=teach, seed=seed, iteration=ITERATION)


# ------------------------------------------------------------------------------ trigger
def test_no_trigger_when_some_policy_sample_scores():
    g = group("q1", [answer("B"), *ALL_ZERO[1:]])
    teacher_calls = []

    def teacher_factory():
        teacher_calls.append(1)
        return teacher_saying()

    stud = student()
    [out] = run_explore([g], settings(), stud, teacher_factory)
    assert (out.triggered, out.trigger_reason, out.max_trigger_reward) == (
        False,
        "not_all_zero",
        2.0,
    )
    assert out.hint is None and out.attempts == [] and out.injections == []
    assert teacher_calls == [] and stud.calls == []  # the teacher is never even loaded


def test_well_formatted_wrong_answers_trigger_only_on_the_accuracy_part():
    g = group("q1", [answer("A")] * G)  # total 1, accuracy 0 each
    [by_total] = decide_triggers([g], settings(trigger_reward="total"))
    [by_accuracy] = decide_triggers([g], settings(trigger_reward="accuracy"))
    assert (by_total.triggered, by_total.trigger_reason) == (False, "not_all_zero")
    assert (by_accuracy.triggered, by_accuracy.trigger_reason) == (True, "all_zero_accuracy")
    assert by_total.max_trigger_reward == 1.0 and by_accuracy.max_trigger_reward == 0.0


def test_exploration_off_never_triggers():
    [out] = run_explore([group("q1", ALL_ZERO)], settings(active=False), None, None)
    assert (out.triggered, out.trigger_reason) == (False, "exploration_off")


def test_group_of_wrong_size_is_an_error():
    with pytest.raises(ValueError, match="expected G = 4"):
        decide_triggers([group("q1", ALL_ZERO[:3])], settings())


# ------------------------------------------------------------------------------ acceptance
def test_trigger_then_acceptance_at_attempt_b():
    g = group("q1", ALL_ZERO)
    teach, stud = teacher_saying(), student(correct_from={"q1": 2})
    [out] = run_explore([g], settings(budget=5), stud, teach)
    assert (out.triggered, out.trigger_reason) == (True, "all_zero_total")
    assert out.hint.parse_ok and out.hint.hint_text == "Look at the bean shape."
    assert "The ground truth answer is B. Kidney." in out.hint.hint_prompt
    # attempts 0 and 1 failed (wrong letter), attempt 2 accepted; no attempt after acceptance
    assert out.n_attempts == 3
    assert [(a.attempt_idx, a.k_idx) for a in out.attempts] == [
        (b, k) for b in range(3) for k in range(2)
    ]
    assert [a.reward.reward_accuracy for a in out.attempts] == [0, 0, 0, 0, 1, 1]
    assert [a.attempt_accepted for a in out.attempts] == [False] * 4 + [True] * 2
    assert [a.injected for a in out.attempts] == [False] * 4 + [True] * 2
    # both samples of the accepted attempt are injected into distinct, seeded slots
    assert [inj.sample.attempt_id for inj in out.injections] == ["q1/b2/k0", "q1/b2/k1"]
    slots = [inj.slot for inj in out.injections]
    assert slots == injection_slots(seed("inject", ITERATION, "q1"), G, 2)
    assert len(set(slots)) == 2 and all(0 <= s < G for s in slots)
    # the hint-aware prompt carries the hint and (v1) the answer; the request seed is per attempt
    assert "The hint is <hint>Look at the bean shape.</hint>" in out.attempts[0].generation_prompt
    assert "<answer>B. Kidney</answer>" in out.attempts[0].generation_prompt
    assert [c[3] for c in stud.generate_calls()] == [2, 2, 2]  # n = K per attempt


def test_budget_exhausted_injects_nothing():
    g = group("q1", ALL_ZERO)
    [out] = run_explore([g], settings(budget=3), student(), teacher_saying())
    assert out.triggered and out.n_attempts == 3 and len(out.attempts) == 3 * 2
    assert not out.accepted and out.injections == []
    assert not any(a.attempt_accepted or a.injected for a in out.attempts)


@pytest.mark.parametrize("rule", ["any", "all"])
def test_k2_with_one_correct_sample(rule):
    # attempt 0: only k=0 correct; attempt 1: both correct
    def per_sample(pid, b, i):
        return "B" if (b >= 1 or i == 0) else "C"

    [out] = run_explore(
        [group("q1", ALL_ZERO)],
        settings(accept_rule=rule),
        student(per_sample=per_sample),
        teacher_saying(),
    )
    first = out.attempts[:2]
    assert [a.acceptable for a in first] == [True, False]
    if rule == "any":  # the paper: one acceptable sample accepts the attempt; only it is injected
        assert out.n_attempts == 1
        assert [a.attempt_accepted for a in first] == [True, True]
        assert [a.injected for a in first] == [True, False]
        assert [i.sample.attempt_id for i in out.injections] == ["q1/b0/k0"]
    else:  # the authors: all K must be correct, so attempt 0 fails and attempt 1 is taken
        assert out.n_attempts == 2
        assert not any(a.attempt_accepted for a in first)
        assert [i.sample.attempt_id for i in out.injections] == ["q1/b1/k0", "q1/b1/k1"]
    slots = [i.slot for i in out.injections]
    assert slots == injection_slots(seed("inject", ITERATION, "q1"), G, len(slots))


# ------------------------------------------------------------------------------ scope, batching
def test_batch_scope_explores_every_prompt():
    groups = [group("q1", ALL_ZERO), group("q2", [answer("B")] * G), group("q3", ALL_ZERO)]
    prompt_scope = decide_triggers(groups, settings(trigger_scope="prompt"))
    assert [o.triggered for o in prompt_scope] == [True, False, True]
    teach, stud = teacher_saying(), student(correct_from={"q1": 0, "q2": 1, "q3": 9})
    outs = run_explore(groups, settings(trigger_scope="batch"), stud, teach)
    assert [o.triggered for o in outs] == [True, True, True]
    assert [o.trigger_reason for o in outs] == ["all_zero_total", "batch_scope", "all_zero_total"]
    assert [o.n_attempts for o in outs] == [1, 2, 3]
    assert [o.accepted for o in outs] == [True, True, False]
    # one teacher call for all hints; per round one student call holding every open prompt
    assert [c[2] for c in teach.generate_calls()] == [["q1", "q2", "q3"]]
    assert [c[2] for c in stud.generate_calls()] == [["q1", "q2", "q3"], ["q2", "q3"], ["q3"]]


def test_batch_scope_without_any_all_zero_prompt_does_not_trigger():
    groups = [group("q1", [answer("B")] * G), group("q2", [answer("B")] * G)]
    outs = decide_triggers(groups, settings(trigger_scope="batch"))
    assert [o.trigger_reason for o in outs] == ["not_all_zero", "not_all_zero"]


def test_results_do_not_depend_on_the_rest_of_the_batch():
    alone = run_explore(
        [group("q3", ALL_ZERO)], settings(), student(correct_from={"q3": 1}), teacher_saying()
    )
    together = run_explore(
        [group("q1", ALL_ZERO), group("q3", ALL_ZERO)],
        settings(),
        student(correct_from={"q1": 0, "q3": 1}),
        teacher_saying(),
    )
    a, b = alone[0], together[1]
    assert [(x.attempt_id, x.completion.text) for x in a.attempts] == [
        (x.attempt_id, x.completion.text) for x in b.attempts
    ]
    assert [i.slot for i in a.injections] == [i.slot for i in b.injections]


# ------------------------------------------------------------------------------ malformed hints, leaks
def test_malformed_hint_use_raw():
    teach = teacher_saying("<think>plan</think>The organ is bean <hint>shaped")  # unclosed tag
    [out] = run_explore(
        [group("q1", ALL_ZERO)],
        settings(malformed_hint="use_raw"),
        student(correct_from={"q1": 0}),
        teach,
    )
    h = out.hint
    assert (h.parse_ok, h.parse_reason, h.malformed_rule) == (False, "unclosed_tag", "use_raw")
    assert h.hint_text == "The organ is bean shaped"
    assert "<hint>The organ is bean shaped</hint>" in out.attempts[0].generation_prompt
    assert out.accepted


def test_malformed_hint_skip():
    stud = student(correct_from={"q1": 0})
    [out] = run_explore(
        [group("q1", ALL_ZERO)], settings(malformed_hint="skip"), stud, teacher_saying("no tags")
    )
    h = out.hint
    assert (h.parse_ok, h.parse_reason, h.malformed_rule, h.hint_text) == (
        False,
        "no_hint_tag",
        "skip",
        None,
    )
    assert out.triggered and out.attempts == [] and not out.accepted
    assert stud.calls == []


def test_malformed_hint_with_nothing_usable_is_skipped():
    h = hint_from_output("<hint></hint>", "prompt", "use_raw")
    assert (h.parse_ok, h.parse_reason, h.malformed_rule, h.hint_text) == (
        False,
        "empty_hint",
        "skip_empty_raw",
        None,
    )


@pytest.mark.parametrize("reject", [False, True])
def test_leaking_samples_are_flagged_and_optionally_rejected(reject):
    def respond(kind, req, i):
        b = attempt_of(req)
        if b == 0:  # correct, but the reasoning cites the hint
            return "<think>The hint says it is the kidney.</think><answer>B</answer>"
        return answer("B")

    stud = ScriptedBackend(respond)
    [out] = run_explore(
        [group("q1", ALL_ZERO)], settings(reject_leaks=reject), stud, teacher_saying()
    )
    first = out.attempts[:2]
    assert all(a.leak_flag for a in first) and all(a.reward.reward_accuracy == 1 for a in first)
    if reject:
        assert not any(a.acceptable for a in first) and out.n_attempts == 2
        assert [i.sample.attempt_id for i in out.injections] == ["q1/b1/k0", "q1/b1/k1"]
        assert not any(i.sample.leak_flag for i in out.injections)
    else:
        assert out.n_attempts == 1 and all(i.sample.leak_flag for i in out.injections)


def test_injection_slots_are_distinct_and_reproducible():
    for s in range(50):
        slots = injection_slots(s, 8, 3)
        assert len(set(slots)) == 3 and all(0 <= x < 8 for x in slots)
        assert slots == injection_slots(s, 8, 3)
    assert len({tuple(injection_slots(s, 8, 2)) for s in range(50)}) > 10  # the seed matters
    with pytest.raises(ValueError):
        injection_slots(0, 2, 3)
