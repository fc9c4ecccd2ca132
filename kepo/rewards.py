"""Rule-based rewards (Appendix B): total = format (0/1) + accuracy (0/1), and the parse record.

Texts are completions decoded without special tokens (no <|im_end|>). Tags are matched
exactly: lowercase, no spaces or attributes inside the angle brackets.

Format reward
-------------
- thinking: the output, surrounding whitespace stripped, is exactly ``<think>…</think>``,
  optional whitespace, ``<answer>…</answer>``; each of the four tags occurs once.
- non-thinking: the stripped output is exactly ``<answer>…</answer>``, each answer tag once, and
  no think tag anywhere.
It checks structure only: an empty think block or an unparsable answer can still be
well-formatted (the accuracy reward judges the content), as in the authors' implementation.

Accuracy reward
---------------
1 when `parse_answer` extracts a letter equal to the gold letter, else 0. It is independent of
the format reward: an answer tag that parses counts even with text around it.

`parse_answer` accepts exactly one ``<answer>…</answer>`` whose content, stripped, is one
letter, optionally "(B)", "B." or "B)". Decisions ("…" is a well-formed think block):

| output (thinking mode)                             | format | answer | reason               |
| -------------------------------------------------- | ------ | ------ | -------------------- |
| `<think>…</think><answer>B</answer>`               | 1      | B      | —                    |
| `<think>…</think>` newlines `<answer> b </answer>` | 1      | B      | — (case, whitespace) |
| `… <answer>(B)</answer>`, `B.`, `B)`, `(B).`       | 1      | B      | —                    |
| `<think></think><answer>B</answer>` (empty think)  | 1      | B      | —                    |
| `… <answer>B. Pneumonia</answer>`                  | 1      | None   | not_a_letter         |
| `… <answer>Pneumonia</answer>` (option text)       | 1      | None   | not_a_letter         |
| `… <answer>B or C</answer>`, `BC`                  | 1      | None   | not_a_letter         |
| `… <answer></answer>`, whitespace only             | 1      | None   | empty_answer         |
| no `<answer>` or `</answer>` anywhere              | 0      | None   | no_answer_tag        |
| `… <answer>B` (never closed)                       | 0      | None   | unclosed_tag         |
| `… B</answer>`, `… </answer>B<answer>`             | 0      | None   | misordered_tags      |
| two `<answer>` or two `</answer>`                  | 0      | None   | multiple_answer_tags |
| `… <answer>E</answer>` with 4 options              | 1      | None   | letter_out_of_range  |
| `… <answer>G</answer>` (any number of options)     | 1      | None   | letter_out_of_range  |
| `Sure! <think>…</think><answer>B</answer>`         | 0      | B      | — (accuracy counts)  |
| `<answer>B</answer>` alone (thinking expected)     | 0      | B      | —                    |
| `<Answer>B</Answer>` (tag case differs)            | 0      | None   | no_answer_tag        |

Why these choices:
- Two answer tags are rejected, not read first-match as the authors' regex
  ``<answer>\\s*(\\w+)\\s*</answer>`` does: taking the first would reward hedging
  ("<answer>A</answer> or <answer>B</answer>") and would disagree with the format reward.
- The option's text, or a letter followed by text, is not accepted: the prompt asks for a
  single letter, the text may contradict the letter, and the authors' extractor scores both
  0 as well. Decoration around a lone letter ("(B)", "B.", "B)") carries no such ambiguity,
  so it is accepted (the authors' `\\w+` scores it 0: we are more lenient there).
- Letters beyond the options (or beyond F when the number of options is not given) are out of
  range rather than merely wrong, so the parse record separates them from wrong choices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kepo.prompts import LETTERS

_THINKING_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_NON_THINKING_FORMAT = re.compile(r"<answer>.*?</answer>", re.DOTALL)
# A lone letter, optionally "(B)", "(B).", "B." or "B)".
_LETTER = re.compile(r"\(([A-Za-z])\)\.?|([A-Za-z])[.)]?")


@dataclass(frozen=True)
class AnswerParse:
    """The letter extracted from a completion, or why none could be."""

    answer: str | None
    """An uppercase letter, or None."""
    reason: str | None
    """None when a letter was extracted; else no_answer_tag, multiple_answer_tags,
    unclosed_tag, misordered_tags, empty_answer, not_a_letter or letter_out_of_range."""


@dataclass(frozen=True)
class RewardRecord:
    """Rewards and parse record of one completion, as the rollout tables store them."""

    reward_format: float
    reward_accuracy: float
    reward_total: float
    """reward_format + reward_accuracy (Appendix B)."""
    parsed_answer: str | None
    parse_reason: str | None


def _check_n_options(n_options: int | None) -> str:
    """The letters allowed for this many options."""
    if n_options is None:
        return LETTERS
    if not 2 <= n_options <= len(LETTERS):
        raise ValueError(f"n_options={n_options}; a question has 2 to {len(LETTERS)} options")
    return LETTERS[:n_options]


def format_reward(text: str, *, thinking: bool) -> float:
    """1.0 when the whole output has the required tag structure, else 0.0."""
    stripped = text.strip()
    if stripped.count("<answer>") != 1 or stripped.count("</answer>") != 1:
        return 0.0
    think_tags = (stripped.count("<think>"), stripped.count("</think>"))
    if thinking:
        ok = think_tags == (1, 1) and _THINKING_FORMAT.fullmatch(stripped) is not None
    else:
        ok = think_tags == (0, 0) and _NON_THINKING_FORMAT.fullmatch(stripped) is not None
    return 1.0 if ok else 0.0


def parse_answer(text: str, n_options: int | None = None) -> AnswerParse:
    """The letter inside the one <answer>…</answer> of `text` (rules in the module docstring)."""
    allowed = _check_n_options(n_options)
    opens, closes = text.count("<answer>"), text.count("</answer>")
    if opens == 0 and closes == 0:
        return AnswerParse(None, "no_answer_tag")
    if opens > 1 or closes > 1:
        return AnswerParse(None, "multiple_answer_tags")
    if closes == 0:
        return AnswerParse(None, "unclosed_tag")
    start, end = text.find("<answer>"), text.find("</answer>")
    if opens == 0 or end < start:
        return AnswerParse(None, "misordered_tags")
    content = text[start + len("<answer>") : end].strip()
    if not content:
        return AnswerParse(None, "empty_answer")
    match = _LETTER.fullmatch(content)
    if match is None:
        return AnswerParse(None, "not_a_letter")
    letter = (match.group(1) or match.group(2)).upper()
    if letter not in allowed:
        return AnswerParse(None, "letter_out_of_range")
    return AnswerParse(letter, None)


def _check_gold(gold_letter: str, n_options: int | None) -> None:
    allowed = _check_n_options(n_options)
    if not isinstance(gold_letter, str) or len(gold_letter) != 1 or gold_letter not in allowed:
        raise ValueError(
            f"gold_letter {gold_letter!r} is not one of {', '.join(allowed)}; pass the "
            "uppercase letter of the correct option"
        )


def accuracy_reward(text: str, gold_letter: str, n_options: int | None = None) -> float:
    """1.0 when the extracted letter equals `gold_letter`, else 0.0."""
    _check_gold(gold_letter, n_options)
    return 1.0 if parse_answer(text, n_options).answer == gold_letter else 0.0


def score_completion(
    text: str, gold_letter: str, *, thinking: bool, n_options: int | None = None
) -> RewardRecord:
    """Format and accuracy rewards plus the parse record of one completion."""
    _check_gold(gold_letter, n_options)
    parsed = parse_answer(text, n_options)
    reward_format = format_reward(text, thinking=thinking)
    reward_accuracy = 1.0 if parsed.answer == gold_letter else 0.0
    return RewardRecord(
        reward_format=reward_format,
        reward_accuracy=reward_accuracy,
        reward_total=reward_format + reward_accuracy,
        parsed_answer=parsed.answer,
        parse_reason=parsed.reason,
    )
