"""Prompt templates, chat messages, hint parsing and the hint/answer leak detector."""

from __future__ import annotations

import pytest

from kepo.prompts import (
    LETTERS,
    HintParse,
    PromptItem,
    build_messages,
    build_prompt_text,
    hint_request_answer,
    mentions_hint_or_answer,
    parse_hint,
    render_question,
    vocabulary_corpus,
)

ITEM = PromptItem(
    question_id="q1",
    question="What imaging modality is shown? ",
    options=("CT", "MRI", "X-Ray", "Ultrasound"),
    gold_letter="B",
)
NO_GOLD = PromptItem(question_id="q2", question="Which organ?", options=("Liver", "Kidney"))
HINT = "Look at how bright the fluid is; T2 weighting makes water appear white in this sequence."

# Sentences of Appendix C, as printed in the paper (backticks dropped).
THINKING_SENTENCES = [
    "Your task:",
    "1. Think through the question step by step, enclose your reasoning process in "
    "<think>...</think> tags.",
    "2. Then provide the correct single-letter choice (A, B, C, D, ...) inside "
    "<answer>...</answer> tags.",
    "3. No extra information or text outside of these tags.",
]
NON_THINKING_SENTENCES = [
    "1. Provide the correct single-letter choice (A, B, C, D, ...) inside "
    "<answer>...</answer> tags.",
    "2. No extra information or text outside of this tag.",
]
HINT_REQUEST_SENTENCES = [
    "1. You will get a correct answer for the question.",
    "2. Please provide a hint for the question based on the correct answer, inside "
    "<hint>...</hint> tags.",
    "3. No extra information or text outside of these tags.",
    "The ground truth answer is B. MRI.",
]
HINT_AWARE_V1_SENTENCES = [
    "1. Read the hint provided in <hint>...</hint> tags and the ground truth answer provided in "
    "<answer>...</answer> tags.",
    "2. Think through the question step by step but do not explicitly mention the hint or the "
    "ground truth answer, enclose your reasoning process in <think>...</think> tags.",
    "3. Then provide the correct single-letter choice (A, B, C, D, ...) inside "
    "<answer>...</answer> tags.",
    "4. No extra information or text outside of these tags.",
    f"The hint is <hint>{HINT}</hint> and the ground truth answer is <answer>B. MRI</answer>.",
]


def test_render_question_layout():
    assert render_question(ITEM) == (
        "Question: What imaging modality is shown?\nOptions:\nA. CT\nB. MRI\nC. X-Ray\nD. Ultrasound"
    )


def test_train_prompt_is_question_then_appendix_c_thinking():
    text = build_prompt_text(ITEM, "train")
    assert text.startswith(render_question(ITEM) + "\n\nYour task:\n1. Think")
    assert text.splitlines()[-4:] == THINKING_SENTENCES


def test_non_thinking_prompt_is_appendix_c():
    text = build_prompt_text(ITEM, "train", thinking=False)
    assert text.splitlines()[-2:] == NON_THINKING_SENTENCES
    assert "<think>" not in text


def test_hint_request_prompt_carries_the_answer():
    assert hint_request_answer(ITEM) == "B. MRI"
    lines = build_prompt_text(ITEM, "hint_request").splitlines()
    for sentence in HINT_REQUEST_SENTENCES:
        assert sentence in lines
    # The teacher prompt has one version: `thinking` does not change it.
    assert build_prompt_text(ITEM, "hint_request", thinking=False) == build_prompt_text(
        ITEM, "hint_request"
    )


def test_hint_aware_v1_is_appendix_c_verbatim():
    lines = build_prompt_text(ITEM, "hint_aware", hint=HINT).splitlines()
    assert lines[-6:] == [*HINT_AWARE_V1_SENTENCES[:4], "", HINT_AWARE_V1_SENTENCES[4]]


def test_hint_aware_v0_drops_only_the_answer():
    text = build_prompt_text(ITEM, "hint_aware", hint=HINT, hint_version="v0")
    assert "1. Read the hint provided in <hint>...</hint> tags.\n" in text
    assert "do not explicitly mention the hint, enclose your reasoning" in text
    assert text.endswith(f"The hint is <hint>{HINT}</hint>.")
    assert "ground truth" not in text
    assert "MRI</answer>" not in text
    # v0 needs no gold letter.
    assert "Kidney" in build_prompt_text(NO_GOLD, "hint_aware", hint="x", hint_version="v0")


def test_hint_aware_non_thinking_variants():
    for version in ("v0", "v1"):
        text = build_prompt_text(
            ITEM, "hint_aware", hint=HINT, hint_version=version, thinking=False
        )
        assert "<think>" not in text
        assert NON_THINKING_SENTENCES[0][3:] in text  # "Provide the correct single-letter ..."
        assert f"<hint>{HINT}</hint>" in text
        assert ("<answer>B. MRI</answer>" in text) == (version == "v1")


