"""vLLM backend (GPU machines; install the `vllm` extra). `vllm` is imported lazily.

Requests
--------
Prompts are rendered with the model folder's own chat template through the Hugging Face
processor (`kepo.models.render_prompts`), the same text the HF backend tokenizes, and handed to
`LLM.generate` as `{"prompt": text, "multi_modal_data": {"image": pil_image}}`; vLLM's
multi-modal processor expands the one `<|image_pad|>` into the image's tokens. Each request gets
its own `vllm.SamplingParams(n=G, temperature, top_p, top_k, max_tokens, min_tokens,
seed, logprobs=0, stop_token_ids, logit_bias)`:

- `seed` = `vllm_seed(request.seed)` (a 62-bit hash of the request seed); vLLM gives child
  sample i of a request `seed + i` (vllm/v1/engine/parallel_sampling.py), so samples are
  per-request reproducible and independent of batching, as in the HF backend (but a different
  random stream). vLLM documents full reproducibility only for the same hardware and version,
  with `VLLM_ENABLE_V1_MULTIPROCESSING=0` or batch-invariant kernels (its reproducibility page);
- `logit_bias` of -100 on the vision control tokens (a random tiny model samples them, and a
  sampled `<|image_pad|>` would be read as an image slot when the completion is scored);
- `top_k=0` (off) is passed as -1, which every vLLM version reads as "off".

Log-probs
---------
The engine is built with `logprobs_mode="raw_logprobs"` (the V1 default, made explicit; the
engine argument came with vLLM PR #21398, July 2025). Per vLLM's engine-argument docs it sets
what BOTH `logprobs` and `prompt_logprobs` return, and "raw" means before any logits processor,
temperature, top-k or top-p — the policy log-prob convention of `kepo.generation.base`.
`logprobs=0` returns, per generated token, the sampled token's own log-prob. `score()` sends
prompt + completion as token ids (`{"prompt_token_ids": ..., "multi_modal_data": ...}`) with
`SamplingParams(max_tokens=1, prompt_logprobs=top_k)`; vLLM always includes the actual prompt
token besides the top-k (each entry is `{token_id: Logprob(logprob, rank, decoded_token)}`).
The completion's entries are the LAST len(completion) entries of
`RequestOutput.prompt_logprobs` (the image expansion changes the prompt's length, the tail does
not move).

New checkpoints without a restart per optimizer step
----------------------------------------------------
The policy changes only between iterations: one rollout per iteration, then the training stage
takes its optimizer steps on the stored rollouts (their old log-probs are stored with them). So
the engine never needs weights mid-rollout, and there are two ways to give it iteration k's
checkpoint:

1. One engine per rollout stage (the pipeline default): the rollout of iteration k builds
   `VLLMBackend(checkpoint_k)`, samples every prompt's G completions in one `LLM.generate`
   call (continuous batching), runs the scoring passes, and closes it. The engine start
   (weights, CUDA graphs, KV cache) is paid once per iteration, never per optimizer step.
2. A long-lived engine (e.g. a Prefect worker serving iterations from one process):
   `backend.load_policy(path)` calls `LLM.collective_rpc("kepo_load_checkpoint", args=(path,))`.
   Every vLLM worker runs `CheckpointReloadExtension.kepo_load_checkpoint` (registered with
   `LLM(worker_extension_cls=...)`), which streams the folder's safetensors shards into the
   running model with `model.load_weights(...)` in place (same architecture, same shapes: no
   re-allocation, CUDA graphs and KV cache kept), then `LLM.reset_prefix_cache()` drops the KV
   blocks computed with the old weights. With `enable_sleep_mode=True`, `sleep(level=1)`
   (`LLM.sleep`) frees the GPU for a colocated training stage and `wake_up()` (`LLM.wake_up`)
   brings the engine back before the next rollout.

The adapter (request building, output parsing, reload calls) is tested on CPU against a
recording stand-in (tests/test_vllm_adapter.py); tests/gpu/test_vllm_smoke.py runs a real engine.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kepo.generation.base import (
    Completion,
    GenerationRequest,
    SamplingParams,
    TokenScores,
    derive_seed,
    validate_requests,
)
from kepo.models import (
    check_processor,
    load_processor,
    render_prompts,
    stop_token_ids,
    vision_token_ids,
)

log = logging.getLogger(__name__)

WORKER_EXTENSION = "kepo.generation.vllm.CheckpointReloadExtension"
_VISION_BIAS = -100.0  # vLLM clamps logit biases to [-100, 100]


def import_vllm() -> Any:
    """The vllm module, or a clear error saying how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "the vLLM backend needs the `vllm` package (CUDA GPUs only): pip install -e '.[vllm]' "
            "on a GPU machine, or set rollout.backend: hf"
        ) from err
    return vllm


def vllm_seed(request_seed: int) -> int:
    """The vLLM request seed; child sample i uses this + i (62 bits leave room for + n)."""
    return derive_seed("vllm", request_seed) >> 1


