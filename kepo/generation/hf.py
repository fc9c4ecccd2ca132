"""Hugging Face `generate` backend: the embedded default, on CPU or one GPU.

Batching: every request is expanded into `sampling.n` rows (request-major: request 0 samples
0..n-1, then request 1, ...), and the rows are cut into chunks of `generation_batch_size`; each
chunk is ONE `model.generate` call with left-padded prompts. No Python loop runs per sample.
The n rows of a request share its prompt: each distinct request of a chunk is rendered,
tokenised and its image processed and encoded by the vision tower ONCE, and the rows get its
ids and its image features (`mm_encoder_outputs`, `kepo.models.image_features_for_rows`), the
same tensors as per-row inputs, so the tokens and log-probs do not change (a test compares).

Sampling: `generate` runs greedy (`do_sample=False`) and `SeededSampler`, a logits processor,
makes the choice. For each row it suppresses the vision control tokens (an untrained model
samples `<|image_pad|>`, which breaks the next forward pass) and any id past the tokenizer's
vocabulary, blocks the stop tokens before `min_new_tokens`, applies temperature, top-k and
top-p, and draws the token by inverse-CDF sampling: in the row's ids sorted by probability
(one stable sort serves top-k, top-p and the draw; on CPU `sort_descending_stable`, a SIMD
sort of int64 keys with the same result as torch's stable sort, several times faster), the
row's uniform u ∈ [0, 1) of this step picks the first id whose cumulative probability
(float64) exceeds u times the kept mass — an exact
sample of the truncated distribution. Each row's uniforms come from
its own `torch.Generator` (seeded with `sample_seed(request.seed, sample_idx)`), all
`max_new_tokens` of them drawn once when the chunk starts; every step is then one vectorised
draw over the batch with no Python loop per row, and since a row consumes only its own
generator, a row's tokens do not depend on the other rows of its batch.
`noise="gumbel_per_row"` keeps the previous sampler (samples of earlier versions, bit for bit):
Gumbel-max with one vocabulary-sized Exp(1) draw per row and step from the row's generator,
in a Python loop over the rows. The processor returns a one-hot score so `generate` picks
exactly the sampled token, and it records the raw-logit log-prob of the chosen token, so no
logits tensor of the whole generation (T x B x V) is ever kept. Greedy (temperature 0) draws
nothing.

The model folder's own generation defaults (e.g. sampling on, top-k 20, a repetition penalty)
are swapped out while `generate` runs (a config with only the stop and pad ids), so no other
logits processor touches the logits and the recorded log-probs are the raw ones. Each call also
checks that the tokens `generate` returned are the sampler's choices.

Scoring: teacher-forced forward passes over prompt + completion in chunks of
`scoring_batch_size`, using `kepo.models.build_sequence_batch` (the trainer's layout).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kepo.generation.base import (
    Completion,
    GenerationRequest,
    SamplingParams,
    TokenScores,
    sample_seed,
    validate_requests,
)
from kepo.models import (
    batch_to,
    build_prompt_inputs,
    build_sequence_batch,
    completion_logits,
    image_features_for_rows,
    image_patch_slices,
    input_device,
    load_model,
    load_policy,
    model_inputs,
    pad_token_id,
    resolve_device,
    resolve_dtype,
    stop_token_ids,
    vision_token_ids,
)
from kepo.progress import progress

log = logging.getLogger(__name__)

SamplingNoise = Literal["inverse_cdf", "gumbel_per_row"]


class SeededSampler:
    """Logits processor: per-row seeded sampling + raw log-prob bookkeeping.

    Called by `generate` once per step with the raw next-token logits (B, V); returns scores
    whose arg-max is the sampled token. `chosen_ids` / `chosen_logprobs` collect (B,) tensors
    per step. `noise`: "inverse_cdf" (one uniform per row and step, all of a row's uniforms
    drawn from its generator at the first step) or "gumbel_per_row" (the earlier sampler).
    """

    def __init__(
        self,
        sampling: SamplingParams,
        generators: Sequence[torch.Generator] | None,
        *,
        prompt_width: int,
        suppress_ids: Sequence[int],
        stop_ids: Sequence[int],
        vocab_limit: int,
        noise: SamplingNoise = "inverse_cdf",
    ) -> None:
        if noise not in ("inverse_cdf", "gumbel_per_row"):
            raise ValueError(f"unknown noise {noise!r}; use 'inverse_cdf' or 'gumbel_per_row'")
        self.sampling = sampling
        self.generators = generators
        self.noise = noise
        self._uniforms: torch.Tensor | None = None  # (B, max_new_tokens) float64
        self.prompt_width = prompt_width
        self.suppress_ids = list(suppress_ids)
        self.stop_ids = list(stop_ids)
        self.vocab_limit = vocab_limit
        self.chosen_ids: list[torch.Tensor] = []
        self.chosen_logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        raw = scores.float()  # (B, V)
        processed = raw.clone()
        if self.suppress_ids:
            processed[:, self.suppress_ids] = float("-inf")
        if self.vocab_limit < processed.shape[1]:
            processed[:, self.vocab_limit :] = float("-inf")  # ids no token decodes to
        if step < self.sampling.min_new_tokens and self.stop_ids:
            processed[:, self.stop_ids] = float("-inf")
        if self.sampling.greedy:
            choice = processed.argmax(dim=-1)  # (B,)
        else:
            scaled = processed / self.sampling.temperature
            if self.noise == "gumbel_per_row":
                # arg-max(log_softmax(x) + g) = arg-max(x + g): the normaliser is constant per row
                truncated = truncate(scaled, self.sampling)
                choice = (truncated + self._gumbel(raw)).argmax(dim=-1)  # (B,)
            else:
                choice = inverse_cdf_sample(scaled, self._uniform(step, raw), self.sampling)
        self.chosen_ids.append(choice)
        chosen_raw = raw.gather(1, choice.unsqueeze(1)).squeeze(1)  # (B,)
        self.chosen_logprobs.append(chosen_raw - torch.logsumexp(raw, dim=-1))
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(1, choice.unsqueeze(1), 0.0)

    def _uniform(self, step: int, like: torch.Tensor) -> torch.Tensor:
        """Row b's uniform of this step (B,): the step-th of its generator's draws."""
        assert self.generators is not None and len(self.generators) == like.shape[0]
        drawn = 0 if self._uniforms is None else self._uniforms.shape[1]
        if step >= drawn:  # one draw per row for the whole chunk (continued if ever exceeded)
            steps = max(self.sampling.max_new_tokens, step + 1) - drawn
            more = torch.stack(
                [
                    torch.rand(steps, generator=g, device=like.device, dtype=torch.float64)
                    for g in self.generators
                ]
            )  # (B, steps)
            self._uniforms = (
                more if self._uniforms is None else torch.cat([self._uniforms, more], 1)
            )
        return self._uniforms[:, step]

    def _gumbel(self, like: torch.Tensor) -> torch.Tensor:
        """Gumbel(0, 1) noise (B, V), row b drawn from generators[b] only."""
        assert self.generators is not None and len(self.generators) == like.shape[0]
        vocab = like.shape[1]
        rows = [
            torch.empty(vocab, device=like.device, dtype=torch.float32).exponential_(generator=g)
            for g in self.generators
        ]
        return -torch.stack(rows).log()  # -log(Exp(1)) ~ Gumbel(0, 1)


def inverse_cdf_sample(
    logits: torch.Tensor, uniforms: torch.Tensor, sampling: SamplingParams
) -> torch.Tensor:
    """One token per row of (B, V) logits (-inf = excluded), top-k and top-p applied, drawn by
    inverse CDF from uniforms (B,) in [0, 1); one sort serves truncation and the draw.

    In each row the ids are sorted by logit (descending, stable); the top-k first are kept,
    then the shortest prefix whose probability reaches top_p (at least one id), as `truncate`
    keeps them. With p the sorted probabilities (float64) and cdf their running sum, the row
    takes the first sorted id whose cdf exceeds u times the kept mass: id i is chosen exactly
    when u lies in its own interval, of width p_i / kept mass, so ids outside the kept prefix
    or with probability 0 are never chosen.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = sort_descending_stable(logits)  # (B, V)
    if 0 < sampling.top_k < vocab:
        sorted_logits[:, sampling.top_k :] = float("-inf")
    probs = torch.softmax(sorted_logits.double(), dim=-1)  # (B, V)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    kept = (cdf - probs < sampling.top_p) & (probs > 0)  # a prefix of each row
    last_kept = (kept.sum(-1, keepdim=True) - 1).clamp(min=0)  # (B, 1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf.gather(1, last_kept)  # (B, 1)
    position = torch.searchsorted(cdf, target, right=True).clamp(max=vocab - 1)  # (B, 1)
    return order.gather(1, torch.minimum(position, last_kept)).squeeze(1)  # (B,)


