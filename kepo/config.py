"""Typed run configuration, loaded from YAML (`configs/*.yaml`).

Every field carries a one-line description (shown by `kepo config show`), and every validation
error is turned into one line that names the field and says how to fix it (`ConfigError`).
Derived values are properties, not settings. The resolved config of a run is stored in the
`runs` table (`kepo.store.Store.register_run`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kepo.algorithms import ALGORITHMS, AlgorithmSpec, spec_for
from schemas.tables import MODALITIES

Modality = Literal["MRI", "CT", "X-Ray", "Ultrasound", "Dermoscopy", "Fundus", "OCT", "Microscopy"]
assert set(Modality.__args__) == set(MODALITIES)  # type: ignore[attr-defined]


def _f(description: str, default: Any = ..., **kw: Any) -> Any:
    return Field(default, description=description, **kw)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ------------------------------------------------------------------------------------ data
class DifficultyConfig(_Section):
    """Knobs that make a bundled modality harder or easier for a small model."""

    contrast: float = _f(
        "Lesion/structure contrast against background (0..1; lower is harder).", 0.6, ge=0.0, le=1.0
    )
    lesion_scale: float = _f(
        "Relative size of the structure that determines the answer (lower is harder).", 1.0, gt=0.0
    )
    distractors: int = _f("Number of distractor shapes drawn in the image.", 1, ge=0, le=12)
    noise: float = _f("Pixel noise standard deviation (0..1).", 0.05, ge=0.0, le=1.0)
    n_options: int = _f("Options per question (2..6).", 4, ge=2, le=6)


OptionOrder = Literal["shuffled", "fixed"]


class BundledDatasetConfig(_Section):
    """MiniMedVQA, the offline dataset built from wheel-shipped and procedurally generated images."""

    seed: int = _f("Seed of the dataset build (images, questions, option order).", 0)
    synthetic_per_modality: int = _f(
        "Procedurally generated images per modality (each asked questions_per_image questions).",
        240,
        ge=10,
    )
    questions_per_image: int = _f(
        "Questions asked about each synthetic image (distinct question types, 1..5).", 2, ge=1, le=5
    )
    include_real: bool = _f(
        "Include the real medical images shipped in the pydicom-data and scikit-image wheels.", True
    )
    real_variants_per_image: int = _f(
        "Label-preserving variants (crops, flips, windowing) per real image.", 6, ge=1
    )
    image_size: int = _f("Side of the generated images in pixels.", 96, ge=16, le=1024)
    option_order: OptionOrder = _f(
        "How questions list their options. 'shuffled': random distractors in a random order, as "
        "in OmniMedVQA (answering needs the option text -> letter look-up). 'fixed': every "
        "question of a type lists the same options in one order, so the letter follows from the "
        "content; for the tiny models, which do not learn the look-up in a CPU-sized warm-up "
        "(the learning-cliff study's setting).",
        "shuffled",
    )
    difficulty: dict[str, DifficultyConfig] = _f(
        "Per-modality difficulty overrides, keyed by modality name; unlisted modalities use defaults.",
        default_factory=dict,
    )

    @model_validator(mode="after")
    def _known_modalities(self) -> BundledDatasetConfig:
        for name in self.difficulty:
            if name not in MODALITIES:
                raise ValueError(
                    f"difficulty: unknown modality {name!r}; use one of {', '.join(MODALITIES)}"
                )
        return self


class CurationConfig(_Section):
    """How the curated train/test Parquet files are built (the paper's protocol by default)."""

    source: Literal["bundled", "omnimedvqa"] = _f("Which dataset to curate.", "bundled")
    root: Path | None = _f(
        "OmniMedVQA root folder (contains QA_information/); for source=omnimedvqa.", None
    )
    out_dir: Path = _f(
        "Folder for train.parquet, test.parquet, rejects.parquet and manifest.json.",
        Path("data/curated"),
    )
    split_seed: int = _f("Seed of the per-modality train/test split.", 42)
    train_fraction: float = _f(
        "Fraction of each modality's images (with all their questions) in the train part.",
        0.8,
        gt=0.0,
        lt=1.0,
    )
    train_modality: Modality = _f("Modality the training sample is drawn from (in-domain).", "MRI")
    train_size: int = _f("Training items sampled from the train part of train_modality.", 600, ge=1)
    test_per_modality: int = _f("Test items sampled per modality from the test part.", 300, ge=1)
    sample_seed: int = _f("Seed of the train/test samples drawn after the split.", 42)
    embed_images: bool = _f(
        "Store resized image bytes in the Parquet (self-contained files).", False
    )
    embed_size: int = _f("Side in pixels of embedded images.", 384, ge=16)
    image_workers: int = _f(
        "Threads that hash and decode source images during ingestion (no effect on the output).",
        4,
        ge=1,
    )
    bundled: BundledDatasetConfig = _f(
        "Settings of the bundled MiniMedVQA dataset.", default_factory=BundledDatasetConfig
    )


# ---------------------------------------------------------------------------------- models
class ModelsConfig(_Section):
    """Where the student, teacher and reference come from, and how they are loaded."""

    student: Path = _f(
        "Local Hugging Face folder of the student (initial policy).",
        Path("work/models/tiny-student"),
    )
    teacher: Path | None = _f(
        "Local Hugging Face folder of the teacher; required for kepo/gkd and exploration.",
        Path("work/models/tiny-teacher"),
    )
    reference: Path | None = _f(
        "Reference policy for the KL term; None = the initial student.", None
    )
    dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "Parameter dtype for student, teacher and reference.", "float32"
    )
    device: str = _f(
        "Torch device for generation/scoring in the rollout and evaluation stages ('auto' = cuda if available).",
        "auto",
    )
    torch_threads: int | None = _f(
        "torch.set_num_threads for CPU work; None leaves torch's default.", None, ge=1
    )
    attn_implementation: str | None = _f(
        "Attention kernel (e.g. 'sdpa', 'flash_attention_2'); None = transformers' default.", None
    )
    # --- teacher placement (kepo.models.teacher_placement) ---
    teacher_device_map: str | dict[str, int | str] | None = _f(
        "Split the Hugging Face teacher (hf rollout backend and trainer) across devices: 'auto' / "
        "'balanced' / 'sequential' or an explicit {module: device} map (accelerate); None = the "
        "whole teacher on models.device.",
        None,
    )
    teacher_max_memory: dict[str | int, str] | None = _f(
        "Memory cap per device for teacher_device_map, e.g. {0: '40GiB', 1: '40GiB', cpu: "
        "'64GiB'}; None = accelerate's default (all free memory).",
        None,
    )
    teacher_offload_folder: Path | None = _f(
        "Folder for teacher modules that teacher_device_map puts on 'disk' (slow; a last resort).",
        None,
    )

    @model_validator(mode="after")
    def _max_memory_needs_map(self) -> ModelsConfig:
        if self.teacher_max_memory is not None and self.teacher_device_map is None:
            raise ValueError(
                "teacher_max_memory is set but teacher_device_map is not; set "
                "teacher_device_map: auto (or an explicit map) to use the memory caps"
            )
        return self


