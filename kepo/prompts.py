"""Prompt templates (the paper's Appendix C) and the one function that renders chat messages.

Every backend (Hugging Face, vLLM), the rollout, training and evaluation call `build_messages`,
so the same item always renders the same prompt.

Prompt layout
-------------
A prompt is the question block, a blank line, then the instruction::

    Question: What imaging modality is shown?
    Options:
    A. CT
    B. MRI

    Your task:
    1. Think through the question step by step, ...

`render_question` writes the question block: "Question: ", the question text, then "Options:"
and one line per option, "<letter>. <option text>" (letters A..F, 2 to 6 options). The image
comes before the text in the chat message; there is no system message.

Templates
---------
- Thinking / non-thinking VQA and the teacher hint request are Appendix C verbatim, with the
  paper's inline-code backticks dropped (they are typesetting, not prompt text: the authors'
  evaluation prompt writes the tags bare) and one numbered step per line, as printed.
- Hint-aware, thinking, "v1" (hint + ground-truth answer, the default) is Appendix C verbatim.
  "v0" (hint only) is the same text with the answer removed: step 1 drops "and the ground truth
  answer provided in <answer>...</answer> tags", step 2 says "do not explicitly mention the hint",
  and the closing line is "The hint is <hint>{hint}</hint>."
- Hint-aware, non-thinking (not in the paper; derived): step 1 of the hint-aware prompt, then
  the two steps of the non-thinking prompt, then the same closing line as the thinking variant.
  There is no reasoning to keep free of the hint, so the "do not mention" clause has no step
  to attach to and is dropped.
- Evaluation: "training" (default) renders the training prompt; "authors" renders the authors'
  evaluation prompt verbatim, "{question block} Think through the question step by step in
  <think>...</think> tags. Then provide ...". It exists only for thinking mode; asking for it
  with `thinking=False` is an error rather than an invented prompt.
- The answer filled into the hint request and into the v1 hint-aware prompt is
  `hint_request_answer(item)`: "<letter>. <option text>", e.g. "B. MRI", so the teacher sees both
  the letter the student must output and the finding it stands for.

`parse_hint` extracts the teacher's hint; `mentions_hint_or_answer` flags hint-aware outputs
whose reasoning leaks the hint or the given answer (rules and limits in its docstring).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

LETTERS = "ABCDEF"

PromptKind = Literal["train", "hint_request", "hint_aware", "eval"]
HintVersion = Literal["v0", "v1"]
EvalPrompt = Literal["training", "authors"]

_KINDS = ("train", "hint_request", "hint_aware", "eval")
_HINT_VERSIONS = ("v0", "v1")
_EVAL_PROMPTS = ("training", "authors")

# --- Appendix C ------------------------------------------------------------------------------

THINKING_INSTRUCTION = (
    "Your task:\n"
    "1. Think through the question step by step, enclose your reasoning process in "
    "<think>...</think> tags.\n"
    "2. Then provide the correct single-letter choice (A, B, C, D, ...) inside "
    "<answer>...</answer> tags.\n"
    "3. No extra information or text outside of these tags."
)

NON_THINKING_INSTRUCTION = (
    "Your task:\n"
    "1. Provide the correct single-letter choice (A, B, C, D, ...) inside "
    "<answer>...</answer> tags.\n"
    "2. No extra information or text outside of this tag."
)

HINT_REQUEST_INSTRUCTION = (
    "Your task:\n"
    "1. You will get a correct answer for the question.\n"
    "2. Please provide a hint for the question based on the correct answer, inside "
    "<hint>...</hint> tags.\n"
    "3. No extra information or text outside of these tags.\n"
    "\n"
    "The ground truth answer is {answer}."
)

HINT_AWARE_THINKING_V1 = (
    "Your task:\n"
    "1. Read the hint provided in <hint>...</hint> tags and the ground truth answer provided in "
    "<answer>...</answer> tags.\n"
    "2. Think through the question step by step but do not explicitly mention the hint or the "
    "ground truth answer, enclose your reasoning process in <think>...</think> tags.\n"
    "3. Then provide the correct single-letter choice (A, B, C, D, ...) inside "
    "<answer>...</answer> tags.\n"
    "4. No extra information or text outside of these tags.\n"
    "\n"
    "The hint is <hint>{hint}</hint> and the ground truth answer is <answer>{answer}</answer>."
)

# --- derived variants (see the module docstring) -----------------------------------------------

HINT_AWARE_THINKING_V0 = (
    "Your task:\n"
    "1. Read the hint provided in <hint>...</hint> tags.\n"
    "2. Think through the question step by step but do not explicitly mention the hint, "
    "enclose your reasoning process in <think>...</think> tags.\n"
    "3. Then provide the correct single-letter choice (A, B, C, D, ...) inside "
    "<answer>...</answer> tags.\n"
    "4. No extra information or text outside of these tags.\n"
    "\n"
    "The hint is <hint>{hint}</hint>."
)

HINT_AWARE_NON_THINKING_V1 = (
    "Your task:\n"
    "1. Read the hint provided in <hint>...</hint> tags and the ground truth answer provided in "
    "<answer>...</answer> tags.\n"
    "2. Provide the correct single-letter choice (A, B, C, D, ...) inside "
    "<answer>...</answer> tags.\n"
    "3. No extra information or text outside of this tag.\n"
    "\n"
    "The hint is <hint>{hint}</hint> and the ground truth answer is <answer>{answer}</answer>."
)

HINT_AWARE_NON_THINKING_V0 = (
    "Your task:\n"
    "1. Read the hint provided in <hint>...</hint> tags.\n"
    "2. Provide the correct single-letter choice (A, B, C, D, ...) inside "
    "<answer>...</answer> tags.\n"
    "3. No extra information or text outside of this tag.\n"
    "\n"
    "The hint is <hint>{hint}</hint>."
)

HINT_AWARE_TEMPLATES: dict[tuple[bool, str], str] = {
    (True, "v1"): HINT_AWARE_THINKING_V1,
    (True, "v0"): HINT_AWARE_THINKING_V0,
    (False, "v1"): HINT_AWARE_NON_THINKING_V1,
    (False, "v0"): HINT_AWARE_NON_THINKING_V0,
}

# The authors' evaluation prompt (thinking only), appended to the question block after a space.
AUTHORS_EVAL_SUFFIX = (
    "Think through the question step by step in <think>...</think> tags. Then provide the "
    "correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags."
)


# --- items -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptItem:
    """What every prompt needs from a curated question row."""

    question_id: str
    question: str
    options: tuple[str, ...]
    """Option texts in order; option i has letter LETTERS[i]; 2 to 6 options."""
    gold_letter: str | None = None
    """The correct option's letter (uppercase); None where the gold answer is not needed."""

    def __post_init__(self) -> None:
        # Accept any sequence (lists from Arrow/DuckDB) but store a tuple so the item stays hashable.
        if not isinstance(self.options, tuple):
            object.__setattr__(self, "options", tuple(self.options))
        where = f"question {self.question_id!r}"
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"{where}: the question text is empty; fix the curated row")
        if not 2 <= len(self.options) <= len(LETTERS):
            raise ValueError(
                f"{where}: has {len(self.options)} options; prompts support 2 to "
                f"{len(LETTERS)} (letters {LETTERS})"
            )
        for letter, text in zip(LETTERS, self.options, strict=False):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: option {letter} is empty; fix the curated row")
        allowed = list(LETTERS[: len(self.options)])  # a list, so "" and "AB" are not members
        if self.gold_letter is not None and self.gold_letter not in allowed:
            raise ValueError(
                f"{where}: gold_letter {self.gold_letter!r} is not one of "
                f"{', '.join(LETTERS[: len(self.options)])} (uppercase letter of an option)"
            )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PromptItem:
        """Build from a `questions` row (keys question_id, question, options, gold_letter)."""
        missing = [key for key in ("question_id", "question", "options") if key not in row]
        if missing:
            raise ValueError(
                f"row {row.get('question_id', '<no question_id>')!r} lacks {missing}; a "
                "questions row needs question_id, question, options (and gold_letter)"
            )
        options = row["options"]
        if options is None or isinstance(options, str):
            raise ValueError(f"question {row['question_id']!r}: options must be a list of texts")
        gold_letter = row.get("gold_letter")
        if isinstance(gold_letter, float) and gold_letter != gold_letter:
            gold_letter = None  # a missing value read through pandas arrives as NaN
        return cls(
            question_id=str(row["question_id"]),
            question=row["question"],
            options=tuple(options),
            gold_letter=gold_letter,
        )

    @property
    def n_options(self) -> int:
        return len(self.options)

    @property
    def gold_text(self) -> str:
        """The correct option's text; needs gold_letter."""
        return self.options[LETTERS.index(_require_gold(self))]