def sort_descending_stable(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.sort(logits, dim=-1, descending=True, stable=True)` of (B, V) float32 logits,
    the same values and order, faster on CPU.

    On CPU each logit becomes one distinct int64 key: the high 32 bits are the float's bit
    pattern mapped to an integer that DEcreases as the value increases (sign-magnitude to
    two's complement, then bitwise not), the low 32 bits its column. Distinct keys make any
    sort stable, and NumPy sorts int64 with SIMD, several times faster than torch's CPU sort;
    the column comes back from the low bits. -0.0 is keyed as +0.0 (they compare equal, so the
    column breaks the tie, as in a stable sort). Other devices, other dtypes and rows with NaN
    take `torch.sort`.
    """
    if (
        logits.device.type != "cpu"
        or logits.dtype != torch.float32
        or logits.dim() != 2
        or logits.shape[-1] >= 2**31
        or bool(torch.isnan(logits).any())
    ):
        return torch.sort(logits, dim=-1, descending=True, stable=True)
    bits = (logits.detach() + 0.0).numpy().view(np.int32).astype(np.int64)  # -0.0 -> +0.0
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # increases with the float value
    keys = (~ordered << 32) | np.arange(logits.shape[-1], dtype=np.int64)
    keys.sort(axis=-1)
    order = torch.from_numpy(keys & 0xFFFFFFFF)  # (B, V) columns, largest logit first
    return logits.gather(1, order), order


def truncate(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Top-k then top-p (nucleus) truncation of (B, V) logits: dropped tokens get -inf.

    Top-p keeps the smallest set of most likely tokens whose mass reaches top_p (at least one).
    """
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V): mass of strictly more likely tokens
        drop_sorted = mass_before >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class HFBackend:
    """`GenerationBackend` on a Hugging Face model (see the module docstring)."""

    name = "hf"

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        generation_batch_size: int = 64,
        scoring_batch_size: int = 16,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        noise: SamplingNoise = "inverse_cdf",
    ) -> None:
        if generation_batch_size < 1 or scoring_batch_size < 1:
            raise ValueError("generation_batch_size and scoring_batch_size must be >= 1")
        if noise not in ("inverse_cdf", "gumbel_per_row"):
            raise ValueError(f"unknown noise {noise!r}; use 'inverse_cdf' or 'gumbel_per_row'")
        self.noise: SamplingNoise = noise
        self.model = model
        self.processor = processor
        self.generation_batch_size = generation_batch_size
        self.scoring_batch_size = scoring_batch_size
        self.dtype = resolve_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
        self.attn_implementation = attn_implementation
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.suppress_ids = vision_token_ids(processor)
        self.pad_id = pad_token_id(processor)
        self.stop_ids = stop_token_ids(processor, model)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "auto",
        attn_implementation: str | None = None,
        generation_batch_size: int = 64,
        scoring_batch_size: int = 16,
        device_map: Any = None,
        max_memory: Any = None,
        offload_folder: str | Path | None = None,
        noise: SamplingNoise = "inverse_cdf",
    ) -> HFBackend:
        """Load a local folder; `device_map` / `max_memory` / `offload_folder` split the model
        across devices (kepo.models.load_model), and `device` is then ignored."""
        model, processor = load_policy(
            path,
            dtype=dtype,
            device=resolve_device(device),
            attn_implementation=attn_implementation,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
        )
        return cls(
            model,
            processor,
            generation_batch_size=generation_batch_size,
            scoring_batch_size=scoring_batch_size,
            dtype=dtype,
            attn_implementation=attn_implementation,
            noise=noise,
        )

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    # -------------------------------------------------------------------------- generate
    def _generation_config(self, sampling: SamplingParams) -> Any:
        from transformers import GenerationConfig

        # Greedy search over the sampler's one-hot scores. Values left unset are filled from
        # model.generation_config, which `_neutral_defaults` swaps for stop/pad ids only.
        return GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            use_cache=True,
        )

    @contextmanager
    def _neutral_defaults(self) -> Iterator[None]:
        """Swap the folder's generation defaults (sampling, penalties, suppressions) for a
        config holding only the stop and pad ids while `generate` runs: nothing but
        `SeededSampler` may touch the logits, or the recorded log-probs would not be the raw
        ones. The model's own config is restored afterwards (it is saved with checkpoints)."""
        from transformers import GenerationConfig

        original = self.model.generation_config
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id
        )
        try:
            yield
        finally:
            self.model.generation_config = original

    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingParams,
        *,
        desc: str = "generate",
    ) -> list[list[Completion]]:
        validate_requests(requests)
        rows = [(index, sample) for index in range(len(requests)) for sample in range(sampling.n)]
        results: list[list[Completion]] = [[] for _ in requests]
        config = self._generation_config(sampling)
        with progress(len(rows), desc, unit="seq") as advance:
            for start in range(0, len(rows), self.generation_batch_size):
                chunk = rows[start : start + self.generation_batch_size]
                for (index, _), completion in zip(
                    chunk, self._generate_chunk(requests, chunk, sampling, config), strict=True
                ):
                    results[index].append(completion)
                advance(len(chunk))
        return results

    def _prompt_inputs(
        self, requests: Sequence[GenerationRequest], row_requests: Sequence[int]
    ) -> dict[str, Any]:
        """Model inputs of the rows `row_requests` (request indices; the n samples of a request
        are n rows): each distinct request's prompt is rendered, tokenised and its image
        encoded ONCE, then handed to its rows (`image_features_for_rows`). The rows get the same
        ids, mask, grids and image features as rendering every row on its own would give."""
        distinct = list(dict.fromkeys(row_requests))  # request indices, first-seen order
        slot = {index: i for i, index in enumerate(distinct)}
        inputs = build_prompt_inputs(
            self.processor,
            [requests[i].messages for i in distinct],
            [requests[i].image for i in distinct],
        )
        inputs = batch_to(inputs, self.device, self.dtype)
        rows = torch.tensor([slot[i] for i in row_requests], device=self.device)
        out = {k: v[rows] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
        if "pixel_values" not in inputs:
            return out
        image_index = {}  # request index -> its image among the encoded ones
        for index in distinct:
            if requests[index].image is not None:
                image_index[index] = len(image_index)
        row_images = [image_index[i] for i in row_requests if i in image_index]
        grid = inputs["image_grid_thw"]
        out["image_grid_thw"] = grid[row_images]
        features = image_features_for_rows(self.model, inputs["pixel_values"], grid, row_images)
        if features is not None:
            out["mm_encoder_outputs"] = {"image": features}
        else:  # the model takes pixels only: each row gets its image's patches
            patches = image_patch_slices(grid)
            out["pixel_values"] = torch.cat(
                [inputs["pixel_values"][patches[i]] for i in row_images]
            )
        return out

    def _generate_chunk(
        self,
        requests: Sequence[GenerationRequest],
        chunk: Sequence[tuple[int, int]],
        sampling: SamplingParams,
        config: Any,
    ) -> list[Completion]:
        from transformers import LogitsProcessorList

        chunk_requests = [requests[index] for index, _ in chunk]
        inputs = self._prompt_inputs(requests, [index for index, _ in chunk])
        prompt_width = inputs["input_ids"].shape[1]
        generators = None
        if not sampling.greedy:
            generators = []
            for index, sample in chunk:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(sample_seed(requests[index].seed, sample))
                generators.append(generator)
        sampler = SeededSampler(
            sampling,
            generators,
            prompt_width=prompt_width,
            suppress_ids=self.suppress_ids,
            stop_ids=self.stop_ids,
            vocab_limit=len(self.tokenizer),
            noise=self.noise,
        )
        with self._neutral_defaults():
            output = self.model.generate(
                **model_inputs(inputs, self.model),
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler]),
            )
        generated = output.sequences[:, prompt_width:].cpu()  # (B, T)
        steps = generated.shape[1]
        chosen = torch.stack(sampler.chosen_ids, dim=1).cpu()[:, :steps]  # (B, T)
        logprobs = torch.stack(sampler.chosen_logprobs, dim=1).cpu()[:, :steps]  # (B, T)
        stop = set(self.stop_ids)
        completions = []
        for row, ((_, sample), request) in enumerate(zip(chunk, chunk_requests, strict=True)):
            tokens = generated[row].tolist()
            end = next((t + 1 for t, token in enumerate(tokens) if token in stop), None)
            length = end if end is not None else len(tokens)
            if tokens[:length] != chosen[row, :length].tolist():
                raise RuntimeError(
                    "generate produced tokens other than the sampler's choices; another logits "
                    "processor or a generation default interfered (check the model's generation_config.json)"
                )
            completions.append(
                Completion(
                    request_id=request.request_id,
                    sample_idx=sample,
                    text=self.tokenizer.decode(tokens[:length], skip_special_tokens=True),
                    token_ids=tokens[:length],
                    logprobs=logprobs[row, :length].tolist(),
                    finish_reason="stop" if end is not None else "length",
                )
            )
        return completions

    # -------------------------------------------------------------------------- score
    @torch.inference_mode()
    def score(
        self,
        requests: Sequence[GenerationRequest],
        completion_ids: Sequence[Sequence[int]],
        *,
        top_k: int = 0,
        desc: str = "score",
    ) -> list[TokenScores]:
        if len(requests) != len(completion_ids):
            raise ValueError(
                f"score: {len(requests)} requests but {len(completion_ids)} completions"
            )
        if top_k < 0:
            raise ValueError(f"score: top_k must be >= 0, got {top_k}")
        results: list[TokenScores] = []
        with progress(len(requests), desc, unit="seq") as advance:
            for start in range(0, len(requests), self.scoring_batch_size):
                chunk = requests[start : start + self.scoring_batch_size]
                ids = [list(c) for c in completion_ids[start : start + self.scoring_batch_size]]
                results.extend(self._score_chunk(chunk, ids, top_k))
                advance(len(chunk))
        return results

    def _score_chunk(
        self, requests: Sequence[GenerationRequest], completion_ids: list[list[int]], top_k: int
    ) -> list[TokenScores]:
        batch = build_sequence_batch(
            self.processor,
            [r.messages for r in requests],
            [r.image for r in requests],
            completion_ids,
        )
        batch = batch_to(batch, self.device, self.dtype)
        logits = completion_logits(self.model, batch)  # (B, Tc, V)
        scores = []
        for row, ids in enumerate(completion_ids):
            length = len(ids)
            logprobs = torch.log_softmax(logits[row, :length].float(), dim=-1)  # (T, V)
            token_ids = batch["completion_ids"][row, :length]
            chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).cpu().tolist()
            if top_k > 0:
                top = torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1)
                scores.append(
                    TokenScores(chosen, top.indices.cpu().tolist(), top.values.cpu().tolist())
                )
            else:
                scores.append(TokenScores(chosen))
        return scores

    # -------------------------------------------------------------------------- lifecycle
    def load_policy(self, path: str | Path) -> None:
        device = self.device
        self.close()
        self.model = load_model(
            path, dtype=self.dtype, device=device, attn_implementation=self.attn_implementation
        )
        self.stop_ids = stop_token_ids(self.processor, self.model)

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return
        on_cuda = self.device.type == "cuda"
        self.model = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
