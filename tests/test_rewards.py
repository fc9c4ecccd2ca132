"""Format and accuracy rewards on a table of tricky outputs (gold letter B)."""

from __future__ import annotations

import pytest

from kepo.rewards import (
    AnswerParse,
    RewardRecord,
    accuracy_reward,
    format_reward,
    parse_answer,
    score_completion,
)

GOLD = "B"
THINK = "<think>The lesion is bright on T2.</think>"

# (id, output, format thinking, format non-thinking, accuracy, parsed answer, reason, n_options)
CASES = [
    ("clean", f"{THINK}<answer>B</answer>", 1, 0, 1, "B", None, 4),
    ("clean_wrong_letter", f"{THINK}<answer>C</answer>", 1, 0, 0, "C", None, 4),
    ("whitespace_between", f"  {THINK}\n\n<answer>B</answer>\n", 1, 0, 1, "B", None, 4),
    ("spaces_inside_tag", f"{THINK}<answer>  B \n</answer>", 1, 0, 1, "B", None, 4),
    ("lowercase_letter", f"{THINK}<answer>b</answer>", 1, 0, 1, "B", None, 4),
    ("parenthesised", f"{THINK}<answer>(B)</answer>", 1, 0, 1, "B", None, 4),
    ("letter_dot", f"{THINK}<answer>B.</answer>", 1, 0, 1, "B", None, 4),
    ("letter_paren", f"{THINK}<answer>B)</answer>", 1, 0, 1, "B", None, 4),
    ("half_parenthesis", f"{THINK}<answer>(B</answer>", 1, 0, 0, None, "not_a_letter", 4),
    ("letter_and_text", f"{THINK}<answer>B. Pneumonia</answer>", 1, 0, 0, None, "not_a_letter", 4),
    (
        "letter_paren_text",
        f"{THINK}<answer>B) Pneumonia</answer>",
        1,
        0,
        0,
        None,
        "not_a_letter",
        4,
    ),
    ("option_text", f"{THINK}<answer>Pneumonia</answer>", 1, 0, 0, None, "not_a_letter", 4),
    ("two_letters", f"{THINK}<answer>B or C</answer>", 1, 0, 0, None, "not_a_letter", 4),
    ("answer_prefix", f"{THINK}<answer>Answer: B</answer>", 1, 0, 0, None, "not_a_letter", 4),
    ("empty_answer", f"{THINK}<answer></answer>", 1, 0, 0, None, "empty_answer", 4),
    ("blank_answer", f"{THINK}<answer> \n </answer>", 1, 0, 0, None, "empty_answer", 4),
    ("empty_think", "<think></think><answer>B</answer>", 1, 0, 1, "B", None, 4),
    ("no_tags", "The answer is B.", 0, 0, 0, None, "no_answer_tag", 4),
    ("think_only", f"{THINK}", 0, 0, 0, None, "no_answer_tag", 4),
    ("unclosed_answer", f"{THINK}<answer>B", 0, 0, 0, None, "unclosed_tag", 4),
    ("unopened_answer", f"{THINK}B</answer>", 0, 0, 0, None, "misordered_tags", 4),
    ("reversed_tags", f"{THINK}</answer>B<answer>", 0, 0, 0, None, "misordered_tags", 4),
    (
        "two_answers_same",
        f"{THINK}<answer>B</answer><answer>B</answer>",
        0,
        0,
        0,
        None,
        "multiple_answer_tags",
        4,
    ),
    (
        "hedged_answers",
        f"{THINK}<answer>A</answer> or <answer>B</answer>",
        0,
        0,
        0,
        None,
        "multiple_answer_tags",
        4,
    ),
    (
        "answer_tag_inside_think",
        "<think>I will write <answer>A</answer> later.</think><answer>B</answer>",
        0,
        0,
        0,
        None,
        "multiple_answer_tags",
        4,
    ),
    (
        "extra_close_tag",
        f"{THINK}<answer>B</answer></answer>",
        0,
        0,
        0,
        None,
        "multiple_answer_tags",
        4,
    ),
    ("out_of_range", f"{THINK}<answer>E</answer>", 1, 0, 0, None, "letter_out_of_range", 4),
    ("in_range_six", f"{THINK}<answer>E</answer>", 1, 0, 0, "E", None, 6),
    ("beyond_letters", f"{THINK}<answer>G</answer>", 1, 0, 0, None, "letter_out_of_range", None),
    ("two_option_question", f"{THINK}<answer>C</answer>", 1, 0, 0, None, "letter_out_of_range", 2),
    ("preamble", f"Sure! {THINK}<answer>B</answer>", 0, 0, 1, "B", None, 4),
    ("trailing_text", f"{THINK}<answer>B</answer> Hope this helps.", 0, 0, 1, "B", None, 4),
    ("answer_before_think", f"<answer>B</answer>{THINK}", 0, 0, 1, "B", None, 4),
    ("text_between", f"{THINK} so <answer>B</answer>", 0, 0, 1, "B", None, 4),
    ("answer_only", "<answer>B</answer>", 0, 1, 1, "B", None, 4),
    ("answer_only_padded", "\n <answer> B </answer> \n", 0, 1, 1, "B", None, 4),
    ("answer_inside_think", "<think>So <answer>B</answer></think>", 0, 0, 1, "B", None, 4),
    ("two_think_blocks", f"{THINK}{THINK}<answer>B</answer>", 0, 0, 1, "B", None, 4),
    ("unclosed_think", "<think>hmm <answer>B</answer>", 0, 0, 1, "B", None, 4),
    ("capitalised_tags", "<Think>x</Think><Answer>B</Answer>", 0, 0, 0, None, "no_answer_tag", 4),
    ("spaced_tag", f"{THINK}< answer>B</answer>", 0, 0, 0, None, "misordered_tags", 4),
    ("word_letter", f"{THINK}<answer>Bee</answer>", 1, 0, 0, None, "not_a_letter", 4),
    ("digit", f"{THINK}<answer>2</answer>", 1, 0, 0, None, "not_a_letter", 4),
    ("full_width_letter", f"{THINK}<answer>Ｂ</answer>", 1, 0, 0, None, "not_a_letter", 4),
]


