"""Hugging Face generation backend: batching, seeds, log-prob consistency, stop handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from kepo.generation import GenerationRequest, SamplingParams, make_backend, sample_seed
from kepo.generation import hf as hf_module
from kepo.generation.hf import (
    HFBackend,
    SeededSampler,
    inverse_cdf_sample,
    sort_descending_stable,
    truncate,
)
from kepo.models import build_prompt_inputs, model_inputs, vision_token_ids
from kepo.prompts import PromptItem, build_messages
from kepo.tiny import build_tiny

ITEMS = [
    PromptItem("q1", "What imaging modality is shown?", ("CT", "MRI", "X-Ray", "Ultrasound"), "B"),
    PromptItem("q2", "Which organ is enlarged?", ("Liver", "Kidney"), "A"),
    PromptItem("q3", "Grade the lesion.", ("Mild", "Moderate", "Severe"), "C"),
    PromptItem("q4", "Where is the nodule located in this slice?", ("Left", "Right"), "A"),
]
SAMPLING = SamplingParams(n=4, temperature=0.9, top_p=0.95, top_k=0, max_new_tokens=12)


def _image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def _requests(seed_offset: int = 0) -> list[GenerationRequest]:
    sizes = [(64, 64), (96, 96), (80, 64), (64, 64)]
    requests = [
        GenerationRequest(
            item.question_id,
            build_messages(item, "train"),
            _image(i, sizes[i]),
            1000 + i + seed_offset,
        )
        for i, item in enumerate(ITEMS)
    ]
    # One text-only prompt: mixed batches must work too.
    requests[3] = GenerationRequest(
        "q4", build_messages(ITEMS[3], "train", with_image=False), None, 1003 + seed_offset
    )
    return requests


@pytest.fixture(scope="module")
def backend(tiny_models) -> HFBackend:
    return make_backend(
        "hf", tiny_models[0], device="cpu", generation_batch_size=64, scoring_batch_size=5
    )


class _CallSpy:
    """Wraps model.generate and records the batch size of each call."""

    def __init__(self, model):
        self.model = model
        self.original = model.generate
        self.batch_sizes: list[int] = []

    def __call__(self, *args, **kwargs):
        self.batch_sizes.append(kwargs["input_ids"].shape[0])
        return self.original(*args, **kwargs)


def _spy(backend, monkeypatch) -> _CallSpy:
    spy = _CallSpy(backend.model)
    monkeypatch.setattr(backend.model, "generate", spy)
    return spy


def _tokens(results):
    return [[c.token_ids for c in completions] for completions in results]


# ------------------------------------------------------------------------------ batching
def test_prompts_times_samples_come_from_batched_calls(backend, monkeypatch):
    spy = _spy(backend, monkeypatch)
    results = backend.generate(_requests(), SAMPLING)
    assert spy.batch_sizes == [16]  # 4 prompts x G=4 in ONE generate call
    assert [len(r) for r in results] == [4, 4, 4, 4]
    for request, completions in zip(_requests(), results, strict=True):
        assert [c.request_id for c in completions] == [request.request_id] * 4
        assert [c.sample_idx for c in completions] == [0, 1, 2, 3]
        for c in completions:
            assert len(c.token_ids) == len(c.logprobs) <= SAMPLING.max_new_tokens
            assert c.finish_reason in ("stop", "length")
            assert all(lp <= 0 for lp in c.logprobs)
    # A request's G samples differ from each other (independent generators).
    assert len({tuple(c.token_ids) for c in results[0]}) > 1

    spy.batch_sizes.clear()
    backend.generation_batch_size = 6
    try:
        chunked = backend.generate(_requests(), SAMPLING)
    finally:
        backend.generation_batch_size = 64
    assert spy.batch_sizes == [6, 6, 4]
    assert _tokens(chunked) == _tokens(results)  # chunking does not change any sample


def test_sampled_logprobs_equal_score_within_1e5(backend):
    requests = _requests()
    sampling = SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=16)
    results = backend.generate(requests, sampling)
    flat = [
        (request, c)
        for request, completions in zip(requests, results, strict=True)
        for c in completions
    ]
    scores = backend.score([r for r, _ in flat], [c.token_ids for _, c in flat], top_k=5)
    assert len(scores) == len(flat)
    worst = 0.0
    for (_, completion), score in zip(flat, scores, strict=True):
        assert len(score.logprobs) == len(completion.token_ids)
        worst = max(
            worst, *(abs(a - b) for a, b in zip(completion.logprobs, score.logprobs, strict=True))
        )
        for t, token in enumerate(completion.token_ids):
            top_ids, top_lps = score.topk_ids[t], score.topk_logprobs[t]
            assert len(top_ids) == 5 and top_lps == sorted(top_lps, reverse=True)
            assert score.logprobs[t] <= top_lps[0] + 1e-6
            if token in top_ids:
                assert math.isclose(top_lps[top_ids.index(token)], score.logprobs[t], abs_tol=1e-6)
    assert worst < 1e-5


# ------------------------------------------------------------------------------ seeds
def test_same_seed_same_samples_and_different_seed_different(backend):
    first = backend.generate(_requests(), SAMPLING)
    again = backend.generate(_requests(), SAMPLING)
    other = backend.generate(_requests(seed_offset=7), SAMPLING)
    assert _tokens(first) == _tokens(again)
    assert [[c.logprobs for c in r] for r in first] == [[c.logprobs for c in r] for r in again]
    assert all(a != b for a, b in zip(_tokens(first), _tokens(other), strict=True))


def test_a_request_alone_equals_the_same_request_in_a_batch(backend):
    requests = _requests()
    together = backend.generate(requests, SAMPLING)
    for index in (0, 3):
        alone = backend.generate([requests[index]], SAMPLING)
        assert _tokens(alone)[0] == _tokens(together)[index]
        for a, b in zip(alone[0], together[index], strict=True):
            assert np.allclose(a.logprobs, b.logprobs, atol=1e-5)
    reordered = backend.generate(requests[::-1], SAMPLING)
    assert _tokens(reordered)[::-1] == _tokens(together)


def test_first_token_is_the_documented_gumbel_max_sample(backend):
    """Recompute sample 2's first token by hand: raw logits of the prompt, vision tokens
    removed, temperature, top-p, plus Exp(1) noise from the sample's own generator. It also
    shows that the folder's sampling defaults (top-k 20, temperature 0.7) play no part."""
    request = _requests()[1]
    sampling = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_new_tokens=1)
    backend.noise = "gumbel_per_row"  # the earlier sampler, still selectable
    try:
        result = backend.generate([request], sampling)[0][2]
    finally:
        backend.noise = "inverse_cdf"
    inputs = build_prompt_inputs(backend.processor, [request.messages], [request.image])
    with torch.no_grad():
        raw = backend.model(**model_inputs(inputs, backend.model)).logits[0, -1].double()
    raw_logprobs = torch.log_softmax(raw, 0)
    raw[vision_token_ids(backend.processor)] = -math.inf
    scaled = raw / 0.8
    order = torch.argsort(scaled, descending=True)
    probs = torch.softmax(scaled[order], dim=0)
    kept = order[(probs.cumsum(0) - probs) < 0.9]
    truncated = torch.full_like(scaled, -math.inf)
    truncated[kept] = scaled[kept]
    generator = torch.Generator().manual_seed(sample_seed(request.seed, 2))
    noise = torch.empty(raw.shape[0]).exponential_(generator=generator).double()
    expected = int((torch.log_softmax(truncated, 0) - noise.log()).argmax())
    assert result.token_ids == [expected]
    assert backend.model.generation_config.top_k == 20  # the folder's defaults are restored
    assert math.isclose(result.logprobs[0], float(raw_logprobs[expected]), abs_tol=1e-5)