def test_hint_with_braces_is_inserted_literally():
    text = build_prompt_text(ITEM, "hint_aware", hint="check {answer} and {0}")
    assert "<hint>check {answer} and {0}</hint>" in text


def test_eval_prompts():
    assert build_prompt_text(ITEM, "eval") == build_prompt_text(ITEM, "train")
    assert build_prompt_text(ITEM, "eval", thinking=False) == build_prompt_text(
        ITEM, "train", thinking=False
    )
    authors = build_prompt_text(ITEM, "eval", eval_prompt="authors")
    assert authors == (
        render_question(ITEM) + " Think through the question step by step in <think>...</think> "
        "tags. Then provide the correct single-letter choice (A, B, C, D,...) inside "
        "<answer>...</answer> tags."
    )
    with pytest.raises(ValueError, match="thinking mode only"):
        build_prompt_text(ITEM, "eval", eval_prompt="authors", thinking=False)


def test_build_messages_shape():
    messages = build_messages(ITEM, "train")
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": build_prompt_text(ITEM, "train")},
            ],
        }
    ]
    no_image = build_messages(ITEM, "hint_aware", hint=HINT, with_image=False)
    assert no_image[0]["content"] == [
        {"type": "text", "text": build_prompt_text(ITEM, "hint_aware", hint=HINT)}
    ]


def test_missing_gold_is_an_error_naming_the_question():
    with pytest.raises(ValueError, match=r"'q2'.*gold_letter"):
        build_prompt_text(NO_GOLD, "hint_request")
    with pytest.raises(ValueError, match=r"'q2'.*gold_letter"):
        build_prompt_text(NO_GOLD, "hint_aware", hint="x")  # v1 shows the answer


@pytest.mark.parametrize("hint", [None, "", "   "])
def test_missing_hint_is_an_error(hint):
    with pytest.raises(ValueError, match=r"'q1'.*non-empty hint"):
        build_prompt_text(ITEM, "hint_aware", hint=hint)


def test_misplaced_or_tagged_hint_is_an_error():
    with pytest.raises(ValueError, match="hint_aware"):
        build_prompt_text(ITEM, "train", hint=HINT)
    with pytest.raises(ValueError, match="parse_hint"):
        build_prompt_text(ITEM, "hint_aware", hint="<hint>x</hint>")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "rollout"}, "prompt kind"),
        ({"kind": "train", "hint_version": "v2"}, "hint_version"),
        ({"kind": "eval", "eval_prompt": "paper"}, "eval_prompt"),
    ],
)
def test_unknown_settings_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_prompt_text(ITEM, **kwargs)


def test_prompt_item_from_row_and_validation():
    row = {
        "question_id": 7,
        "question": "Which organ?",
        "options": ["Liver", "Kidney", "Lung"],
        "gold_letter": float("nan"),  # a missing value read through pandas
        "modality": "CT",
    }
    item = PromptItem.from_row(row)
    assert item == PromptItem("7", "Which organ?", ("Liver", "Kidney", "Lung"), None)
    assert item.n_options == 3
    assert PromptItem.from_row({**row, "gold_letter": "C"}).gold_text == "Lung"
    with pytest.raises(ValueError, match="lacks"):
        PromptItem.from_row({"question_id": "x", "question": "q"})
    with pytest.raises(ValueError, match=r"'7'.*gold_letter 'D'"):
        PromptItem.from_row({**row, "gold_letter": "D"})
    with pytest.raises(ValueError, match="gold_letter 'b'"):
        PromptItem.from_row({**row, "gold_letter": "b"})
    with pytest.raises(ValueError, match="gold_letter 'AB'"):
        PromptItem.from_row({**row, "gold_letter": "AB"})
    with pytest.raises(ValueError, match="1 options"):
        PromptItem.from_row({**row, "options": ["Liver"]})
    with pytest.raises(ValueError, match="7 options"):
        PromptItem.from_row({**row, "options": list("abcdefg")})
    with pytest.raises(ValueError, match="option B is empty"):
        PromptItem.from_row({**row, "options": ["Liver", " "]})
    with pytest.raises(ValueError, match="question text is empty"):
        PromptItem.from_row({**row, "question": ""})


def test_six_options_use_letters_a_to_f():
    item = PromptItem("q6", "Pick", tuple("uvwxyz"), "F")
    assert render_question(item).splitlines()[-1] == "F. z"
    assert hint_request_answer(item) == "F. z"
    assert len(LETTERS) == 6


def test_vocabulary_corpus_covers_every_prompt():
    corpus = vocabulary_corpus()
    assert all(isinstance(text, str) and text for text in corpus)
    joined = "\n".join(corpus)
    assert "{hint}" not in joined and "{answer}" not in joined
    for tag in ("<think>", "</think>", "<answer>", "</answer>", "<hint>", "</hint>"):
        assert tag in corpus
    for sentence in THINKING_SENTENCES + NON_THINKING_SENTENCES + HINT_REQUEST_SENTENCES[:3]:
        assert sentence in joined
    assert "Question: " in corpus and "Options:" in corpus