class VLLMBackend:
    """`GenerationBackend` on a `vllm.LLM` engine (see the module docstring)."""

    name = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "bfloat16",
        device: str = "auto",
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        enable_sleep_mode: bool = False,
        max_logprobs: int = 64,
        engine_seed: int = 0,
        use_tqdm: bool = True,
        llm_kwargs: Mapping[str, Any] | None = None,
        vllm_module: Any = None,
        processor: Any = None,
    ) -> None:
        if device not in ("auto", "cuda") and not str(device).startswith("cuda"):
            raise ValueError(
                f"the vLLM backend runs on CUDA GPUs only (device={device!r}); use backend 'hf' on CPU"
            )
        self.model_path = Path(model_path)
        self._vllm = vllm_module if vllm_module is not None else import_vllm()
        self.processor = processor if processor is not None else load_processor(self.model_path)
        check_processor(self.processor, self.model_path)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.stop_ids = stop_token_ids(self.processor)
        self.suppress_ids = vision_token_ids(self.processor)
        self.max_logprobs = max_logprobs
        self.use_tqdm = use_tqdm
        self.engine_kwargs: dict[str, Any] = {
            "model": str(self.model_path),
            "tokenizer": str(self.model_path),
            "dtype": dtype,
            "seed": engine_seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager,
            "enable_sleep_mode": enable_sleep_mode,
            "max_logprobs": max_logprobs,
            "logprobs_mode": "raw_logprobs",
            "limit_mm_per_prompt": {"image": 1, "video": 0},
            "worker_extension_cls": WORKER_EXTENSION,
        }
        if max_model_len is not None:
            self.engine_kwargs["max_model_len"] = max_model_len
        self.engine_kwargs.update(llm_kwargs or {})
        self.llm = self._vllm.LLM(**self.engine_kwargs)

    # -------------------------------------------------------------------------- requests
    def _prompt(self, text: str, image: Any) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt": text}
        if image is not None:
            prompt["multi_modal_data"] = {"image": image.convert("RGB")}
        return prompt

    def sampling_params(self, request: GenerationRequest, sampling: SamplingParams) -> Any:
        """The `vllm.SamplingParams` of one request."""
        return self._vllm.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_new_tokens,
            min_tokens=sampling.min_new_tokens,
            seed=vllm_seed(request.seed),
            logprobs=0,
            stop_token_ids=list(self.stop_ids),
            logit_bias={token: _VISION_BIAS for token in self.suppress_ids},
            skip_special_tokens=True,
        )

    def _check_images(self, requests: Sequence[GenerationRequest]) -> None:
        for request in requests:
            n_parts = sum(
                1
                for message in request.messages
                if isinstance(message.get("content"), list)
                for part in message["content"]
                if isinstance(part, Mapping) and part.get("type") == "image"
            )
            if n_parts != (0 if request.image is None else 1):
                raise ValueError(
                    f"request {request.request_id!r}: {n_parts} image placeholder(s) in its messages but "
                    f"{'no image' if request.image is None else 'one image'} given"
                )

    # -------------------------------------------------------------------------- generate
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingParams,
        *,
        desc: str = "generate",
    ) -> list[list[Completion]]:
        validate_requests(requests)
        self._check_images(requests)
        if not requests:
            return []
        texts = render_prompts(self.processor, [r.messages for r in requests])
        prompts = [self._prompt(text, r.image) for text, r in zip(texts, requests, strict=True)]
        params = [self.sampling_params(r, sampling) for r in requests]
        log.info("%s: %d prompts x %d samples on vLLM", desc, len(requests), sampling.n)
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=self.use_tqdm)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        return [
            self._parse_request_output(r, o, sampling.n)
            for r, o in zip(requests, outputs, strict=True)
        ]

    def _parse_request_output(
        self, request: GenerationRequest, output: Any, n: int
    ) -> list[Completion]:
        samples = sorted(output.outputs, key=lambda c: c.index)
        if [c.index for c in samples] != list(range(n)):
            raise RuntimeError(
                f"request {request.request_id!r}: vLLM returned samples {[c.index for c in samples]}, expected 0..{n - 1}"
            )
        completions = []
        for sample in samples:
            token_ids = [int(t) for t in sample.token_ids]
            if sample.logprobs is None or len(sample.logprobs) != len(token_ids):
                raise RuntimeError(
                    f"request {request.request_id!r} sample {sample.index}: vLLM returned "
                    f"{0 if sample.logprobs is None else len(sample.logprobs)} log-probs for "
                    f"{len(token_ids)} tokens (was logprobs=0 dropped?)"
                )
            logprobs = [
                float(step[token].logprob)
                for step, token in zip(sample.logprobs, token_ids, strict=True)
            ]
            finish = sample.finish_reason
            if finish not in ("stop", "length"):
                raise RuntimeError(
                    f"request {request.request_id!r} sample {sample.index}: finish_reason {finish!r} "
                    "(aborted?); expected 'stop' or 'length'"
                )
            completions.append(
                Completion(
                    request_id=request.request_id,
                    sample_idx=int(sample.index),
                    text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                    token_ids=token_ids,
                    logprobs=logprobs,
                    finish_reason=finish,
                )
            )
        return completions

    # -------------------------------------------------------------------------- score
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
        if not 0 <= top_k <= self.max_logprobs:
            raise ValueError(
                f"score: top_k={top_k} outside [0, max_logprobs={self.max_logprobs}]; build the backend "
                "with a larger max_logprobs"
            )
        self._check_images(requests)
        results: list[TokenScores | None] = [None] * len(requests)
        prompts, rows = [], []
        texts = render_prompts(self.processor, [r.messages for r in requests])
        for row, (request, text, ids) in enumerate(
            zip(requests, texts, completion_ids, strict=True)
        ):
            ids = [int(t) for t in ids]
            if not ids:  # nothing to score; vLLM needs at least one token after the prompt
                results[row] = TokenScores([], [] if top_k else None, [] if top_k else None)
                continue
            prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompt: dict[str, Any] = {"prompt_token_ids": list(prompt_ids) + ids}
            if request.image is not None:
                prompt["multi_modal_data"] = {"image": request.image.convert("RGB")}
            prompts.append(prompt)
            rows.append((row, ids))
        if prompts:
            params = self._vllm.SamplingParams(
                max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False
            )
            log.info("%s: scoring %d completions on vLLM", desc, len(prompts))
            outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=self.use_tqdm)
            for (row, ids), output in zip(rows, outputs, strict=True):
                results[row] = self._parse_prompt_logprobs(
                    requests[row].request_id, output, ids, top_k
                )
        return [r for r in results if r is not None]

    @staticmethod
    def _parse_prompt_logprobs(
        request_id: str, output: Any, ids: list[int], top_k: int
    ) -> TokenScores:
        entries = output.prompt_logprobs
        if entries is None or len(entries) < len(ids) + 1:
            raise RuntimeError(
                f"request {request_id!r}: vLLM returned no prompt log-probs for the completion"
            )
        tail = entries[len(entries) - len(ids) :]
        logprobs, topk_ids, topk_logprobs = [], [], []
        for t, (entry, token) in enumerate(zip(tail, ids, strict=True)):
            if entry is None or token not in entry:
                raise RuntimeError(
                    f"request {request_id!r}: no log-prob for completion token {t} ({token})"
                )
            logprobs.append(float(entry[token].logprob))
            if top_k:
                ranked = sorted(
                    (
                        (lp.rank, tid, float(lp.logprob))
                        for tid, lp in entry.items()
                        if lp.rank is not None and lp.rank <= top_k
                    ),
                    key=lambda x: x[0],
                )[:top_k]
                topk_ids.append([tid for _, tid, _ in ranked])
                topk_logprobs.append([lp for _, _, lp in ranked])
        if top_k:
            return TokenScores(logprobs, topk_ids, topk_logprobs)
        return TokenScores(logprobs)

    # -------------------------------------------------------------------------- lifecycle
    def load_policy(self, path: str | Path) -> None:
        """Load another checkpoint of the same architecture into the running engine."""
        path = Path(path)
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"{path} holds no *.safetensors weights; save the checkpoint with save_pretrained"
            )
        self.llm.collective_rpc("kepo_load_checkpoint", args=(str(path.resolve()),))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.model_path = path

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory between rollouts (needs enable_sleep_mode=True)."""
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def close(self) -> None:
        if getattr(self, "llm", None) is None:
            return
        self.llm = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass


class CheckpointReloadExtension:
    """Methods added to every vLLM worker (`LLM(worker_extension_cls=WORKER_EXTENSION)`).

    vLLM mixes this class into its worker, so `self.model_runner`, `self.model_config` and
    `self.device` are the worker's.
    """

    def kepo_load_checkpoint(self, path: str) -> int:
        """Stream a Hugging Face folder's safetensors into the running model; returns the
        number of tensors read."""
        import torch

        model = self.model_runner.model  # type: ignore[attr-defined]
        count = model_load_checkpoint(model, path)
        try:
            from vllm.model_executor.model_loader.utils import process_weights_after_loading

            process_weights_after_loading(model, self.model_config, self.device)  # type: ignore[attr-defined]
        except (
            ImportError
        ):  # older/newer layouts: plain (unquantized) weights need no post-processing
            pass
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return count


def iter_safetensors(path: str | Path):
    """(name, tensor) pairs of every *.safetensors file in a folder, on the CPU, sorted by file."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not dicts
                yield name, handle.get_tensor(name)


def model_load_checkpoint(model: Any, path: str | Path) -> int:
    """Feed a checkpoint to `model.load_weights` (vLLM's loader maps HF names itself)."""
    count = 0

    def counted():
        nonlocal count
        for item in iter_safetensors(path):
            count += 1
            yield item

    model.load_weights(counted())
    return count