# ---------------------------------------------------------------------------------- prompts
class PromptConfig(_Section):
    """Which of the paper's Appendix C templates are used."""

    thinking: bool = _f("Thinking mode: <think>...</think> then <answer>...</answer>.", True)
    hint_version: Literal["v0", "v1"] = _f(
        "Hint-aware prompt: v0 = hint only, v1 = hint + ground-truth answer (paper).", "v1"
    )
    eval_prompt: Literal["training", "authors"] = _f(
        "Evaluation prompt: the training prompt, or the authors' evaluation prompt.", "training"
    )


# ---------------------------------------------------------------------------------- sampling
class SamplingConfig(_Section):
    """Decoding settings for one kind of generation."""

    temperature: float = _f("Sampling temperature (0 = greedy).", 0.9, ge=0.0)
    top_p: float = _f("Nucleus sampling mass.", 0.95, gt=0.0, le=1.0)
    top_k: int = _f("Top-k sampling cut (0 = off).", 0, ge=0)
    max_new_tokens: int = _f("Maximum generated tokens.", 1024, ge=1)


class ExplorationConfig(_Section):
    """Knowledge-enhanced exploration (Algorithm 1)."""

    enabled: bool = _f("Run knowledge-enhanced exploration (KEPO); off = KEPO-KE / plain RL.", True)
    trigger_reward: Literal["total", "accuracy"] = _f(
        "Reward part whose all-zero group triggers exploration (authors: total).", "total"
    )
    trigger_scope: Literal["prompt", "batch"] = _f(
        "prompt = Algorithm 1; batch = any all-zero prompt explores every prompt (authors' code).",
        "prompt",
    )
    budget: int = _f("Hint-aware attempts B per triggered prompt.", 5, ge=1)
    inject_k: int = _f("Samples K per attempt, and trajectories injected on acceptance.", 2, ge=1)
    accept_rule: Literal["any", "all"] = _f(
        "Accept an attempt when any (paper) or all (authors) of its K samples are correct.", "any"
    )
    hint_sampling: SamplingConfig = _f(
        "Teacher decoding for hints (eq. 8 samples h ~ π_T; the authors sample with the rollout's "
        "temperature/top-p and its completion budget).",
        default_factory=lambda: SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=1024),
    )
    malformed_hint: Literal["use_raw", "skip"] = _f(
        "Malformed teacher hint: use the raw output as the hint, or skip exploration for the prompt.",
        "use_raw",
    )
    reject_leaks: bool = _f(
        "Reject hint-aware samples that mention the hint or the given answer (else only flag them).",
        False,
    )
    leak_span_words: int = _f(
        "A verbatim hint span of this many words in the reasoning counts as a leak.", 8, ge=3
    )


