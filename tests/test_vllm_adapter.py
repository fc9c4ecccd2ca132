"""The vLLM adapter against a recording stand-in of the vllm API.

This proves the ADAPTER, not vLLM: that `VLLMBackend` builds the engine arguments, prompts
and per-request `SamplingParams` it documents, and parses `RequestOutput` / `CompletionOutput`
/ `prompt_logprobs` structures of the shape vLLM returns (as documented in vllm.outputs and
vllm.sampling_params). Whether a real engine honours them (raw log-probs, seeds, image
expansion, in-place weight reload) is checked by tests/gpu/test_vllm_smoke.py on a GPU.

The stand-in mimics only the surface the adapter uses: `LLM(**engine_kwargs)`,
`LLM.generate(prompts, sampling_params=..., use_tqdm=...)`, `LLM.collective_rpc(name, args=...)`,
`LLM.reset_prefix_cache()`, `LLM.sleep(level=...)`, `LLM.wake_up()` and `SamplingParams(**kw)`.
Its outputs are deterministic functions of the request (seeded by the request's seed), and it
expands one `<|image_pad|>` into 4 tokens in token prompts, as vLLM's multi-modal processor does.
"""

from __future__ import annotations

import random
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from kepo.generation import GenerationRequest, SamplingParams
from kepo.generation.vllm import (
    WORKER_EXTENSION,
    CheckpointReloadExtension,
    VLLMBackend,
    iter_safetensors,
    model_load_checkpoint,
    vllm_seed,
)
from kepo.models import load_processor, stop_token_ids, vision_token_ids
from kepo.prompts import PromptItem, build_messages

IMAGE_EXPANSION = 4


def _logprob(value: float, rank: int) -> SimpleNamespace:
    return SimpleNamespace(logprob=value, rank=rank, decoded_token=None)


class RecordingSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        for key, value in kwargs.items():
            setattr(self, key, value)


class RecordingLLM:
    """Records every call; answers like vLLM would, deterministically."""

    def __init__(self, **kwargs):
        self.engine_kwargs = kwargs
        self.calls: list[tuple] = []
        self.image_token_id: int | None = None  # set by the test
        self.stop_id: int | None = None

    # ---- generation / scoring
    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append(("generate", prompts, sampling_params))
        params = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params] * len(prompts)
        )
        return [self._answer(prompt, p) for prompt, p in zip(prompts, params, strict=True)]

    def _answer(self, prompt, params):
        if "prompt_token_ids" in prompt:
            return self._score(prompt, params)
        samples = []
        for index in range(params.n):
            rng = random.Random(params.seed + index)  # vLLM: child i gets seed + i
            length = rng.randint(1, params.max_tokens)
            tokens = [rng.randrange(10, 400) for _ in range(length)]
            finish = "length"
            if index % 2 == 0 and length < params.max_tokens:
                tokens.append(self.stop_id)
                finish = "stop"
            steps = []
            for t, token in enumerate(tokens):
                # logprobs=0 returns the sampled token (and, on ties, possibly others).
                steps.append({token: _logprob(-0.01 * (t + 1) - index, 1), 3: _logprob(-9.0, 2)})
            samples.append(
                SimpleNamespace(
                    index=index,
                    text="(vllm text)",
                    token_ids=tokens,
                    logprobs=steps,
                    finish_reason=finish,
                    cumulative_logprob=None,
                    stop_reason=None,
                )
            )
        samples.reverse()  # vLLM does not promise index order
        return SimpleNamespace(
            request_id="0", prompt=prompt.get("prompt"), outputs=samples, prompt_logprobs=None
        )

    def _score(self, prompt, params):
        ids = []
        for token in prompt["prompt_token_ids"]:
            if token == self.image_token_id and "multi_modal_data" in prompt:
                ids.extend([token] * IMAGE_EXPANSION)
            else:
                ids.append(token)
        entries = [None]
        for position, token in enumerate(ids[1:], start=1):
            entry = {token: _logprob(-0.001 * position, 7)}
            for rank in range(1, params.prompt_logprobs + 1):
                entry[1000 + rank] = _logprob(-0.1 * rank, rank)
            entries.append(entry)
        return SimpleNamespace(
            request_id="0",
            prompt_token_ids=ids,
            prompt_logprobs=entries,
            outputs=[
                SimpleNamespace(index=0, token_ids=[0], logprobs=None, finish_reason="length")
            ],
        )

    # ---- engine control
    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append(("collective_rpc", method, args))
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self):
        self.calls.append(("wake_up",))