# --- parse_hint --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<hint>Look at the fluid.</hint>", HintParse("Look at the fluid.", True, None)),
        (
            "Sure.\n<hint>\n  Look at the fluid. \n</hint>\nDone",
            HintParse("Look at the fluid.", True, None),
        ),
        (
            "<think>I could write <hint>x</hint> first.</think><hint>Look at the fluid.</hint>",
            HintParse("Look at the fluid.", True, None),
        ),
        ("Look at the fluid.", HintParse(None, False, "no_hint_tag")),
        ("<hint></hint>", HintParse(None, False, "empty_hint")),
        ("<hint> \n </hint>", HintParse(None, False, "empty_hint")),
        ("<hint>a</hint><hint>b</hint>", HintParse(None, False, "multiple_hint_tags")),
        ("<hint>a <hint>b</hint>", HintParse(None, False, "multiple_hint_tags")),
        ("<hint>Look at the fluid.", HintParse(None, False, "unclosed_tag")),
        ("Look at the fluid.</hint>", HintParse(None, False, "misordered_tags")),
        ("</hint>Look<hint>", HintParse(None, False, "misordered_tags")),
        ("<Hint>Look</Hint>", HintParse(None, False, "no_hint_tag")),
    ],
)
def test_parse_hint(raw, expected):
    assert parse_hint(raw) == expected


# --- mentions_hint_or_answer -------------------------------------------------------------------

LEAK_HINT = "Water appears bright on this sequence because of the long echo time used here."


def _leaks(reasoning: str, answer: str = "B") -> bool:
    text = f"<think>{reasoning}</think><answer>{answer}</answer>"
    return mentions_hint_or_answer(text, hint=LEAK_HINT, gold_letter="B", gold_text="MRI")


@pytest.mark.parametrize(
    ("reasoning", "leaks"),
    [
        ("The fluid is bright and the bone is dark, typical of T2 weighting.", False),
        ("The hint says fluid is bright, so this is MRI.", True),
        ("Using the HINTS given, it is MRI.", True),
        ("The ground truth is B, so I will reason towards it.", True),
        ("Since the ground-truth label is MRI...", True),
        ("The given answer is MRI, which matches the bright fluid.", True),
        ("I see <hint> tags in the prompt.", True),
        # a span of 8+ hint words repeated verbatim (punctuation and case ignored)
        ("Water appears bright on THIS sequence, because of the long echo time.", True),
        # only 7 consecutive hint words
        ("Water appears bright on this sequence because. Bone is dark.", False),
        # the answer announced before any reasoning
        ("The answer is MRI. The fluid is bright.", True),
        ("The correct option is (B) because fluid is bright.", True),
        ("Answer should be: B. Fluid is bright.", True),
        ("The correct answer is mri, let me justify.", True),
        # a conclusion after a long reasoning is not a leak
        (
            "The image shows soft tissue contrast with bright cerebrospinal fluid and dark "
            "cortical bone, no beam hardening artifacts, no acoustic shadowing, and a slice "
            "orientation typical of a brain protocol. Therefore the answer is MRI.",
            False,
        ),
        # a wrong option announced is not a leak of the gold answer
        ("The answer is CT, as bone is bright.", False),
        # lowercase "a" is an article, not the letter; gold is B anyway
        ("The answer is a scan with bright fluid: B fits.", False),
    ],
)
def test_mentions_hint_or_answer(reasoning, leaks):
    assert _leaks(reasoning) is leaks


def test_leak_detector_ignores_the_final_answer_block_only():
    clean = "<think>Bright fluid and dark bone.</think><answer>B</answer>"
    assert not mentions_hint_or_answer(clean, hint=None, gold_letter="B", gold_text="MRI")
    # text after the final answer block still counts as reasoning
    trailing = clean + " (the hint helped)"
    assert mentions_hint_or_answer(trailing, hint=None, gold_letter="B", gold_text="MRI")
    # with no answer block the whole text is reasoning
    assert mentions_hint_or_answer("The hint helped.", hint=None, gold_letter="B", gold_text="MRI")


def test_leak_span_length_is_configurable():
    text = "<think>Water appears bright on this sequence.</think><answer>B</answer>"
    kwargs = {"hint": LEAK_HINT, "gold_letter": "B", "gold_text": "MRI"}
    assert not mentions_hint_or_answer(text, **kwargs)
    assert mentions_hint_or_answer(text, min_span_words=5, **kwargs)
    with pytest.raises(ValueError, match="positive"):
        mentions_hint_or_answer(text, min_span_words=0, **kwargs)


def test_leak_lead_window_is_configurable():
    text = "<think>Fluid is bright. Bone is dark. So the answer is MRI.</think><answer>B</answer>"
    kwargs = {"hint": None, "gold_letter": "B", "gold_text": "MRI"}
    assert mentions_hint_or_answer(text, **kwargs)
    assert not mentions_hint_or_answer(text, lead_words=5, **kwargs)