class VLLMEngineConfig(_Section):
    """Arguments of one vLLM engine (`vllm.LLM`), for one model role."""

    tensor_parallel_size: int = _f("GPUs the model is split over (tensor parallelism).", 1, ge=1)
    max_model_len: int | None = _f(
        "Longest prompt + completion in tokens (image tokens included); None = the model's own.",
        None,
        ge=16,
    )
    gpu_memory_utilization: float = _f(
        "Fraction of GPU memory the engine may take (weights + KV cache). On the CPU build: the "
        "share of host memory that must be free at start; size its KV cache with "
        "engine_kwargs {kv_cache_memory_bytes: N} instead.",
        0.5,
        gt=0.0,
        le=1.0,
    )
    max_num_batched_tokens: int | None = _f(
        "Tokens per engine step; None = vLLM's default. Keep it above one batch's prompt tokens "
        "on the CPU build: per-request seeds fail there when chunked prefill splits a prompt.",
        None,
        ge=16,
    )
    enable_chunked_prefill: bool | None = _f(
        "Split long prefills across steps; None = vLLM's default.", None
    )
    enforce_eager: bool = _f("Skip CUDA-graph capture (faster start, slower decoding).", False)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = _f(
        "Engine dtype; None = models.dtype.", None
    )
    enable_sleep_mode: bool = _f(
        "Allow sleep()/wake_up() to free GPU memory between rollouts (CUDA/ROCm only; ignored "
        "with a warning where the platform lacks it).",
        False,
    )
    max_logprobs: int = _f(
        "Most log-probs per token the engine returns; must cover algorithm.distill.top_k.", 64, ge=1
    )
    keep_alive: bool = _f(
        "Keep the engine between stages of one process (a long-lived worker) and load each new "
        "checkpoint in place instead of starting a new engine.",
        False,
    )
    engine_kwargs: dict[str, Any] = _f(
        "Further `vllm.LLM` arguments, passed as given (e.g. {'swap_space': 4}).",
        default_factory=dict,
    )


class VLLMConfig(_Section):
    """vLLM engines: the student (rollouts and evaluation) and the teacher (hints, top-k)."""

    student: VLLMEngineConfig = _f(
        "Engine of the policy (rollouts, old log-probs, evaluation).",
        default_factory=VLLMEngineConfig,
    )
    teacher: VLLMEngineConfig = _f(
        "Engine of the teacher (hints, offline top-k) and of a separate reference model.",
        default_factory=VLLMEngineConfig,
    )


SHARD_RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")


class RolloutConfig(_Section):
    """The rollout stage."""

    backend: Literal["hf", "vllm"] = _f(
        "Generation backend: Hugging Face generate (CPU/GPU) or vLLM (GPU, or its CPU build).",
        "hf",
    )
    teacher_backend: Literal["hf", "vllm"] | None = _f(
        "Backend of the teacher and reference models; None = rollout.backend.", None
    )
    vllm: VLLMConfig = _f(
        "vLLM engine settings (rollout.backend or teacher_backend = vllm).",
        default_factory=VLLMConfig,
    )
    prompts_per_iteration: int = _f("Training prompts per iteration (the rollout batch).", 16, ge=1)
    group_size: int = _f("Trajectories G sampled per prompt.", 8, ge=2)
    sampling: SamplingConfig = _f("Student decoding for rollouts.", default_factory=SamplingConfig)
    generation_batch_size: int = _f(
        "Sequences per generate call (prompts x samples are packed into it).", 64, ge=1
    )
    scoring_batch_size: int = _f("Sequences per scoring forward pass.", 16, ge=1)
    exploration: ExplorationConfig = _f(
        "Knowledge-enhanced exploration.", default_factory=ExplorationConfig
    )
    shards: int = _f("Split the rollout into this many shards (parallel Prefect tasks).", 1, ge=1)
    # --- where the shard tasks run (flows/runners.py) ---
    task_runner: Literal["inprocess", "ray"] = _f(
        "Where rollout shard tasks run: 'inprocess' (threads of the flow's process) or 'ray' "
        "(prefect-ray workers; install the 'ray' extra).",
        "inprocess",
    )
    ray_address: str | None = _f(
        "Address of an existing Ray cluster (e.g. 'ray://head:10001' or 'auto'); None = start a "
        "local one (no dashboard) for the shard tasks.",
        None,
    )
    shard_resources: dict[str, float] = _f(
        "Ray resources each shard task asks for: num_cpus, num_gpus, memory (bytes); e.g. "
        "{num_gpus: 1}. Ignored in-process.",
        default_factory=dict,
    )
    shard_retries: int = _f(
        "Times a failed shard task is rerun (a raised error, or on Ray a dead worker) before "
        "the rollout fails; a rerun overwrites the shard's files.",
        1,
        ge=0,
    )

    @property
    def teacher_backend_name(self) -> Literal["hf", "vllm"]:
        return self.teacher_backend or self.backend

    @model_validator(mode="before")
    @classmethod
    def _deprecated_names(cls, data: Any) -> Any:
        """`vllm_gpu_memory_utilization` (older configs and stored runs) moved to
        `vllm.student.gpu_memory_utilization`."""
        if isinstance(data, dict) and "vllm_gpu_memory_utilization" in data:
            data = dict(data)
            value = data.pop("vllm_gpu_memory_utilization")
            engines = dict(data.get("vllm") or {})
            student = dict(engines.get("student") or {})
            if "gpu_memory_utilization" in student:
                raise ValueError(
                    "vllm_gpu_memory_utilization (deprecated) and "
                    "vllm.student.gpu_memory_utilization are both set: keep only the second"
                )
            student["gpu_memory_utilization"] = value
            engines["student"] = student
            data["vllm"] = engines
            warnings.warn(
                "rollout.vllm_gpu_memory_utilization is deprecated: use "
                "rollout.vllm.student.gpu_memory_utilization",
                FutureWarning,
                stacklevel=2,
            )
        return data

    @field_validator("shard_resources")
    @classmethod
    def _known_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(resources) - set(SHARD_RESOURCE_KEYS))
        if unknown:
            raise ValueError(
                f"unknown shard resource(s) {unknown}; use {', '.join(SHARD_RESOURCE_KEYS)}"
            )
        negative = sorted(k for k, v in resources.items() if v < 0)
        if negative:
            raise ValueError(f"shard resource(s) {negative} must be >= 0")
        return resources