STAND_IN = SimpleNamespace(LLM=RecordingLLM, SamplingParams=RecordingSamplingParams)
ITEMS = [
    PromptItem("q1", "What imaging modality is shown?", ("CT", "MRI", "X-Ray", "Ultrasound"), "B"),
    PromptItem("q2", "Which organ is enlarged?", ("Liver", "Kidney"), "A"),
]


def _image(seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).convert(mode)


def _requests() -> list[GenerationRequest]:
    return [
        GenerationRequest("q1", build_messages(ITEMS[0], "train"), _image(0, "L"), 11),
        GenerationRequest("q2", build_messages(ITEMS[1], "train", with_image=False), None, 12),
    ]


@pytest.fixture()
def backend(tiny_models):
    processor = load_processor(tiny_models[0])
    backend = VLLMBackend(
        tiny_models[0], vllm_module=STAND_IN, processor=processor, gpu_memory_utilization=0.3
    )
    backend.llm.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    backend.llm.stop_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return backend


def test_engine_arguments(backend, tiny_models):
    kwargs = backend.llm.engine_kwargs
    assert kwargs["model"] == str(tiny_models[0])
    assert kwargs["logprobs_mode"] == "raw_logprobs"
    assert kwargs["worker_extension_cls"] == WORKER_EXTENSION
    assert kwargs["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert kwargs["gpu_memory_utilization"] == 0.3
    assert kwargs["max_logprobs"] >= 32  # room for the offline teacher top-k
    module, name = WORKER_EXTENSION.rsplit(".", 1)
    assert getattr(sys.modules[module], name) is CheckpointReloadExtension


def test_generate_builds_one_request_per_prompt_with_its_own_seed(backend):
    sampling = SamplingParams(
        n=3, temperature=0.9, top_p=0.95, top_k=0, max_new_tokens=7, min_new_tokens=2
    )
    backend.generate(_requests(), sampling)
    ((name, prompts, params),) = backend.llm.calls
    assert name == "generate" and len(prompts) == 2 and len(params) == 2
    expected_text = backend.processor.apply_chat_template(
        _requests()[0].messages, tokenize=False, add_generation_prompt=True
    )
    assert prompts[0]["prompt"] == expected_text
    assert prompts[0]["prompt"].count("<|image_pad|>") == 1  # vLLM expands it
    image = prompts[0]["multi_modal_data"]["image"]
    assert image.mode == "RGB" and np.array_equal(
        np.asarray(image), np.asarray(_requests()[0].image.convert("RGB"))
    )
    assert "multi_modal_data" not in prompts[1]
    vision = vision_token_ids(backend.processor)
    for request, p in zip(_requests(), params, strict=True):
        assert p.kwargs["n"] == 3 and p.temperature == 0.9 and p.top_p == 0.95
        assert p.top_k == -1  # 0 (off) is sent as -1
        assert p.max_tokens == 7 and p.min_tokens == 2
        assert p.logprobs == 0  # the sampled token's own log-prob only
        assert p.seed == vllm_seed(request.seed)
        assert set(p.stop_token_ids) == set(stop_token_ids(backend.processor))
        assert p.logit_bias == {token: -100.0 for token in vision}
    assert params[0].seed != params[1].seed


def test_generate_parses_outputs(backend):
    sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=6)
    results = backend.generate(_requests(), sampling)
    stop_id = backend.llm.stop_id
    for request, completions in zip(_requests(), results, strict=True):
        assert [c.sample_idx for c in completions] == [0, 1, 2, 3]  # sorted, whatever vLLM's order
        for c in completions:
            rng = random.Random(vllm_seed(request.seed) + c.sample_idx)
            length = rng.randint(1, 6)
            expected = [rng.randrange(10, 400) for _ in range(length)]
            stops = c.sample_idx % 2 == 0 and length < 6
            assert c.token_ids == [*expected, stop_id] if stops else expected
            assert c.finish_reason == ("stop" if stops else "length")
            assert c.logprobs == pytest.approx(
                [-0.01 * (t + 1) - c.sample_idx for t in range(len(c.token_ids))]
            )
            assert c.text == backend.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert c.request_id == request.request_id


