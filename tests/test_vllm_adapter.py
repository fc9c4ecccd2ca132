"""The vLLM adapter against a recording stand-in of a CUDA build of the vllm API.

The proof that the adapter works is tests/test_vllm_engine.py, on a real engine (vLLM's CPU
build: generation with images, seeds, raw log-probs against vLLM's prompt log-probs and the HF
backend, teacher top-k, in-place reload). This file keeps what that engine cannot show, and
runs where vLLM is not installed: the arguments a CUDA build receives (config engine settings,
no CPU chunked-prefill override), sleep mode with tags around an in-place reload (the CPU build
has no sleep mode), outputs a healthy engine does not produce (aborted, unordered samples), and
the exact request/`SamplingParams` fields sent.

The stand-in mimics only the surface the adapter uses: `LLM(**engine_kwargs)`,
`LLM.generate(prompts, sampling_params=..., use_tqdm=...)`, `LLM.collective_rpc(name, args=...)`,
`LLM.reset_prefix_cache()`, `LLM.sleep(level=...)`, `LLM.wake_up()` and `SamplingParams(**kw)`.
Its outputs are deterministic functions of the request (seeded by the request's seed), and it
expands one `<|image_pad|>` into 4 tokens in token prompts, as vLLM's multi-modal processor does.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from kepo.generation import GenerationRequest, SamplingParams
from kepo.generation.vllm import VLLMBackend, vllm_seed
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
        self.calls.append(("collective_rpc", method, kwargs))
        if method != "reload_weights":
            raise AttributeError(f"worker has no method {method!r}")
        if not any(Path(kwargs["weights_path"]).glob("*.safetensors")):
            raise ValueError("no weights")
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))
        return True


STAND_IN = SimpleNamespace(
    LLM=RecordingLLM,
    SamplingParams=RecordingSamplingParams,
    platform="cuda",
    sleep_mode_available=True,
)
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
    assert kwargs["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert kwargs["gpu_memory_utilization"] == 0.3
    assert kwargs["max_logprobs"] >= 32  # room for the offline teacher top-k
    assert "worker_extension_cls" not in kwargs  # vLLM's own reload_weights does the reload
    assert "enable_chunked_prefill" not in kwargs  # the CPU-only override stays off on CUDA


def test_engine_settings_come_from_the_config_per_role(tiny_models, monkeypatch):
    from kepo.config import parse_config
    from kepo.generation import factory

    monkeypatch.setattr("kepo.generation.vllm.import_vllm", lambda: STAND_IN)
    monkeypatch.setattr("kepo.generation.vllm.load_processor", lambda path: load_processor(path))
    cfg = parse_config(
        {
            "models": {"student": str(tiny_models[0]), "teacher": str(tiny_models[1])},
            "rollout": {
                "backend": "vllm",
                "vllm": {
                    "student": {
                        "tensor_parallel_size": 2,
                        "max_model_len": 2048,
                        "gpu_memory_utilization": 0.4,
                        "max_num_batched_tokens": 16384,
                        "enforce_eager": True,
                        "dtype": "bfloat16",
                        "enable_sleep_mode": True,
                        "engine_kwargs": {"swap_space": 4},
                    },
                    "teacher": {"gpu_memory_utilization": 0.3, "max_logprobs": 40},
                },
            },
        }
    )
    student = factory.open_backend(cfg, "student", tiny_models[0])
    teacher = factory.open_backend(cfg, "teacher", tiny_models[1])
    s, t = student.llm.engine_kwargs, teacher.llm.engine_kwargs
    assert (s["tensor_parallel_size"], s["max_model_len"], s["gpu_memory_utilization"]) == (
        2,
        2048,
        0.4,
    )
    assert s["max_num_batched_tokens"] == 16384 and s["enforce_eager"] is True
    assert s["dtype"] == "bfloat16" and s["enable_sleep_mode"] is True and s["swap_space"] == 4
    assert t["gpu_memory_utilization"] == 0.3 and t["max_logprobs"] == 40
    assert t["dtype"] == "float32" and t["tensor_parallel_size"] == 1  # models.dtype, defaults
    assert "max_model_len" not in t
    # a teacher on another backend than the student
    cfg.rollout.teacher_backend = "hf"
    assert factory.backend_kind(cfg, "teacher") == "hf"
    assert factory.backend_kind(cfg, "student") == "vllm"


def test_deprecated_memory_setting_moves_to_the_student_engine():
    from kepo.config import ConfigError, parse_config

    with pytest.warns(FutureWarning, match="vllm.student.gpu_memory_utilization"):
        cfg = parse_config({"rollout": {"vllm_gpu_memory_utilization": 0.7}})
    assert cfg.rollout.vllm.student.gpu_memory_utilization == 0.7
    with pytest.raises(ConfigError, match="keep only the second"):
        parse_config(
            {
                "rollout": {
                    "vllm_gpu_memory_utilization": 0.7,
                    "vllm": {"student": {"gpu_memory_utilization": 0.2}},
                }
            }
        )
    with pytest.raises(ConfigError, match="max_logprobs"):
        parse_config(
            {
                "rollout": {"backend": "vllm", "vllm": {"teacher": {"max_logprobs": 8}}},
                "algorithm": {"name": "kepo", "distill": {"mode": "offline", "top_k": 32}},
            }
        )


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
    weights = {"weights_path": str(tiny_models[1].resolve())}
    assert backend.llm.calls == [
        ("collective_rpc", "reload_weights", weights),
        ("reset_prefix_cache",),
    ]
    assert backend.model_path == tiny_models[1]
    with pytest.raises(FileNotFoundError, match="safetensors"):
        backend.load_policy(tmp_path)


def test_reload_failure_is_loud(backend, tiny_models, monkeypatch):
    def broken(method, args=(), kwargs=None):
        raise ImportError("a missing loader module")

    monkeypatch.setattr(backend.llm, "collective_rpc", broken)
    with pytest.raises(RuntimeError, match=r"could not reload the weights.*ImportError"):
        backend.load_policy(tiny_models[1])
    assert backend.model_path == tiny_models[0]  # still names what the engine really holds
    monkeypatch.undo()
    backend.llm.reset_prefix_cache = lambda: False
    with pytest.raises(RuntimeError, match="prefix cache"):
        backend.load_policy(tiny_models[1])


def test_sleep_wakes_weights_before_the_reload_and_the_kv_cache_after(tiny_models):
    processor = load_processor(tiny_models[0])
    backend = VLLMBackend(
        tiny_models[0], vllm_module=STAND_IN, processor=processor, enable_sleep_mode=True
    )
    assert backend.llm.engine_kwargs["enable_sleep_mode"] is True
    assert backend.wake_up() is False  # not asleep: nothing to do
    assert backend.sleep(level=1) is True and backend.asleep
    backend.load_policy(tiny_models[1])
    weights = {"weights_path": str(tiny_models[1].resolve())}
    assert backend.llm.calls == [
        ("sleep", 1),
        ("wake_up", ["weights"]),
        ("collective_rpc", "reload_weights", weights),
        ("wake_up", ["kv_cache"]),
        ("reset_prefix_cache",),
    ]
    assert not backend.asleep
    backend.sleep(level=2)
    assert backend.wake_up() is True and not backend.asleep
    assert backend.llm.calls[-2:] == [("sleep", 2), ("wake_up", None)]


def test_sleep_mode_is_dropped_where_the_platform_lacks_it(tiny_models, caplog):
    no_sleep = SimpleNamespace(**{**vars(STAND_IN), "sleep_mode_available": False})
    backend = VLLMBackend(
        tiny_models[0], vllm_module=no_sleep, enable_sleep_mode=True, device="cuda"
    )
    assert "sleep mode is not available" in caplog.text
    assert backend.llm.engine_kwargs["enable_sleep_mode"] is False
    assert backend.sleep() is False and backend.llm.calls == []


def test_device_must_match_the_installed_build(tiny_models):
    with pytest.raises(ValueError, match="installed vLLM is its cuda build"):
        VLLMBackend(tiny_models[0], device="cpu", vllm_module=STAND_IN)
    cpu_build = SimpleNamespace(**{**vars(STAND_IN), "platform": "cpu"})
    backend = VLLMBackend(tiny_models[0], device="cpu", vllm_module=cpu_build, max_model_len=512)
    assert backend.llm.engine_kwargs["enable_chunked_prefill"] is False
    assert backend.llm.engine_kwargs["max_num_batched_tokens"] == 8192