# ---------------------------------------------------------------------------------- algorithm
class GateConfig(_Section):
    """Quality gate of the distillation term (eq. 7)."""

    tau: float = _f("Threshold τ.", 1.0)
    comparator: Literal[">=", ">"] = _f(
        "Gate opens when reward >= τ (authors) or > τ (paper text, §3.2.1).", ">="
    )
    reward_part: Literal["total", "accuracy"] = _f(
        "Reward the gate compares with τ (authors: total).", "total"
    )


class DistillConfig(_Section):
    """The distillation term (KEPO) or loss (MM-GKD)."""

    coef: float = _f("Weight of the distillation term.", 1.0, ge=0.0)
    divergence: Literal["jsd", "forward_kl", "reverse_kl"] = _f(
        "Divergence D(π_T‖π_θ) per token.", "jsd"
    )
    jsd_beta: float = _f("β of the generalized JSD (0.5 = authors).", 0.5, ge=0.0, le=1.0)
    mode: Literal["online", "offline"] = _f(
        "online = teacher forward in the trainer (full vocab); offline = stored top-k.", "online"
    )
    top_k: int = _f("Teacher top-k stored per token in offline mode.", 32, ge=1)
    temperature: float = _f("Softmax temperature of both distributions.", 1.0, gt=0.0)
    normalize: Literal["gate_open", "all"] = _f(
        "kepo: what the gated divergence is averaged over in an optimizer step: 'gate_open' = "
        "the completion tokens of gate-open rows (authors: JSD summed over gate-open tokens / "
        "their count); 'all' = the policy term's aggregation over every row (a gated-out row "
        "counts with 0, which weakens the term by the gate-open fraction).",
        "gate_open",
    )
    gate: GateConfig = _f("Quality gate.", default_factory=GateConfig)


class AlgorithmConfig(_Section):
    """Which objective is optimised and its coefficients."""

    name: str = _f(f"Training algorithm ({', '.join(ALGORITHMS)}; kepo.algorithms).", "kepo")
    label: str | None = _f(
        "Method label for tables and plots (default: derived from the settings).", None
    )
    advantage: Literal["grpo", "rloo"] | None = _f(
        "Advantage estimator (default: rloo for rloo, grpo otherwise).", None
    )
    scale_by_std: bool = _f(
        "Divide GRPO advantages by the group std (authors) instead of mean-only (eq. 6).", True
    )
    clip: bool = _f(
        "PPO-clip the ratio (eq. 5); the authors take one unclipped update per batch.", False
    )
    clip_eps_low: float = _f("Lower clip ε.", 0.2, gt=0.0)
    clip_eps_high: float = _f("Upper clip ε.", 0.2, gt=0.0)
    kl_coef: float = _f("β of the reference KL (k3 estimator); 0 = off (authors).", 0.0, ge=0.0)
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] | None = (
        _f(
            "How per-token losses are reduced; None = as the authors: seq_mean_token_mean for "
            "grpo/rloo/kepo (each sequence's token mean, averaged over sequences), token_mean for "
            "gkd/sft (their JSD / cross-entropy over all target tokens).",
            None,
        )
    )
    distill: DistillConfig = _f(
        "Distillation term (kepo) / loss (gkd).", default_factory=DistillConfig
    )
    gkd_lambda: float = _f(
        "MM-GKD λ: probability of training on the student's own sample (else the dataset target).",
        1.0,
        ge=0.0,
        le=1.0,
    )

    @field_validator("name")
    @classmethod
    def _known_algorithm(cls, name: str) -> str:
        spec_for(name)  # raises "unknown algorithm ...; use one of ..."
        return name

    @property
    def spec(self) -> AlgorithmSpec:
        """What this algorithm needs from the stages (`kepo.algorithms`)."""
        return spec_for(self)

    @property
    def advantage_estimator(self) -> Literal["grpo", "rloo"]:
        if self.advantage is not None:
            return self.advantage
        return self.spec.advantage

    @property
    def aggregation(self) -> Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]:
        """The loss aggregation in effect (`loss_aggregation`, or the authors' per algorithm):
        a per-sequence token mean for the policy-gradient methods, a token mean for the
        distillation/SFT losses (the authors' GOLD trainer, TRL's "nll")."""
        if self.loss_aggregation is not None:
            return self.loss_aggregation
        return "seq_mean_token_mean" if self.spec.policy_term else "token_mean"