def test_first_token_is_the_documented_inverse_cdf_sample(backend):
    """The default sampler by hand: the truncated distribution in float64, vocabulary order,
    and the first of the sample's own generator's uniforms (all drawn when the chunk starts)."""
    request = _requests()[2]
    sampling = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_new_tokens=5)
    results = backend.generate([request], sampling)[0]
    inputs = build_prompt_inputs(backend.processor, [request.messages], [request.image])
    with torch.no_grad():
        raw = backend.model(**model_inputs(inputs, backend.model)).logits[0, -1].double()
    raw[vision_token_ids(backend.processor)] = -math.inf
    scaled = raw / 0.8
    order = torch.argsort(scaled, descending=True)
    probs = torch.softmax(scaled[order], dim=0)
    kept = order[(probs.cumsum(0) - probs) < 0.9]
    truncated = torch.full_like(scaled, -math.inf)
    truncated[kept] = scaled[kept]
    for sample, result in enumerate(results):
        generator = torch.Generator().manual_seed(sample_seed(request.seed, sample))
        u = float(torch.rand(5, generator=generator, dtype=torch.float64)[0])
        # the nucleus in descending order of probability, its running mass
        cdf = torch.softmax(truncated[kept], 0).cumsum(0)
        expected = int(kept[int((cdf <= u * float(cdf[-1])).sum())])  # first with cdf > u·total
        assert result.token_ids[0] == expected


