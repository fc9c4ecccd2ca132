"""The Hugging Face backend on a CUDA GPU (skipped without one).

Same contracts as tests/test_generation.py, on the device the rollouts use at scale: sampled
log-probs equal score() (fp32), a request's samples do not depend on its batch, and bf16 runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():  # pragma: no cover - depends on the machine
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from kepo.generation import GenerationRequest, SamplingParams, make_backend  # noqa: E402
from kepo.models import load_processor  # noqa: E402
from kepo.prompts import PromptItem, build_messages  # noqa: E402

ITEMS = [
    PromptItem("q1", "What imaging modality is shown?", ("CT", "MRI", "X-Ray", "Ultrasound"), "B"),
    PromptItem("q2", "Which organ is enlarged?", ("Liver", "Kidney"), "A"),
    PromptItem("q3", "Grade the lesion.", ("Mild", "Moderate", "Severe"), "C"),
]


def _requests() -> list[GenerationRequest]:
    rng = np.random.default_rng(0)
    out = []
    for i, item in enumerate(ITEMS):
        image = Image.fromarray((rng.random((64 + 16 * i, 64, 3)) * 255).astype("uint8"))
        out.append(
            GenerationRequest(item.question_id, build_messages(item, "train"), image, 10 + i)
        )
    return out


def test_processor_loads_with_whatever_torchvision_this_machine_has(tiny_models):
    processor = load_processor(tiny_models[0])
    assert processor.image_processor is not None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_backend_on_cuda(tiny_models, dtype):
    backend = make_backend(
        "hf", tiny_models[0], device="cuda", dtype=dtype, generation_batch_size=64
    )
    sampling = SamplingParams(n=4, temperature=0.9, top_p=0.95, max_new_tokens=24)
    results = backend.generate(_requests(), sampling)
    flat = [(r, c) for r, cs in zip(_requests(), results, strict=True) for c in cs]
    scores = backend.score([r for r, _ in flat], [c.token_ids for _, c in flat])
    tolerance = 1e-4 if dtype == "float32" else 0.1
    worst = max(
        abs(a - b)
        for (_, c), s in zip(flat, scores, strict=True)
        for a, b in zip(c.logprobs, s.logprobs, strict=True)
    )
    assert worst < tolerance, worst
    if dtype == "float32":
        alone = backend.generate(_requests()[1:2], sampling)
        assert [c.token_ids for c in alone[0]] == [c.token_ids for c in results[1]]
    backend.close()