# ---------------------------------------------------------------------------------- training
class TrainConfig(_Section):
    """The training step."""

    learning_rate: float = _f("AdamW learning rate.", 2e-6, gt=0.0)
    weight_decay: float = _f("AdamW weight decay.", 0.0, ge=0.0)
    adam_betas: tuple[float, float] = _f("AdamW betas.", (0.9, 0.999))
    lr_schedule: Literal["constant", "linear", "cosine"] = _f(
        "Learning-rate schedule over the run's optimizer steps (linear = decay to 0 at the last "
        "step, the Hugging Face Trainer default the authors' RL runs use).",
        "linear",
    )
    warmup_steps: int = _f("Linear warm-up steps.", 0, ge=0)
    warmup_ratio: float = _f(
        "Warm-up as a fraction of the run's optimizer steps, ceil(ratio x steps) (the authors' "
        "SFT: 0.1); used when warmup_steps is 0.",
        0.0,
        ge=0.0,
        lt=1.0,
    )
    micro_batch_size: int = _f("Sequences per forward/backward per process.", 8, ge=1)
    grad_accum_steps: int = _f("Micro-batches per optimizer step.", 2, ge=1)
    passes: int = _f("Passes over an iteration's rollouts (ppo epochs).", 1, ge=1)
    max_grad_norm: float | None = _f("Gradient clipping norm; None = off.", 1.0, gt=0.0)
    seed: int = _f("Seed of shuffling and dropout in the training step.", 0)
    gradient_checkpointing: bool = _f("Trade compute for memory in the student forward.", False)
    logits_chunk_elements: int | None = _f(
        "Largest block of logits (positions x vocabulary) computed at once when log-probs and "
        "the distillation divergence are computed from hidden states and the LM head (grpo, "
        "rloo, kepo), so the (B, T, V) logits are never materialised: 2^24 is 110 positions "
        "of a 151,936-wide vocabulary (64 MiB in fp32). A batch that fits in one block runs "
        "without recomputation. None = compute all logits at once.",
        2**24,
        ge=1,
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = _f("Accelerate mixed precision.", "no")
    save_optimizer: bool = _f(
        "Save the optimizer and scheduler state (optimizer.pt) with the newest checkpoint, so "
        "the next iteration continues AdamW; an older version's optimizer.pt is deleted once a "
        "newer version is recorded (its checkpoints.optimizer_path becomes NULL).",
        True,
    )
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "dtype of the saved model weights. auto = the training dtype: bfloat16/float16 under "
        "train.mixed_precision bf16/fp16, else models.dtype (float32 in the CPU configs). "
        "Below the float32 the trainer holds, optimizer.pt of the newest version also keeps the "
        "float32 master weights and the next iteration resumes from them (from the saved "
        "weights when there is no optimizer.pt).",
        "auto",
    )
    keep_checkpoints: int | None = _f(
        "Keep the newest N policy folders of the run (None = keep all); an older one is deleted "
        "after a newer version is recorded, unless it is in keep_versions or the run still has "
        "to evaluate it. Its checkpoints row stays, with pruned_at set. Version 0 (the initial "
        "student) is never a run's folder and is never deleted.",
        None,
        ge=1,
    )
    keep_versions: list[int] = _f(
        "Policy versions never pruned by keep_checkpoints (e.g. the evaluated ones to keep).",
        default_factory=list,
    )
    sft_epochs: int = _f("SFT: passes over the iteration's prompts' targets.", 1, ge=1)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = _f(
        "Also export per-step training metrics and evaluation accuracies to these trackers "
        "(tensorboard: offline event files in <workdir>/tensorboard; see kepo/tracking.py).",
        default_factory=list,
    )
    launcher: Literal["inprocess", "accelerate"] = _f(
        "Where the training stage runs: inprocess = in the stage's own process (one process); "
        "accelerate = the stage launches `accelerate launch -m kepo.train_stage` with num_processes "
        "processes, keeps the stage's lease and record, and waits (kepo/launch.py).",
        "inprocess",
    )
    num_processes: int = _f(
        "Training processes (one per GPU) with launcher accelerate. An optimizer step takes "
        "micro_batch_size x grad_accum_steps x num_processes rows: halve grad_accum_steps when "
        "doubling it to keep the same steps.",
        1,
        ge=1,
    )
    strategy: Literal["ddp", "fsdp", "deepspeed_zero3"] = _f(
        "How launched processes share the model: ddp = a full copy each; fsdp = Accelerate's "
        "FSDP2 plugin; deepspeed_zero3 = Accelerate's DeepSpeed ZeRO-3 plugin. fsdp and "
        "deepspeed_zero3 need launcher accelerate and GPUs, and are refused for now: the "
        "trainer does not yet gather sharded weights for its checkpoint (kepo/launch.py).",
        "ddp",
    )

    @model_validator(mode="after")
    def _launchable(self) -> TrainConfig:
        if self.launcher == "inprocess" and self.num_processes > 1:
            raise ValueError(
                f"train.num_processes={self.num_processes} needs train.launcher: accelerate "
                "(inprocess trains in one process): set train.launcher to accelerate"
            )
        if self.launcher == "inprocess" and self.strategy != "ddp":
            raise ValueError(
                f"train.strategy={self.strategy} needs train.launcher: accelerate: set "
                "train.launcher to accelerate or train.strategy to ddp"
            )
        return self

    @field_validator("keep_versions")
    @classmethod
    def _versions_positive(cls, versions: list[int]) -> list[int]:
        bad = [v for v in versions if v < 1]
        if bad:
            raise ValueError(
                f"keep_versions {bad}: policy versions start at 1 (version 0, the initial "
                "student, is never pruned); drop them"
            )
        return sorted(set(versions))

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warm-up steps in effect: warmup_steps, else ceil(warmup_ratio x total_steps)."""
        if self.warmup_steps > 0:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * total_steps)


# ---------------------------------------------------------------------------------- evaluation
class EvalConfig(_Section):
    """The evaluation stage."""

    every: int = _f("Evaluate every N iterations (and always the last).", 1, ge=1)
    greedy: bool = _f("Greedy decoding (else the sampling settings below).", True)
    sampling: SamplingConfig = _f(
        "Decoding for evaluation when not greedy, and max_new_tokens always.",
        default_factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=1024),
    )
    batch_size: int = _f("Prompts per generate call.", 16, ge=1)
    max_items_per_modality: int | None = _f(
        "Evaluate at most this many test items per modality (None = all).", None, ge=1
    )
    shards: int = _f(
        "Split the evaluation into this many shard tasks, modalities dealt round-robin, run as "
        "Ray tasks with rollout.shard_resources (needs rollout.task_runner: ray).",
        1,
        ge=1,
    )


class StoreConfig(_Section):
    """The DuckDB store."""

    lock_timeout_s: float = _f(
        "How long to retry when another process holds the database file.", 30.0, ge=0.0
    )


# ---------------------------------------------------------------------------------- study
class StudyTag(_Section):
    """Where a run sits in a study (`kepo study` sets it; standalone runs leave it unset)."""

    name: str = _f(
        "Study name; runs with the same name form one study.", pattern=r"^[A-Za-z0-9_-]+$"
    )
    method: str = _f("Method name within the study (e.g. grpo, kepo-tau1).")
    seed: int = _f("The study seed this run uses (its master and training seed).", 0)
    role: Literal["method", "teacher"] = _f(
        "method = a compared method; teacher = the teacher evaluated as a reference.", "method"
    )


# ---------------------------------------------------------------------------------- run
class RunConfig(_Section):
    """One KEPO (or baseline) run."""

    run_id: str = _f(
        "Run identifier (letters, digits, '-', '_').", "kepo-tiny", pattern=r"^[A-Za-z0-9_-]+$"
    )
    workdir: Path = _f(
        "Run directory: kepo.duckdb, checkpoints and rollout shards live here.", Path("work/run")
    )
    seed: int = _f(
        "Master seed; per-prompt sampling seeds derive from (seed, run, iteration, prompt).", 0
    )
    iterations: int = _f("Training iterations of the run.", 1, ge=0)
    description: str = _f("Free text kept with the run.", "")
    data: CurationConfig = _f(
        "Curated dataset this run trains and evaluates on.", default_factory=CurationConfig
    )
    models: ModelsConfig = _f("Student, teacher and reference.", default_factory=ModelsConfig)
    prompts: PromptConfig = _f("Prompt templates.", default_factory=PromptConfig)
    rollout: RolloutConfig = _f("Rollout stage.", default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = _f("Objective.", default_factory=AlgorithmConfig)
    train: TrainConfig = _f("Training step.", default_factory=TrainConfig)
    eval: EvalConfig = _f("Evaluation stage.", default_factory=EvalConfig)
    store: StoreConfig = _f("DuckDB store.", default_factory=StoreConfig)
    study: StudyTag | None = _f(
        "Study membership (set by `kepo study`); None for a standalone run.", None
    )

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.algorithm.spec.needs_teacher and self.models.teacher is None:
            without = "/".join(n for n, s in ALGORITHMS.items() if not s.needs_teacher)
            raise ValueError(
                f"algorithm.name={self.algorithm.name!r} needs a teacher: set models.teacher to a "
                f"local model folder, or choose algorithm.name {without}"
            )
        if self.rollout.exploration.inject_k > self.rollout.group_size:
            raise ValueError(
                f"rollout.exploration.inject_k ({self.rollout.exploration.inject_k}) exceeds "
                f"rollout.group_size ({self.rollout.group_size}): lower inject_k or raise group_size"
            )
        distill = self.algorithm.distill
        teacher_engine = self.rollout.vllm.teacher
        if (
            self.rollout.teacher_backend_name == "vllm"
            and distill.mode == "offline"
            and distill.top_k > teacher_engine.max_logprobs
        ):
            raise ValueError(
                f"algorithm.distill.top_k ({distill.top_k}) exceeds "
                f"rollout.vllm.teacher.max_logprobs ({teacher_engine.max_logprobs}): raise "
                "max_logprobs or lower top_k"
            )
        if self.eval.shards > 1 and self.rollout.task_runner != "ray":
            raise ValueError(
                f"eval.shards={self.eval.shards} needs rollout.task_runner: ray (evaluation shards "
                "write to the store, which threads of one process cannot share): set "
                "rollout.task_runner to ray or eval.shards to 1"
            )
        return self

    @property
    def db_path(self) -> Path:
        return self.workdir / "kepo.duckdb"

    @property
    def in_domain_modality(self) -> str:
        return self.data.train_modality

    @property
    def exploration_active(self) -> bool:
        """Exploration runs only for kepo with exploration enabled (KEPO-KE = kepo without it)."""
        return self.algorithm.spec.explores and self.rollout.exploration.enabled

    @property
    def method_label(self) -> str:
        if self.algorithm.label:
            return self.algorithm.label
        mode = "thinking" if self.prompts.thinking else "non-thinking"
        return self.algorithm.spec.method_label(
            self.algorithm, explores=self.exploration_active, mode=mode
        )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


# ---------------------------------------------------------------------------------- loading
class ConfigError(ValueError):
    """A configuration problem, explained in one line per problem."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling against `kepo config show`"
        elif e["type"] == "missing":
            msg = "required field is missing; add it"
        else:
            given = e.get("input")
            if given is not None and not isinstance(given, dict | list):
                msg = f"{msg} (got {given!r}); fix the value"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- TRL names
