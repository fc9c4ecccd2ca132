"""A scripted `GenerationBackend` for tests: predetermined texts, deterministic fake log-probs.

`ScriptedBackend(respond)` answers every generate request by calling
`respond(kind, request, sample_idx)` -> text, where kind is "train", "hint_request" or
"hint_aware" (read from the prompt text). Token ids come from a real tokenizer when one is
given (so a real model can score them), else from a character code. Log-probs are a
deterministic function of (prompt text, position, token), the same in `generate` and in `score`,
as a real backend's are: a completion scored under its generation prompt returns its sampled
log-probs, and under another prompt returns different numbers.

Every call is recorded in `calls` (method, desc, request ids, n) so tests can check batching.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kepo.generation.base import Completion, GenerationRequest, SamplingParams, TokenScores

Responder = Callable[[str, GenerationRequest, int], str]


def prompt_text(request: GenerationRequest) -> str:
    parts = request.messages[-1]["content"]
    return "".join(p.get("text", "") for p in parts if p.get("type") == "text")


def prompt_kind(request: GenerationRequest) -> str:
    text = prompt_text(request)
    if "Please provide a hint" in text:
        return "hint_request"
    if "The hint is <hint>" in text:
        return "hint_aware"
    return "train"


def fake_logprob(prompt: str, position: int, token: int) -> float:
    digest = hashlib.sha256(f"{prompt}\x1f{position}\x1f{token}".encode()).digest()
    return -(0.05 + int.from_bytes(digest[:4], "big") / 2**32)


class ScriptedBackend:
    """GenerationBackend protocol over a responder function (see the module docstring)."""

    def __init__(
        self,
        respond: Responder,
        *,
        name: str = "scripted",
        tokenizer: Any = None,
        eos_id: int = 0,
        vocab_size: int = 1000,
        generate_delay_s: float = 0.0,
        started_marker: Path | None = None,
    ) -> None:
        self.name = name
        self.respond = respond
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.generate_delay_s = generate_delay_s
        self.started_marker = started_marker
        self.calls: list[tuple[str, str, list[str], int]] = []
        self.closed = False

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return [*self.tokenizer.encode(text, add_special_tokens=False), self.eos_id]
        return [1 + ord(c) % (self.vocab_size - 1) for c in text] + [self.eos_id]

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingParams,
        *,
        desc: str = "generate",
    ) -> list[list[Completion]]:
        self.calls.append(("generate", desc, [r.request_id for r in requests], sampling.n))
        if self.started_marker is not None:
            self.started_marker.write_text("generating")
        if self.generate_delay_s:
            time.sleep(self.generate_delay_s)
        out = []
        for request in requests:
            kind, prompt = prompt_kind(request), prompt_text(request)
            samples = []
            for i in range(sampling.n):
                text = self.respond(kind, request, i)
                ids = self.encode(text)
                samples.append(
                    Completion(
                        request_id=request.request_id,
                        sample_idx=i,
                        text=text,
                        token_ids=ids,
                        logprobs=[fake_logprob(prompt, t, tok) for t, tok in enumerate(ids)],
                        finish_reason="stop",
                    )
                )
            out.append(samples)
        return out

    def score(
        self,
        requests: Sequence[GenerationRequest],
        completion_ids: Sequence[Sequence[int]],
        *,
        top_k: int = 0,
        desc: str = "score",
    ) -> list[TokenScores]:
        self.calls.append(("score", desc, [r.request_id for r in requests], top_k))
        out = []
        for request, ids in zip(requests, completion_ids, strict=True):
            prompt = prompt_text(request)
            logprobs = [fake_logprob(prompt, t, tok) for t, tok in enumerate(ids)]
            if top_k:
                topk_ids = [[(tok + j) % self.vocab_size for j in range(top_k)] for tok in ids]
                topk_lp = [[lp - j for j in range(top_k)] for lp in logprobs]
                out.append(TokenScores(logprobs, topk_ids, topk_lp))
            else:
                out.append(TokenScores(logprobs))
        return out

    def load_policy(self, path: str | Path) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def generate_calls(self, desc_prefix: str = "") -> list[tuple[str, str, list[str], int]]:
        return [c for c in self.calls if c[0] == "generate" and c[1].startswith(desc_prefix)]


def answer(
    letter: str | None, *, thinking: bool = True, reasoning: str = "looking at the image"
) -> str:
    """A well-formatted completion answering `letter` (None: a malformed output)."""
    if letter is None:
        return "I am not sure."
    return (
        f"<think>{reasoning}</think><answer>{letter}</answer>"
        if thinking
        else f"<answer>{letter}</answer>"
    )


def wrong_letter(gold: str) -> str:
    return "B" if gold == "A" else "A"