@pytest.mark.parametrize(
    ("text", "fmt_think", "fmt_plain", "accuracy", "answer", "reason", "n_options"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_reward_table(text, fmt_think, fmt_plain, accuracy, answer, reason, n_options):
    assert format_reward(text, thinking=True) == fmt_think
    assert format_reward(text, thinking=False) == fmt_plain
    assert parse_answer(text, n_options) == AnswerParse(answer, reason)
    assert accuracy_reward(text, GOLD, n_options) == accuracy
    for thinking, fmt in ((True, fmt_think), (False, fmt_plain)):
        record = score_completion(text, GOLD, thinking=thinking, n_options=n_options)
        assert record == RewardRecord(
            reward_format=float(fmt),
            reward_accuracy=float(accuracy),
            reward_total=float(fmt + accuracy),
            parsed_answer=answer,
            parse_reason=reason,
        )


def test_table_is_large_and_covers_every_reason():
    assert len(CASES) >= 25
    reasons = {case[6] for case in CASES}
    assert reasons == {
        None,
        "no_answer_tag",
        "multiple_answer_tags",
        "unclosed_tag",
        "misordered_tags",
        "empty_answer",
        "not_a_letter",
        "letter_out_of_range",
    }


def test_non_thinking_rejects_think_tags_inside_the_answer():
    assert format_reward("<answer><think>B</think></answer>", thinking=False) == 0.0


def test_rewards_are_floats_and_total_is_the_sum():
    record = score_completion(f"{THINK}<answer>B</answer>", "B", thinking=True)
    assert isinstance(record.reward_total, float)
    assert record.reward_total == 2.0
    record = score_completion("B", "B", thinking=True)
    assert record.reward_total == 0.0


@pytest.mark.parametrize("gold", ["b", "G", "", "AB", None])
def test_bad_gold_letter_is_an_error(gold):
    with pytest.raises(ValueError, match="gold_letter"):
        accuracy_reward("<answer>B</answer>", gold)
    with pytest.raises(ValueError, match="gold_letter"):
        score_completion("<answer>B</answer>", gold, thinking=False)


def test_gold_letter_beyond_the_options_is_an_error():
    with pytest.raises(ValueError, match="gold_letter"):
        accuracy_reward("<answer>D</answer>", "D", n_options=3)


@pytest.mark.parametrize("n_options", [0, 1, 7])
def test_bad_n_options_is_an_error(n_options):
    with pytest.raises(ValueError, match="n_options"):
        parse_answer("<answer>B</answer>", n_options)