# A `trl:` section (or `--set trl.NAME=VALUE`) accepts TRL's GRPOConfig / GKDConfig names where
# they mean what the kepo setting means; the README's "Coming from TRL or verl" table lists them
# with the differences that remain (kepo's log-probs are raw, TRL divides logits by the sampling
# temperature). Each file (and the --set list) is translated on its own, before files are merged,
# so a `trl:` name in a run file overrides its base file like the kepo name would.
TRL_ALIASES: dict[str, str] = {
    "num_generations": "rollout.group_size",
    "max_completion_length": "rollout.sampling.max_new_tokens",
    "temperature": "rollout.sampling.temperature",
    "top_p": "rollout.sampling.top_p",
    "top_k": "rollout.sampling.top_k",
    "beta": "algorithm.kl_coef",
    "epsilon": "algorithm.clip_eps_low",
    "epsilon_high": "algorithm.clip_eps_high",
    "scale_rewards": "algorithm.scale_by_std",
    "loss_type": "algorithm.loss_aggregation",
    "lmbda": "algorithm.gkd_lambda",
    "num_iterations": "train.passes",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "learning_rate": "train.learning_rate",
    "weight_decay": "train.weight_decay",
    "warmup_steps": "train.warmup_steps",
    "max_grad_norm": "train.max_grad_norm",
    "gradient_checkpointing": "train.gradient_checkpointing",
}