def test_inverse_cdf_sample_by_hand():
    # ids sorted by probability: 0 (0.5), 3 (0.3), 2 (0.2); id 1 has probability 0
    logits = torch.log(torch.tensor([[0.5, 0.0, 0.2, 0.3]] * 4))
    draw = lambda u, **kw: inverse_cdf_sample(logits, torch.tensor(u), SamplingParams(**kw))  # noqa: E731
    assert draw([0.0, 0.49, 0.51, 0.99]).tolist() == [0, 0, 3, 2]
    assert draw([0.51, 0.6, 0.79, 0.81]).tolist() == [3, 3, 3, 2]
    # top-p 0.8 keeps {0, 3} (mass 0.8): u splits it 0.5 / 0.3 of 0.8
    assert draw([0.0, 0.62, 0.63, 0.99], top_p=0.8).tolist() == [0, 0, 3, 3]
    assert draw([0.0, 0.99, 0.5, 0.7], top_k=1).tolist() == [0, 0, 0, 0]


def test_sort_descending_stable_equals_torch_stable_sort():
    """The CPU int64-key sort gives torch.sort(descending, stable)'s values and order exactly,
    ties (bf16-rounded logits), -inf, +inf, -0.0 beside +0.0, and NaN (torch's path) included."""
    torch.manual_seed(0)
    for trial in range(50):
        logits = (torch.randn(6, 257) * 4).to(torch.bfloat16).float()  # many exact ties
        logits[:, 3] = -math.inf
        logits[:, 10], logits[:, 11], logits[:, 13] = -0.0, 0.0, -0.0
        logits[:, 12] = math.inf if trial % 5 == 0 else 1.0
        if trial == 7:
            logits[2, 40] = math.nan
        values, order = sort_descending_stable(logits)
        expected = torch.sort(logits, dim=-1, descending=True, stable=True)
        assert torch.equal(order, expected.indices), trial
        assert torch.equal(values.nan_to_num(), expected.values.nan_to_num()), trial
        assert torch.equal(values.signbit(), expected.values.signbit()), trial


def test_each_image_is_encoded_once_and_the_tokens_equal_the_per_row_path(backend, monkeypatch):
    """The n rows of a request share its image: the vision tower sees each distinct image once
    (not once per row), and the tokens and log-probs equal those of the path that hands every
    row its own copy of the pixels (encoded per row inside generate), bit for bit."""
    requests = _requests()  # three images (one request without)
    patches_seen: list[int] = []
    handle = backend.model.model.visual.register_forward_hook(
        lambda module, args, output: patches_seen.append(args[0].shape[0])
    )
    try:
        for sampling in (SAMPLING, SamplingParams(n=3, temperature=0.0, max_new_tokens=6)):
            patches_seen.clear()
            once = backend.generate(requests, sampling)
            once_patches = sum(patches_seen)
            patches_seen.clear()
            with monkeypatch.context() as patch:  # the model gets pixels per row instead
                patch.setattr(hf_module, "image_features_for_rows", lambda *a, **k: None)
                per_row = backend.generate(requests, sampling)
            assert sum(patches_seen) == sampling.n * once_patches > 0
            assert _tokens(once) == _tokens(per_row)
            assert [[c.logprobs for c in r] for r in once] == [
                [c.logprobs for c in r] for r in per_row
            ]
    finally:
        handle.remove()


def test_greedy_ignores_seeds(backend):
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=8)
    a = backend.generate(_requests(), greedy)
    b = backend.generate(_requests(seed_offset=99), greedy)
    assert _tokens(a) == _tokens(b)
    assert all(r[0].token_ids == r[1].token_ids for r in a)