def _require_gold(item: PromptItem) -> str:
    if item.gold_letter is None:
        raise ValueError(
            f"question {item.question_id!r} has no gold_letter; the hint request and the v1 "
            "hint-aware prompt need the correct answer (use a curated row with gold_letter)"
        )
    return item.gold_letter


def render_question(item: PromptItem) -> str:
    """The question block: "Question: ...", "Options:", then "A. ...", "B. ...", one per line."""
    lines = [f"Question: {item.question.strip()}", "Options:"]
    for letter, text in zip(LETTERS, item.options, strict=False):  # options <= len(LETTERS)
        lines.append(f"{letter}. {text.strip()}")
    return "\n".join(lines)


def hint_request_answer(item: PromptItem) -> str:
    """The answer shown to the teacher (and in the v1 hint-aware prompt): "<letter>. <text>"."""
    return f"{_require_gold(item)}. {item.gold_text.strip()}"


def build_prompt_text(
    item: PromptItem,
    kind: PromptKind,
    *,
    thinking: bool = True,
    hint: str | None = None,
    hint_version: HintVersion = "v1",
    eval_prompt: EvalPrompt = "training",
) -> str:
    """The text of the user turn for one item.

    kind: "train" (the rollout/training prompt), "hint_request" (the teacher's prompt; needs
    gold_letter; `thinking` does not apply), "hint_aware" (needs `hint`, and gold_letter for
    "v1"), "eval" (the training prompt, or the authors' evaluation prompt).
    `hint_version` applies to "hint_aware" only and `eval_prompt` to "eval" only.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; choose one of {_KINDS}")
    if hint_version not in _HINT_VERSIONS:
        raise ValueError(f"unknown hint_version {hint_version!r}; choose 'v0' or 'v1'")
    if eval_prompt not in _EVAL_PROMPTS:
        raise ValueError(f"unknown eval_prompt {eval_prompt!r}; choose 'training' or 'authors'")
    if hint is not None and kind != "hint_aware":
        raise ValueError(
            f"question {item.question_id!r}: a hint was passed for kind={kind!r}; "
            "hints belong in kind='hint_aware' prompts only"
        )

    question = render_question(item)
    if kind == "eval" and eval_prompt == "authors":
        if not thinking:
            raise ValueError(
                "the authors' evaluation prompt exists for thinking mode only; use "
                "eval_prompt='training' for non-thinking evaluation"
            )
        return f"{question} {AUTHORS_EVAL_SUFFIX}"
    if kind in ("train", "eval"):
        instruction = THINKING_INSTRUCTION if thinking else NON_THINKING_INSTRUCTION
    elif kind == "hint_request":
        instruction = HINT_REQUEST_INSTRUCTION.format(answer=hint_request_answer(item))
    else:
        instruction = _hint_aware_instruction(item, hint, thinking, hint_version)
    return f"{question}\n\n{instruction}"


def _hint_aware_instruction(
    item: PromptItem, hint: str | None, thinking: bool, hint_version: str
) -> str:
    if hint is None or not hint.strip():
        raise ValueError(
            f"question {item.question_id!r}: kind='hint_aware' needs a non-empty hint "
            "(the text parse_hint extracted from the teacher's output)"
        )
    if "<hint>" in hint or "</hint>" in hint:
        raise ValueError(
            f"question {item.question_id!r}: the hint contains <hint> tags; pass the text "
            "inside the tags (parse_hint(...).hint_text)"
        )
    template = HINT_AWARE_TEMPLATES[(thinking, hint_version)]
    # str.format only reads braces in the template, so braces inside the hint are safe.
    if hint_version == "v1":
        return template.format(hint=hint.strip(), answer=hint_request_answer(item))
    return template.format(hint=hint.strip())


def build_messages(
    item: PromptItem,
    kind: PromptKind,
    *,
    thinking: bool = True,
    hint: str | None = None,
    hint_version: HintVersion = "v1",
    eval_prompt: EvalPrompt = "training",
    with_image: bool = True,
) -> list[dict]:
    """Hugging Face chat messages: one user turn, the image placeholder first, then the text."""
    text = build_prompt_text(
        item,
        kind,
        thinking=thinking,
        hint=hint,
        hint_version=hint_version,
        eval_prompt=eval_prompt,
    )
    content: list[dict] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def vocabulary_corpus() -> list[str]:
    """Every fixed string the prompts contain (to train a tiny tokenizer on)."""
    templates = [
        THINKING_INSTRUCTION,
        NON_THINKING_INSTRUCTION,
        HINT_REQUEST_INSTRUCTION,
        *HINT_AWARE_TEMPLATES.values(),
        AUTHORS_EVAL_SUFFIX,
    ]
    placeholders = re.compile(r"\{(?:hint|answer)\}")
    corpus = [placeholders.sub("", template) for template in templates]
    corpus += ["Question: ", "Options:", *(f"{letter}. " for letter in LETTERS)]
    corpus += ["<think>", "</think>", "<answer>", "</answer>", "<hint>", "</hint>"]
    return corpus


# --- teacher hints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HintParse:
    """The hint extracted from a teacher output, or why none could be."""

    hint_text: str | None
    parse_ok: bool
    reason: str | None
    """None when parse_ok; else no_hint_tag, multiple_hint_tags, unclosed_tag,
    misordered_tags or empty_hint."""


def parse_hint(raw_output: str) -> HintParse:
    """Extract the text inside exactly one <hint>...</hint> from a teacher output.

    Text outside the tags is tolerated (teachers often add a preamble). A thinking teacher's
    reasoning is skipped: only the text after the last </think> is parsed, since it may quote
    the tags while planning. The hint is returned with surrounding whitespace stripped.
    """
    text = raw_output.rsplit("</think>", 1)[-1]
    opens, closes = text.count("<hint>"), text.count("</hint>")
    if opens == 0 and closes == 0:
        return HintParse(None, False, "no_hint_tag")
    if opens > 1 or closes > 1:
        return HintParse(None, False, "multiple_hint_tags")
    if closes == 0:
        return HintParse(None, False, "unclosed_tag")
    start = text.find("<hint>")
    end = text.find("</hint>")
    if opens == 0 or end < start:
        return HintParse(None, False, "misordered_tags")
    hint_text = text[start + len("<hint>") : end].strip()
    if not hint_text:
        return HintParse(None, False, "empty_hint")
    return HintParse(hint_text, True, None)


# --- leak detection for hint-aware outputs -----------------------------------------------------

_MENTION = re.compile(
    r"\bhints?\b|\bground[\s-]+truth\b|\bgiven\s+answer\b|\bprovided\s+answer\b"
    r"|\banswer\s+(?:given|provided)\b",
    re.IGNORECASE,
)
# "the (correct|final|right) answer/option/choice is|should be|must be|would be[:]"
_ANNOUNCE = (
    r"(?i:\b(?:correct\s+|right\s+|final\s+)?(?:answer|option|choice)\s+"
    r"(?:is|should\s+be|must\s+be|would\s+be)\s*:?\s*)"
)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _contains_span(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def _reasoning_part(completion_text: str) -> str:
    """The completion without its final <answer>...</answer> block (the whole text if none)."""
    start = completion_text.rfind("<answer>")
    end = completion_text.find("</answer>", start + 1) if start >= 0 else -1
    if start < 0 or end < 0:
        return completion_text
    return completion_text[:start] + completion_text[end + len("</answer>") :]


def mentions_hint_or_answer(
    completion_text: str,
    *,
    hint: str | None,
    gold_letter: str,
    gold_text: str,
    min_span_words: int = 8,
    lead_words: int = 30,
) -> bool:
    """Whether a hint-aware output's reasoning leaks the hint or the given answer.

    The reasoning is the completion without its final <answer>...</answer> block. It is
    flagged when any of these holds:

    1. it mentions the hint or a given answer: the word "hint"/"hints" (a literal <hint> tag
       counts), "ground truth"/"ground-truth", "given answer", "provided answer",
       "answer given", "answer provided" (case-insensitive);
    2. it repeats `min_span_words` or more consecutive words of the hint verbatim (words are
       runs of letters/digits, compared lowercase, so punctuation and spacing do not matter);
    3. within its first `lead_words` words, an announcement ("the answer is", "the correct
       option is", "answer should be:", ...) is followed by the gold option's text or by the
       gold letter (uppercase, optionally "(B)"/"B."): the answer stated before any reasoning,
       the signature of copying it. The same announcement at the end of a long reasoning is a
       conclusion, which every correct trajectory writes, and is not flagged.

    Limits: paraphrases ("I was told", "the solution says"), other languages, hints restated
    in other words or shorter than `min_span_words`, and announcements after the first
    `lead_words` words go unflagged; a legitimate "a hint of enhancement" is flagged, and so is
    a hint span that the question itself contains. It is an audit flag, not a proof.
    """
    if min_span_words < 1 or lead_words < 1:
        raise ValueError("min_span_words and lead_words must be positive")
    reasoning = _reasoning_part(completion_text)

    if _MENTION.search(reasoning):
        return True

    if hint:
        hint_words = _words(hint)
        reasoning_words = _words(reasoning)
        for i in range(len(hint_words) - min_span_words + 1):
            if _contains_span(reasoning_words, hint_words[i : i + min_span_words]):
                return True

    lead = " ".join(reasoning.split()[:lead_words])
    if re.search(_ANNOUNCE + r"\(?" + re.escape(gold_letter) + r"\b", lead):
        return True
    gold_text_words = gold_text.split()
    if not gold_text_words:
        return False
    gold_text_pattern = r"\s+".join(re.escape(word) for word in gold_text_words)
    return re.search(_ANNOUNCE + r"(?i:" + gold_text_pattern + r")(?!\w)", lead) is not None