# TRL names (or values) that are not aliases, and why: what to write instead.
TRL_NOT_ALIASED: dict[str, str] = {
    "scale_rewards=batch": "kepo scales advantages by the group std only (algorithm.scale_by_std)",
    "loss_type=bnpo": "kepo normalises by the tokens of the whole optimizer step, never of one "
    "micro-batch; loss_type dapo (algorithm.loss_aggregation: token_mean) is that",
    "loss_type=dr_grpo": "TRL divides the token sum by max_completion_length; the nearest kepo "
    "setting, algorithm.loss_aggregation: seq_mean_token_sum, does not",
    "delta": "no two-sided clip bound in kepo",
    "importance_sampling_level": "kepo's ratios are per token",
    "mask_truncated_completions": "kepo trains on truncated completions (finish_reason = length)",
    "steps_per_generation": "one rollout per iteration; its rows are cut into optimizer steps of "
    "train.micro_batch_size x train.grad_accum_steps x processes",
    "generation_batch_size": "rollout.prompts_per_iteration x rollout.group_size rows per rollout",
    "num_train_epochs": "a run is `iterations` rollout -> train cycles",
    "max_steps": "a run is `iterations` rollout -> train cycles",
    "max_prompt_length": "prompts are not truncated",
    "lr_scheduler_type": "train.lr_schedule (constant keeps train.warmup_steps, like "
    "constant_with_warmup)",
    "bf16": "train.mixed_precision: bf16",
}

_TRL_VALUES: dict[str, dict[Any, Any]] = {
    "scale_rewards": {True: True, "group": True, False: False, "none": False},
    "loss_type": {"grpo": "seq_mean_token_mean", "dapo": "token_mean"},
}


def _trl_value(name: str, value: Any, source: str) -> Any:
    table = _TRL_VALUES.get(name)
    if table is None:
        return value
    key = value.lower() if isinstance(value, str) else value
    if isinstance(key, bool | str) and key in table:
        return table[key]
    why = TRL_NOT_ALIASED.get(f"{name}={key}")
    known = ", ".join(str(k) for k in table)
    raise ConfigError(
        f"{source}: trl.{name}: {value!r} has no kepo equivalent"
        + (f" ({why})" if why else "")
        + f"; use one of {known}, or set {TRL_ALIASES[name]} directly"
    )


