"""The one generation interface every backend implements, and the conventions it fixes.

Log-prob convention
-------------------
`Completion.logprobs[t]` and `TokenScores.logprobs[t]` are POLICY log-probs:
`log_softmax(raw logits)[token]` at temperature 1, before any temperature, top-p, top-k or
token suppression. That is what the trainer's importance ratio and KL terms need, whatever
decoding settings produced the sample. For the Hugging Face backend in fp32 the two agree
within 1e-5 (tests/test_generation.py).

Completion tokens
-----------------
`Completion.token_ids` are the generated tokens up to and including the first stop token
(`<|im_end|>`, `<|endoftext|>` or the model's eos): the trainer learns to stop. Nothing after it
(padding) is kept. `finish_reason` is "stop" when a stop token was generated and "length" when
`max_new_tokens` ran out first. `text` is decoded with `skip_special_tokens=True`, so it keeps
the non-special tags (<think>, <answer>, ...) and drops the stop token.

Seeds
-----
Each request carries its own `seed`. Sample `i` of a request is drawn from a generator seeded
with `sample_seed(request.seed, i)`, so a request's samples do not depend on which other
requests share its batch, on the batch size, or on how the work was sharded across workers
(on the same device type and software; the HF and vLLM backends draw different streams).
Callers derive request seeds from (run seed, iteration, prompt id, purpose), see `derive_seed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from PIL import Image

from kepo.seeds import derive_seed

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationRequest:
    """One prompt: chat messages (kepo.prompts.build_messages), its image, its seed."""

    request_id: str
    messages: list[dict]
    image: Image.Image | None
    seed: int


@dataclass
class SamplingParams:
    """Decoding settings shared by all backends; temperature 0 = greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    """Stop tokens are suppressed before this many tokens (benchmarks force a length with it)."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(
                f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"SamplingParams.min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    """One sampled completion of one request."""

    request_id: str
    sample_idx: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


@dataclass
class TokenScores:
    """Per-token log-probs of given completion tokens (+ the top-k alternatives when asked)."""

    logprobs: list[float]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


@runtime_checkable
class GenerationBackend(Protocol):
    """What the rollout and evaluation stages need from an inference engine."""

    name: str

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingParams,
        *,
        desc: str = "generate",
    ) -> list[list[Completion]]:
        """Per request (in order), its `sampling.n` completions (sample_idx 0..n-1)."""
        ...

    def score(
        self,
        requests: Sequence[GenerationRequest],
        completion_ids: Sequence[Sequence[int]],
        *,
        top_k: int = 0,
        desc: str = "score",
    ) -> list[TokenScores]:
        """Row i: log-probs of completion_ids[i] teacher-forced after requests[i]'s prompt."""
        ...

    def load_policy(self, path: str | Path) -> None:
        """Switch to another checkpoint folder of the same architecture and tokenizer."""
        ...

    def close(self) -> None:
        """Release the model and its device memory."""
        ...


# ------------------------------------------------------------------------------ seeds
def sample_seed(request_seed: int, sample_idx: int) -> int:
    """The generator seed of sample `sample_idx` of a request."""
    return derive_seed("sample", request_seed, sample_idx)


def validate_requests(requests: Sequence[GenerationRequest]) -> None:
    """Clear errors for malformed requests before any model work."""
    seen: set[str] = set()
    for request in requests:
        if request.request_id in seen:
            raise ValueError(
                f"request_id {request.request_id!r} appears twice; request ids must be unique per call"
            )
        seen.add(request.request_id)
        if not isinstance(request.messages, list) or not request.messages:
            raise ValueError(
                f"request {request.request_id!r}: messages must be a non-empty list of chat messages"
            )