def test_generate_rejects_aborted_or_incomplete_outputs(backend):
    original = backend.llm._answer

    def aborted(prompt, params):
        output = original(prompt, params)
        output.outputs[0].finish_reason = "abort"
        return output

    backend.llm._answer = aborted
    with pytest.raises(RuntimeError, match="finish_reason 'abort'"):
        backend.generate(_requests(), SamplingParams(n=2))


def test_score_sends_prompt_plus_completion_tokens_and_reads_the_tail(backend):
    completions = [[40, 41, 42], [50]]
    scores = backend.score(_requests(), completions, top_k=2)
    ((_, prompts, params),) = backend.llm.calls
    assert params.max_tokens == 1 and params.prompt_logprobs == 2
    for request, prompt, ids in zip(_requests(), prompts, completions, strict=True):
        text = backend.processor.apply_chat_template(
            request.messages, tokenize=False, add_generation_prompt=True
        )
        prompt_ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert prompt["prompt_token_ids"] == prompt_ids + ids
        assert ("multi_modal_data" in prompt) == (request.image is not None)
    for request, ids, score in zip(_requests(), completions, scores, strict=True):
        n_prompt = len(
            backend.tokenizer(
                backend.processor.apply_chat_template(
                    request.messages, tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )["input_ids"]
        )
        expanded = n_prompt + (IMAGE_EXPANSION - 1 if request.image is not None else 0)
        assert score.logprobs == pytest.approx([-0.001 * (expanded + t) for t in range(len(ids))])
        assert score.topk_ids == [[1001, 1002]] * len(ids)
        assert score.topk_logprobs == [pytest.approx([-0.1, -0.2])] * len(ids)


def test_score_skips_empty_completions_and_checks_top_k(backend):
    scores = backend.score(_requests(), [[], [7]])
    ((_, prompts, params),) = backend.llm.calls
    assert len(prompts) == 1 and params.prompt_logprobs == 0
    assert scores[0].logprobs == [] and len(scores[1].logprobs) == 1 and scores[1].topk_ids is None
    with pytest.raises(ValueError, match="max_logprobs"):
        backend.score(_requests(), [[1], [2]], top_k=10_000)


def test_load_policy_reloads_in_place_then_drops_the_prefix_cache(backend, tiny_models, tmp_path):
    backend.load_policy(tiny_models[1])
    assert backend.llm.calls == [
        ("collective_rpc", "kepo_load_checkpoint", (str(tiny_models[1].resolve()),)),
        ("reset_prefix_cache",),
    ]
    with pytest.raises(FileNotFoundError, match="safetensors"):
        backend.load_policy(tmp_path)
    backend.sleep(level=1)
    backend.wake_up()
    assert backend.llm.calls[-2:] == [("sleep", 1), ("wake_up",)]


def test_cpu_device_is_refused(tiny_models):
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        VLLMBackend(tiny_models[0], device="cpu", vllm_module=STAND_IN)


def test_worker_extension_streams_the_checkpoint_into_load_weights(tiny_models, monkeypatch):
    from safetensors.torch import load_file

    loaded: list[tuple[str, tuple]] = []
    model = SimpleNamespace(
        load_weights=lambda weights: loaded.extend((n, tuple(t.shape)) for n, t in weights)
    )
    worker = SimpleNamespace(
        model_runner=SimpleNamespace(model=model), model_config=None, device="cpu"
    )
    # Without vLLM's post-processing helper the extension must still load plain weights.
    monkeypatch.setitem(sys.modules, "vllm.model_executor.model_loader.utils", None)
    count = CheckpointReloadExtension.kepo_load_checkpoint(worker, str(tiny_models[0]))
    state = load_file(str(tiny_models[0] / "model.safetensors"))
    assert count == len(state) == len(loaded)
    assert sorted(loaded) == sorted((name, tuple(t.shape)) for name, t in state.items())
    assert any(name.startswith("model.visual") for name, _ in loaded)
    assert len(list(iter_safetensors(tiny_models[0]))) == model_load_checkpoint(
        SimpleNamespace(load_weights=list), tiny_models[0]
    )
