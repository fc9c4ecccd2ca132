"""Typed run configuration, loaded from YAML (`configs/*.yaml`).

Every field carries a one-line description (shown by `kepo config show`), and every validation
error is turned into one line that names the field and says how to fix it (`ConfigError`).
Derived values are properties, not settings. The resolved config of a run is stored in the
`runs` table (`kepo.store.Store.register_run`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
        "Teacher decoding for hints.",
        default_factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=256),
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


class RolloutConfig(_Section):
    """The rollout stage."""

    backend: Literal["hf", "vllm"] = _f(
        "Generation backend: Hugging Face generate (CPU/GPU) or vLLM (GPU).", "hf"
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
    vllm_gpu_memory_utilization: float = _f(
        "vLLM: fraction of GPU memory for the engine.", 0.5, gt=0.0, le=1.0
    )


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
    gate: GateConfig = _f("Quality gate.", default_factory=GateConfig)


class AlgorithmConfig(_Section):
    """Which objective is optimised and its coefficients."""

    name: Literal["grpo", "rloo", "kepo", "gkd", "sft"] = _f("Training algorithm.", "kepo")
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
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = _f(
        "How per-token losses are reduced.", "token_mean"
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

    @property
    def advantage_estimator(self) -> Literal["grpo", "rloo"]:
        if self.advantage is not None:
            return self.advantage
        return "rloo" if self.name == "rloo" else "grpo"

    @property
    def uses_teacher(self) -> bool:
        return self.name in ("kepo", "gkd")


# ---------------------------------------------------------------------------------- training
class TrainConfig(_Section):
    """The training step."""

    learning_rate: float = _f("AdamW learning rate.", 2e-6, gt=0.0)
    weight_decay: float = _f("AdamW weight decay.", 0.0, ge=0.0)
    adam_betas: tuple[float, float] = _f("AdamW betas.", (0.9, 0.999))
    lr_schedule: Literal["constant", "linear", "cosine"] = _f(
        "Learning-rate schedule over the run's optimizer steps.", "constant"
    )
    warmup_steps: int = _f("Linear warm-up steps.", 0, ge=0)
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
    save_optimizer: bool = _f("Save optimizer and scheduler state with each checkpoint.", True)
    sft_epochs: int = _f("SFT: passes over the iteration's prompts' targets.", 1, ge=1)


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
        if self.algorithm.uses_teacher and self.models.teacher is None:
            raise ValueError(
                f"algorithm.name={self.algorithm.name!r} needs a teacher: set models.teacher to a "
                "local model folder, or choose algorithm.name grpo/rloo/sft"
            )
        if self.rollout.exploration.inject_k > self.rollout.group_size:
            raise ValueError(
                f"rollout.exploration.inject_k ({self.rollout.exploration.inject_k}) exceeds "
                f"rollout.group_size ({self.rollout.group_size}): lower inject_k or raise group_size"
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
        return self.algorithm.name == "kepo" and self.rollout.exploration.enabled

    @property
    def method_label(self) -> str:
        if self.algorithm.label:
            return self.algorithm.label
        a = self.algorithm
        mode = "thinking" if self.prompts.thinking else "non-thinking"
        if a.name == "kepo":
            base = "KEPO" if self.exploration_active else "KEPO-KE"
            return f"{base} (τ={a.distill.gate.tau:g}, {mode})"
        if a.name == "gkd":
            return f"MM-GKD (λ={a.gkd_lambda:g}, {mode})"
        return f"{a.name.upper()} ({mode})"

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


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a config mapping; raises ConfigError with one line per problem."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML run config; `overrides` maps dotted keys (e.g. 'rollout.group_size') to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such config file; pass a YAML file such as configs/demo-kepo.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"{path}:{where}: malformed YAML ({problem}); fix the indentation or quoting there"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of settings, got {type(data).__name__}"
        )
    data = _resolve_includes(data, path.parent)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return parse_config(data, str(path))


def _resolve_includes(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """`base: other.yaml` at the top level merges that file first (this file wins)."""
    parent = data.pop("base", None)
    if parent is None:
        return data
    parent_path = base / parent
    if not parent_path.is_file():
        raise ConfigError(
            f"base: {parent_path} does not exist; fix the 'base:' path (relative to the config file)"
        )
    parent_data = yaml.safe_load(parent_path.read_text()) or {}
    parent_data = _resolve_includes(parent_data, parent_path.parent)
    return deep_merge(parent_data, data)


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
]