def _get_dotted(data: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def trl_settings(names: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """TRL names -> ({kepo dotted field: value}, {field: value implied unless given}).

    One-line ConfigError for a name or value without a kepo equivalent. Implied: `epsilon`
    without `epsilon_high` sets both clip bounds (TRL's epsilon_high defaults to epsilon), and
    either turns clipping on (TRL always clips)."""
    if not isinstance(names, dict):
        raise ConfigError(f"{source}: trl: must be a mapping of TRL setting names to values")
    settings: dict[str, Any] = {}
    for name, value in names.items():
        if name not in TRL_ALIASES:
            why = TRL_NOT_ALIASED.get(name)
            raise ConfigError(
                f"{source}: trl.{name}: "
                + (f"not an alias ({why})" if why else "not a TRL name kepo knows")
                + f"; TRL names accepted: {', '.join(TRL_ALIASES)}"
            )
        settings[TRL_ALIASES[name]] = _trl_value(name, value, source)
    implied: dict[str, Any] = {}
    if "epsilon" in names or "epsilon_high" in names:
        implied["algorithm.clip"] = True
    if "epsilon" in names and "epsilon_high" not in names:
        implied["algorithm.clip_eps_high"] = settings["algorithm.clip_eps_low"]
    return settings, implied


def _alias_disagrees(field: str, value: Any, given: Any, source: str) -> ConfigError:
    name = next(n for n, f in TRL_ALIASES.items() if f == field)
    return ConfigError(
        f"{source}: trl.{name} sets {field} = {value!r} but {field} is also given as "
        f"{given!r}; keep one of the two"
    )


def resolve_trl_section(data: dict[str, Any], source: str) -> dict[str, Any]:
    """One config layer with its `trl:` section written as kepo fields (an alias and its field
    given with different values is an error)."""
    if "trl" not in data:
        return data
    data = dict(data)
    settings, implied = trl_settings(data.pop("trl") or {}, source)
    for field, value in settings.items():
        present, given = _get_dotted(data, field)
        if present and given != value:
            raise _alias_disagrees(field, value, given, source)
        set_dotted(data, field, value)
    for field, value in implied.items():
        if not _get_dotted(data, field)[0]:
            set_dotted(data, field, value)
    return data


def resolve_trl_overrides(overrides: dict[str, Any], source: str = "--set") -> dict[str, Any]:
    """Dotted overrides with `trl.NAME` keys written as kepo fields (same rules as the section)."""
    trl = {k.removeprefix("trl."): v for k, v in overrides.items() if k.startswith("trl.")}
    out = {k: v for k, v in overrides.items() if not k.startswith("trl.")}
    settings, implied = trl_settings(trl, source)
    for field, value in settings.items():
        if field in out and out[field] != value:
            raise _alias_disagrees(field, value, out[field], source)
        out[field] = value
    for field, value in implied.items():
        out.setdefault(field, value)
    return out


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a config mapping; raises ConfigError with one line per problem."""
    data = resolve_trl_section(data, source)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML run config; `overrides` maps dotted keys (e.g. 'rollout.group_size') to values.

    `base:` (one file or a list, relative to the file naming it) composes a run from layers, e.g.
    a method and a scale: `base: [../methods/kepo-tau1.yaml, _scale.yaml]` merges the method
    file (over its own bases), then the scale overlay, then this file; later layers win. A file
    that sets no `run_id` of its own runs under its file name (stem).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such config file; pass a YAML file such as configs/demo/kepo.yaml"
        )
    own = read_yaml_mapping(path)
    data = read_layered_yaml(path)
    if "run_id" not in own:
        data["run_id"] = path.stem
    for key, value in resolve_trl_overrides(overrides or {}).items():
        set_dotted(data, key, value)
    return parse_config(data, str(path))


def read_yaml_mapping(path: Path, error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """One YAML file as a mapping; malformed YAML or another top level is one-line `error`."""
    if not path.is_file():
        raise error(f"{path}: no such file; fix the path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise error(
            f"{path}:{where} malformed YAML ({problem}); fix the indentation or quoting there"
        ) from None
    if not isinstance(data, dict):
        raise error(
            f"{path}: the top level must be a mapping of settings, got {type(data).__name__}"
        )
    return data


def read_layered_yaml(
    path: Path,
    *,
    error: type[ValueError] = ConfigError,
    relative_keys: tuple[str, ...] = (),
    _seen: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """A YAML mapping merged over its `base:` layers (a path or a list of paths, relative to the
    file; earlier layers first, the file itself last). A cycle, a missing base or malformed YAML
    is a one-line `error` naming the file. `relative_keys`: path values made relative to the file
    that sets them (a top-level key such as a study's base_config, or `list[].field`)."""
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise error(f"{path}: `base:` layers form a cycle ({chain}); remove one of them")
    data = resolve_trl_section(read_yaml_mapping(path, error), str(path))
    for key in relative_keys:
        _make_relative(data, key, path.parent)
    parents = data.pop("base", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise error(f"{path}: `base:` must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for parent in parents:
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise error(
                f"{path}: base {parent_path} does not exist; fix the 'base:' path (relative to "
                "the file that names it)"
            )
        layer = read_layered_yaml(
            parent_path, error=error, relative_keys=relative_keys, _seen=(*_seen, path.resolve())
        )
        merged = deep_merge(merged, layer)
    return deep_merge(merged, data)


def _make_relative(data: dict[str, Any], key: str, folder: Path) -> None:
    """Make the path at `key` relative to `folder`: a top-level key, or `list[].field` for a field
    of each mapping in a top-level list (e.g. a study's `methods[].method`)."""
    if "[]." in key:
        list_key, field_name = key.split("[].", 1)
        for entry in data.get(list_key) or []:
            if isinstance(entry, dict):
                _make_relative(entry, field_name, folder)
        return
    value = data.get(key)
    if isinstance(value, str) and not Path(value).is_absolute():
        data[key] = os.path.normpath(folder / value)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[last] = value


def config_from_json(text: str) -> RunConfig:
    return parse_config(json.loads(text), "stored config")


def describe_fields(
    model: type[BaseModel] = RunConfig, prefix: str = ""
) -> list[tuple[str, str, str]]:
    """(dotted name, default, description) for every field, for `kepo config show`."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        dotted = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append((dotted, "", field.description or ""))
            rows.extend(describe_fields(ann, dotted + "."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((dotted, repr(default), field.description or ""))
    return rows


__all__ = [
    "AlgorithmConfig",
    "ConfigError",
    "CurationConfig",
    "RunConfig",
    "config_from_json",
    "describe_fields",
    "load_config",
    "parse_config",
    "read_layered_yaml",
    "read_yaml_mapping",
]
