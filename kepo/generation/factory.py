"""Backends from a run config: which engine each model role gets, with which settings.

Roles: "student" (policy sampling, old log-probs, evaluation) runs on `rollout.backend` with the
`rollout.vllm.student` engine settings; "teacher" (hints, offline top-k) and "reference" (a
reference model other than the policy) run on `rollout.teacher_backend` (default: the same
backend) with the `rollout.vllm.teacher` settings.

Engine lifetime (vLLM's RL pattern): a stage opens the engines it needs and closes them at its
end, so one engine serves a whole rollout stage (never one per optimizer step). With
`keep_alive: true` (a long-lived worker that runs many stages in one process) closing returns
the engine to a per-process pool instead; the next stage that asks for the same role and
settings gets it back, with the new checkpoint loaded in place (`load_policy`) and, where the
platform has sleep mode, woken from the sleep it took between stages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kepo.generation.base import GenerationBackend

if TYPE_CHECKING:
    from kepo.config import RunConfig, VLLMEngineConfig

log = logging.getLogger(__name__)

Role = Literal["student", "teacher", "reference"]
Purpose = Literal["rollout", "eval"]


def backend_kind(cfg: RunConfig, role: Role) -> Literal["hf", "vllm"]:
    """The backend a role runs on."""
    if role == "student":
        return cfg.rollout.backend
    return cfg.rollout.teacher_backend_name


def engine_settings(cfg: RunConfig, role: Role) -> VLLMEngineConfig:
    """The vLLM engine settings of a role."""
    return cfg.rollout.vllm.student if role == "student" else cfg.rollout.vllm.teacher


def vllm_engine_arguments(cfg: RunConfig, role: Role) -> dict[str, Any]:
    """Keyword arguments of `VLLMBackend` for a role, from the config."""
    engine = engine_settings(cfg, role)
    llm_kwargs: dict[str, Any] = {"tensor_parallel_size": engine.tensor_parallel_size}
    if engine.max_num_batched_tokens is not None:
        llm_kwargs["max_num_batched_tokens"] = engine.max_num_batched_tokens
    if engine.enable_chunked_prefill is not None:
        llm_kwargs["enable_chunked_prefill"] = engine.enable_chunked_prefill
    llm_kwargs.update(engine.engine_kwargs)
    return {
        "dtype": engine.dtype or cfg.models.dtype,
        "device": cfg.models.device,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "max_model_len": engine.max_model_len,
        "enforce_eager": engine.enforce_eager,
        "enable_sleep_mode": engine.enable_sleep_mode,
        "max_logprobs": engine.max_logprobs,
        "engine_seed": cfg.seed,
        "use_tqdm": False,
        "llm_kwargs": llm_kwargs,
    }


def open_backend(
    cfg: RunConfig, role: Role, model_path: str | Path, *, purpose: Purpose = "rollout"
) -> GenerationBackend:
    """A backend for `role` on a local model folder; the caller closes it when the stage ends."""
    from kepo.generation import make_backend

    model_path = Path(model_path)
    if not model_path.is_dir():
        raise FileNotFoundError(
            f"model folder {model_path} ({role}) does not exist; build, train or download it first"
        )
    kind = backend_kind(cfg, role)
    if kind == "hf":
        from kepo.models import teacher_placement

        # a large teacher may be split over devices (models.teacher_device_map / max_memory)
        placement = teacher_placement(cfg.models) if role == "teacher" else {}
        return make_backend(
            "hf",
            model_path,
            dtype=cfg.models.dtype,
            device=cfg.models.device,
            generation_batch_size=(
                cfg.eval.batch_size if purpose == "eval" else cfg.rollout.generation_batch_size
            ),
            scoring_batch_size=cfg.rollout.scoring_batch_size,
            attn_implementation=cfg.models.attn_implementation,
            **placement,
        )
    arguments = vllm_engine_arguments(cfg, role)
    if not engine_settings(cfg, role).keep_alive:
        return make_backend("vllm", model_path, **arguments)
    return _POOL.lease(role, model_path, arguments)


# ------------------------------------------------------------------------------ long-lived
class _LeasedBackend:
    """A pooled engine handed to one stage: `close()` gives it back instead of closing it."""

    def __init__(self, pool: _EnginePool, key: tuple, backend: Any) -> None:
        self._pool, self._key, self.backend = pool, key, backend
        self.name = backend.name

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.backend.generate(*args, **kwargs)

    def score(self, *args: Any, **kwargs: Any) -> Any:
        return self.backend.score(*args, **kwargs)

    def load_policy(self, path: str | Path) -> None:
        self.backend.load_policy(path)

    def close(self) -> None:
        if self.backend is not None:
            self._pool.give_back(self._key, self.backend)
            self.backend = None


class _EnginePool:
    """Engines kept between stages of one process, one per (role, engine arguments)."""

    def __init__(self) -> None:
        self._idle: dict[tuple, Any] = {}

    @staticmethod
    def _key(role: str, arguments: dict[str, Any]) -> tuple:
        return (role, repr(sorted(arguments.items())))

    def lease(self, role: str, model_path: Path, arguments: dict[str, Any]) -> _LeasedBackend:
        from kepo.generation import make_backend

        key = self._key(role, arguments)
        backend = self._idle.pop(key, None)
        if backend is None:
            backend = make_backend("vllm", model_path, **arguments)
        else:
            if Path(backend.model_path).resolve() != model_path.resolve():
                log.info("%s engine: loading %s in place", role, model_path)
                backend.load_policy(model_path)  # wakes the weights first if asleep
            backend.wake_up()
        return _LeasedBackend(self, key, backend)

    def give_back(self, key: tuple, backend: Any) -> None:
        if key in self._idle:  # two leases of one key: keep one engine
            backend.close()
            return
        backend.sleep()
        self._idle[key] = backend

    def close_all(self) -> None:
        for backend in self._idle.values():
            backend.close()
        self._idle.clear()


_POOL = _EnginePool()


def close_pooled_engines() -> None:
    """Close every engine kept alive between stages (end of a long-lived worker)."""
    _POOL.close_all()