# ------------------------------------------------------------------------------ stopping
def test_min_new_tokens_forces_length_and_stop_is_kept(backend):
    forced = backend.generate(
        _requests()[:2], SamplingParams(n=2, temperature=1.0, max_new_tokens=10, min_new_tokens=10)
    )
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for r in forced for c in r)

    im_end = backend.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Make <|im_end|> overwhelmingly likely: the completion must stop right after min_new_tokens.
    handle = backend.model.lm_head.register_forward_hook(
        lambda module, args, out: out.index_add(
            -1, torch.tensor([im_end]), torch.full((*out.shape[:-1], 1), 40.0)
        )
    )
    try:
        results = backend.generate(
            _requests()[:2], SamplingParams(n=2, max_new_tokens=10, min_new_tokens=3)
        )
        scores = backend.score([_requests()[0]] * 2, [c.token_ids for c in results[0]])
    finally:
        handle.remove()
    for completions in results:
        for c in completions:
            assert len(c.token_ids) == 4 and c.token_ids[-1] == im_end
            assert c.finish_reason == "stop"
            assert "<|im_end|>" not in c.text
    for c, s in zip(results[0], scores, strict=True):
        assert np.allclose(c.logprobs, s.logprobs, atol=1e-5)


def test_vision_tokens_are_never_sampled():
    vocab = 8
    logits = torch.zeros(64, vocab)
    logits[:, 5] = 30.0  # the "image token" dominates
    generators = [torch.Generator().manual_seed(i) for i in range(64)]
    sampler = SeededSampler(
        SamplingParams(temperature=1.0),
        generators,
        prompt_width=0,
        suppress_ids=[5],
        stop_ids=[7],
        vocab_limit=7,
    )
    scores = sampler(torch.zeros(64, 3, dtype=torch.long), logits)
    choice = scores.argmax(-1)
    assert not (choice == 5).any() and not (choice == 7).any()  # suppressed; 7 >= vocab_limit
    assert torch.equal(choice, sampler.chosen_ids[0])
    # The recorded log-prob is the RAW one (the suppressed token still holds its mass).
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(sampler.chosen_logprobs[0], raw.gather(1, choice[:, None]).squeeze(1))


# ------------------------------------------------------------------------------ sampler math
def test_truncate_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(truncate(logits, SamplingParams(**kw)))[0].tolist()  # noqa: E731
    assert kept(top_p=0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_p=0.2) == [True, False, False, False]  # at least one token
    assert kept(top_k=1) == [True, False, False, False]
    assert kept(top_k=3, top_p=1.0) == [True, True, True, False]
    assert kept(top_k=0, top_p=1.0) == [True] * 4


@pytest.mark.parametrize(
    ("temperature", "top_p", "expected"),
    [
        (1.0, 1.0, [0.5, 0.3, 0.15, 0.05]),
        (1.0, 0.8, [0.625, 0.375, 0.0, 0.0]),
        (
            0.5,
            1.0,
            np.array([0.5, 0.3, 0.15, 0.05]) ** 2 / np.sum(np.array([0.5, 0.3, 0.15, 0.05]) ** 2),
        ),
    ],
)
def test_seeded_sampler_draws_from_the_truncated_distribution(temperature, top_p, expected):
    rows = 6000
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(rows, 1)
    generators = [torch.Generator().manual_seed(sample_seed(7, i)) for i in range(rows)]
    sampler = SeededSampler(
        SamplingParams(temperature=temperature, top_p=top_p),
        generators,
        prompt_width=0,
        suppress_ids=[],
        stop_ids=[],
        vocab_limit=4,
    )
    choice = sampler(torch.zeros(rows, 1, dtype=torch.long), logits).argmax(-1)
    frequencies = torch.bincount(choice, minlength=4).double() / rows
    # 4 standard errors of a binomial proportion at n=6000 is at most 0.026.
    assert np.allclose(frequencies.numpy(), expected, atol=0.026)


# ------------------------------------------------------------------------------ lifecycle
def test_load_policy_switches_checkpoints(backend, tiny_models, tmp_path):
    other = build_tiny(tmp_path / "other", "student", seed=5, tokenizer_from=tiny_models[0])
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = _tokens(backend.generate(_requests()[:2], greedy))
    backend.load_policy(other)
    try:
        switched = _tokens(backend.generate(_requests()[:2], greedy))
    finally:
        backend.load_policy(tiny_models[0])
    assert switched != before
    assert _tokens(backend.generate(_requests()[:2], greedy)) == before


def test_bad_arguments_are_rejected(backend):
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="unknown generation backend"):
        make_backend("tgi", "x")  # type: ignore[arg-type]
    duplicated = _requests()[:1] * 2
    with pytest.raises(ValueError, match="appears twice"):
        backend.generate(duplicated, SAMPLING)
    with pytest.raises(ValueError, match="2 requests but 1 completions"):
        backend.score(_requests()[:2], [[1]])


def test_vllm_backend_explains_how_to_install(tiny_models):
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'"):
            make_backend("vllm", tiny_models[0])
    else:
        pytest.skip("vllm is installed here; tests/gpu covers it")
