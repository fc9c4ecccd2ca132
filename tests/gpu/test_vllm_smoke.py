"""A real vLLM engine on a tiny model (GPU machines with the `vllm` extra; skipped elsewhere).

The checks of tests/test_vllm_engine.py (which runs them on vLLM's CPU build in CI) on a CUDA
build: vLLM accepts the engine arguments and requests the adapter builds, returns raw log-probs
that agree with its own prompt log-probs and with the Hugging Face backend, reproduces samples
from request seeds, and reloads a checkpoint in place; plus sleep mode, which only GPU builds
have (a reload on a sleeping engine wakes the weights first and the KV cache after).

    pip install -e '.[vllm]'          # on the GPU machine
    pytest tests/gpu -m gpu -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu

vllm = pytest.importorskip("vllm")
if not torch.cuda.is_available():  # pragma: no cover - depends on the machine
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from kepo.generation import GenerationRequest, SamplingParams, make_backend  # noqa: E402
from kepo.prompts import PromptItem, build_messages  # noqa: E402
from kepo.tiny import build_tiny  # noqa: E402

ITEMS = [
    PromptItem("q1", "What imaging modality is shown?", ("CT", "MRI", "X-Ray", "Ultrasound"), "B"),
    PromptItem("q2", "Which organ is enlarged?", ("Liver", "Kidney"), "A"),
]


def _requests() -> list[GenerationRequest]:
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8"))
    return [
        GenerationRequest("q1", build_messages(ITEMS[0], "train"), image, 1),
        GenerationRequest("q2", build_messages(ITEMS[1], "train", with_image=False), None, 2),
    ]


@pytest.fixture(scope="module")
def engine(tiny_models):
    backend = make_backend(
        "vllm",
        tiny_models[0],
        dtype="float32",
        gpu_memory_utilization=0.25,
        max_model_len=1024,
        enforce_eager=True,
        enable_sleep_mode=True,
    )
    yield backend
    backend.close()


def test_generate_score_and_seeds(engine, tiny_models):
    sampling = SamplingParams(n=4, temperature=0.9, top_p=0.95, max_new_tokens=16)
    results = engine.generate(_requests(), sampling)
    assert [len(r) for r in results] == [4, 4]
    again = engine.generate(_requests(), sampling)
    assert [[c.token_ids for c in r] for r in results] == [[c.token_ids for c in r] for r in again]

    flat = [(req, c) for req, cs in zip(_requests(), results, strict=True) for c in cs]
    scores = engine.score([r for r, _ in flat], [c.token_ids for _, c in flat], top_k=4)
    for (_, c), s in zip(flat, scores, strict=True):
        assert np.allclose(
            c.logprobs, s.logprobs, atol=1e-3
        )  # raw sampled log-probs == prompt log-probs
        assert all(len(ids) == 4 for ids in s.topk_ids)

    # The same tokens scored by the Hugging Face backend (same raw-logit convention).
    hf = make_backend("hf", tiny_models[0], device="cuda", dtype="float32")
    hf_scores = hf.score([r for r, _ in flat], [c.token_ids for _, c in flat])
    hf.close()
    for s, h in zip(scores, hf_scores, strict=True):
        assert np.allclose(s.logprobs, h.logprobs, atol=2e-3)


def test_load_policy_in_place(engine, tiny_models, tmp_path):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = [c.token_ids for r in engine.generate(_requests(), greedy) for c in r]
    other = build_tiny(tmp_path / "other", "student", seed=9, tokenizer_from=tiny_models[0])
    engine.load_policy(other)
    switched = engine.generate(_requests(), greedy)
    hf = make_backend("hf", other, device="cuda", dtype="float32")
    expected = hf.score(_requests(), [r[0].token_ids for r in switched])
    hf.close()
    got = engine.score(_requests(), [r[0].token_ids for r in switched])
    for g, e in zip(got, expected, strict=True):
        assert np.allclose(g.logprobs, e.logprobs, atol=2e-3)  # the new weights are live
    engine.load_policy(tiny_models[0])
    assert [c.token_ids for r in engine.generate(_requests(), greedy) for c in r] == before


def test_sleep_then_reload_then_generate(engine, tiny_models, tmp_path):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = [c.token_ids for r in engine.generate(_requests(), greedy) for c in r]
    other = build_tiny(tmp_path / "other2", "student", seed=11, tokenizer_from=tiny_models[0])
    assert engine.sleep(level=1) is True
    engine.load_policy(other)  # wakes the weights, reloads, wakes the KV cache
    assert not engine.asleep
    assert [c.token_ids for r in engine.generate(_requests(), greedy) for c in r] != before
    engine.load_policy(tiny_models[0])
    assert engine.sleep(level=1) and engine.wake_up()
    assert [c.token_ids for r in engine.generate(_requests(), greedy) for c in r] == before
