"""Every table kepo writes, declared once. See `schemas/core.py` for what is derived from this.

Per-iteration tables are partitioned by (run_id, iteration): rerunning a stage replaces its
partition. `questions` and `rejects` are the curated Parquet files (not in DuckDB).
"""

from __future__ import annotations

from schemas.core import Col, Table, run_partition_cols

MODALITIES = ("MRI", "CT", "X-Ray", "Ultrasound", "Dermoscopy", "Fundus", "OCT", "Microscopy")
QUESTION_TYPES = (
    "Anatomy Identification",
    "Disease Diagnosis",
    "Lesion Grading",
    "Modality Recognition",
    "Other Biological Attributes",
)
LETTERS = ("A", "B", "C", "D", "E", "F")
STAGES = ("curate", "rollout", "train", "evaluate")

RUN_ID, ITERATION = run_partition_cols()
PROMPT_ID = Col("prompt_id", "string", "The curated question_id this prompt was built from.")

# ---------------------------------------------------------------- curated data (Parquet)
QUESTIONS = Table(
    name="questions",
    description="One curated multiple-choice VQA item (train.parquet / test.parquet).",
    storage="parquet",
    key=("question_id",),
    columns=(
        Col(
            "question_id",
            "string",
            "Unique question id (source id, prefixed by dataset when needed).",
        ),
        Col("dataset", "string", "Source dataset name (the QA JSON file stem)."),
        Col("modality", "string", "One of the paper's eight modality names.", isin=MODALITIES),
        Col(
            "question_type",
            "string",
            "One of the five OmniMedVQA question types.",
            isin=QUESTION_TYPES,
        ),
        Col("question", "string", "Question text."),
        Col("options", "list<string>", "Option texts in order A, B, ... (2 to 6)."),
        Col("gold_letter", "string", "Letter of the correct option.", isin=LETTERS),
        Col("gold_text", "string", "Text of the correct option."),
        Col("image_path", "string", "Image path relative to the dataset root."),
        Col("image_sha256", "string", "sha256 of the image file bytes."),
        Col("image_width", "int32", "Image width in pixels (source file).", ge=1),
        Col("image_height", "int32", "Image height in pixels (source file).", ge=1),
        Col(
            "image_bytes",
            "binary",
            "Resized image (PNG) when curated with --embed-images.",
            nullable=True,
        ),
        Col(
            "image_source",
            "string",
            "'real' (a real medical image) or 'synthetic'.",
            isin=("real", "synthetic"),
        ),
        Col("split", "string", "'train' or 'test'.", isin=("train", "test")),
        Col("rationale", "string", "Reference rationale (bundled data only).", nullable=True),
        Col("reference_hint", "string", "Reference hint (bundled data only).", nullable=True),
        Col(
            "difficulty",
            "string",
            "Difficulty preset the item was generated with (bundled data only).",
            nullable=True,
        ),
        Col("source_file", "string", "QA JSON file the record came from, relative to the root."),
    ),
)

REJECTS = Table(
    name="rejects",
    description="A source record that failed curation, with the reason (rejects.parquet).",
    storage="parquet",
    key=("source_file", "record_index", "reason"),
    columns=(
        Col("source_file", "string", "QA JSON file the record came from, relative to the root."),
        Col("record_index", "int32", "Position of the record in its JSON list.", ge=0),
        Col("question_id", "string", "question_id of the record, when it has one.", nullable=True),
        Col("modality_raw", "string", "The record's modality string as found.", nullable=True),
        Col("reason", "string", "Reason code (see kepo/curate.py REJECT_REASONS)."),
        Col("offending_value", "string", "The value that failed the check.", nullable=True),
        Col("record_json", "string", "The whole source record as JSON."),
    ),
)

# ---------------------------------------------------------------- run bookkeeping
RUNS = Table(
    name="runs",
    description="One training run: its resolved configuration.",
    key=("run_id",),
    partition=("run_id",),
    columns=(
        RUN_ID,
        Col("created_at", "timestamp", "When the run was first registered (UTC)."),
        Col("updated_at", "timestamp", "When the config was last (re)written (UTC)."),
        Col("algorithm", "string", "Training algorithm (grpo, rloo, kepo, gkd, sft)."),
        Col("method_label", "string", "Human-readable method name for tables and plots."),
        Col(
            "in_domain_modality",
            "string",
            "Modality trained on (in-domain for evaluation).",
            isin=MODALITIES,
        ),
        Col("config_json", "string", "The resolved run configuration as JSON."),
        Col("config_sha256", "string", "sha256 of config_json."),
        Col("kepo_version", "string", "kepo package version that wrote the run."),
    ),
)

STAGES_TABLE = Table(
    name="stages",
    description="Progress of each stage of each iteration (resume reads it).",
    key=("run_id", "iteration", "stage"),
    partition=("run_id", "iteration"),
    columns=(
        RUN_ID,
        ITERATION,
        Col("stage", "string", "Stage name.", isin=STAGES),
        Col(
            "status",
            "string",
            "running / succeeded / failed.",
            isin=("running", "succeeded", "failed"),
        ),
        Col("started_at", "timestamp", "Start time (UTC)."),
        Col("finished_at", "timestamp", "End time (UTC).", nullable=True),
        Col(
            "error",
            "string",
            "Exception type, message and the last frames when failed.",
            nullable=True,
        ),
        Col("attempt", "int32", "How many times this stage has been started.", ge=1),
        Col(
            "lease_owner",
            "string",
            "host:pid:start-time of the process running the stage (its lease); NULL when done.",
            nullable=True,
        ),
    ),
)

# ---------------------------------------------------------------- rollout stage
PROMPTS = Table(
    name="prompts",
    description="One training prompt of an iteration's batch and whether exploration triggered.",
    key=("run_id", "iteration", "prompt_id"),
    partition=("run_id", "iteration"),
    columns=(
        RUN_ID,
        ITERATION,
        PROMPT_ID,
        Col("batch_position", "int32", "Position in the iteration's batch.", ge=0),
        Col("epoch", "int32", "Pass over the training set this prompt was drawn in.", ge=0),
        Col("modality", "string", "Modality of the item.", isin=MODALITIES),
        Col("question_type", "string", "Question type of the item.", isin=QUESTION_TYPES),
        Col("gold_letter", "string", "Correct option letter.", isin=LETTERS),
        Col("training_prompt", "string", "The plain prompt x the student is trained under."),
        Col(
            "sampling_seed",
            "int64",
            "Seed derived from (run, iteration, prompt) for this prompt's sampling.",
        ),
        Col(
            "n_policy_correct",
            "int32",
            "On-policy samples with accuracy reward 1 (NULL when the algorithm draws none: "
            "sft, gkd with λ = 0).",
            ge=0,
            nullable=True,
        ),
        Col(
            "max_trigger_reward",
            "float64",
            "Max over the G policy samples of the trigger reward part (NULL without samples).",
            nullable=True,
        ),
        Col("triggered", "bool", "Knowledge-enhanced exploration ran for this prompt."),
        Col(
            "trigger_reason",
            "string",
            "Why it triggered or not (e.g. all_zero_total, batch_scope, not_all_zero, "
            "exploration_off, no_policy_samples).",
            nullable=False,
        ),
        Col("n_attempts", "int32", "Hint-aware attempts made (each of K samples).", ge=0),
        Col(
            "n_injected", "int32", "Accepted hint-aware trajectories injected into the group.", ge=0
        ),
    ),
)

_REWARD_COLS = (
    Col("reward_format", "float64", "Format reward (0/1).", ge=0, le=1),
    Col("reward_accuracy", "float64", "Accuracy reward (0/1).", ge=0, le=1),
    Col("reward_total", "float64", "Format + accuracy.", ge=0, le=2),
    Col("parsed_answer", "string", "Letter extracted from <answer>, if any.", nullable=True),
    Col("parse_reason", "string", "Why no answer could be extracted, if so.", nullable=True),
)

ROLLOUTS = Table(
    name="rollouts",
    description="Every trajectory of an iteration: on-policy samples and injected hint-aware ones.",
    key=("run_id", "iteration", "prompt_id", "sample_idx"),
    partition=("run_id", "iteration"),
    columns=(
        RUN_ID,
        ITERATION,
        PROMPT_ID,
        Col(
            "sample_idx",
            "int32",
            "Row index within the prompt: 0..G-1 policy samples, G.. injected.",
            ge=0,
        ),
        Col(
            "slot",
            "int32",
            "Group slot 0..G-1 the row occupies (an injected row takes a replaced row's slot).",
            ge=0,
        ),
        Col(
            "source",
            "string",
            "'policy' (sampled under x) or 'hint' (hint-aware, injected).",
            isin=("policy", "hint"),
        ),
        Col("trained", "bool", "Whether the training step uses this row (exactly G per prompt)."),
        Col(
            "replaced_by",
            "int32",
            "sample_idx of the injected row that replaced this one.",
            nullable=True,
        ),
        Col(
            "attempt_id",
            "string",
            "hint_attempts.attempt_id this row came from (source 'hint').",
            nullable=True,
        ),
        Col("generation_prompt", "string", "Prompt text the completion was sampled under."),
        Col("completion_text", "string", "Decoded completion."),
        Col("completion_ids", "list<int32>", "Completion token ids (EOS included when generated)."),
        Col(
            "sampled_logprobs",
            "list<float64>",
            "Log-probs of the sampled tokens at generation time, under generation_prompt.",
        ),
        Col(
            "old_logprobs",
            "list<float64>",
            "Old-policy log-probs under the plain prompt (trained rows).",
            nullable=True,
        ),
        Col(
            "ref_logprobs",
            "list<float64>",
            "Reference-policy log-probs under the plain prompt (when the KL weight > 0).",
            nullable=True,
        ),
        *_REWARD_COLS,
        Col("advantage", "float64", "Group advantage (trained rows).", nullable=True),
        Col("gate_open", "bool", "Quality gate: distillation applies to this row."),
        Col("leak_flag", "bool", "Hint-aware output mentions the hint or the given answer."),
        Col("policy_version", "int32", "Checkpoint the sample came from.", ge=0),
        Col("finish_reason", "string", "'stop' (EOS) or 'length'.", isin=("stop", "length")),
        Col("n_tokens", "int32", "Number of completion tokens.", ge=0),
    ),
)

HINTS = Table(
    name="hints",
    description="The teacher hint written for a triggered prompt.",
    key=("run_id", "iteration", "prompt_id"),
    partition=("run_id", "iteration"),
    columns=(
        RUN_ID,
        ITERATION,
        PROMPT_ID,
        Col("teacher", "string", "Teacher model (folder name or id)."),
        Col("hint_prompt", "string", "Prompt the teacher was given (includes the answer)."),
        Col("raw_output", "string", "Teacher's raw output."),
        Col(
            "hint_text",
            "string",
            "Hint used in hint-aware prompts (NULL when none could be used).",
            nullable=True,
        ),
        Col("parse_ok", "bool", "Output had exactly one non-empty <hint>...</hint>."),
        Col("parse_reason", "string", "Why parsing failed, if it did.", nullable=True),
        Col(
            "malformed_rule",
            "string",
            "Rule applied to a malformed hint (see config rollout.malformed_hint).",
            nullable=True,
        ),
    ),
)

HINT_ATTEMPTS = Table(
    name="hint_attempts",
    description="Every hint-aware sample drawn during rejection sampling.",
    key=("run_id", "iteration", "prompt_id", "attempt_idx", "k_idx"),
    partition=("run_id", "iteration"),
    columns=(
        RUN_ID,
        ITERATION,
        PROMPT_ID,
        Col("attempt_id", "string", "Unique id '<prompt_id>/b<attempt_idx>/k<k_idx>'."),
        Col("attempt_idx", "int32", "Attempt b (0-based), at most budget B.", ge=0),
        Col("k_idx", "int32", "Sample index within the attempt (0..K-1).", ge=0),
        Col("generation_prompt", "string", "Hint-aware prompt the sample was drawn under."),
        Col("completion_text", "string", "Decoded completion."),
        Col("completion_ids", "list<int32>", "Completion token ids."),
        Col(
            "sampled_logprobs",
            "list<float64>",
            "Log-probs under the hint-aware prompt at generation time.",
        ),
        *_REWARD_COLS,
        Col(
            "accepted",
            "bool",
            "Passed acceptance (accuracy reward 1, and not rejected for leakage).",
        ),
        Col(
            "attempt_accepted",
            "bool",
            "The sample's attempt met the accept rule (any/all of its K samples accepted).",
        ),
        Col("injected", "bool", "Injected into the trained group."),
        Col("leak_flag", "bool", "Mentions the hint or the given answer."),
        Col("finish_reason", "string", "'stop' or 'length'.", isin=("stop", "length")),
    ),
)

TEACHER_TOPK = Table(
    name="teacher_topk",
    description="Teacher top-k log-probs per completion token, for gated-open trained rows (offline distillation).",
    key=("run_id", "iteration", "prompt_id", "sample_idx"),
    partition=("run_id", "iteration"),
    columns=(
        RUN_ID,
        ITERATION,
        PROMPT_ID,
        Col("sample_idx", "int32", "rollouts.sample_idx of the scored row.", ge=0),
        Col("teacher", "string", "Teacher model."),
        Col("k", "int32", "Support size per token.", ge=1),
        Col(
            "topk_ids",
            "list<list<int32>>",
            "Per completion token: the teacher's k most likely ids.",
        ),
        Col("topk_logprobs", "list<list<float64>>", "Per completion token: their log-probs."),
    ),
)

# ---------------------------------------------------------------- training stage
TRAIN_STEPS = Table(
    name="train_steps",
    description="One optimizer step of an iteration's training.",
    key=("run_id", "iteration", "step"),
    partition=("run_id", "iteration"),
    columns=(
        RUN_ID,
        ITERATION,
        Col("step", "int32", "Optimizer step within the iteration.", ge=0),
        Col("global_step", "int64", "Optimizer step over the whole run.", ge=0),
        Col("pass_idx", "int32", "Pass over the iteration's rollouts.", ge=0),
        Col("loss_total", "float64", "Total loss.", nullable=True),
        Col("loss_pg", "float64", "Policy-gradient term.", nullable=True),
        Col(
            "loss_distill", "float64", "Gated distillation term (or GKD divergence).", nullable=True
        ),
        Col("loss_kl", "float64", "Reference KL term (k3).", nullable=True),
        Col("loss_sft", "float64", "SFT cross-entropy.", nullable=True),
        Col(
            "clipfrac", "float64", "Fraction of tokens where the ratio was clipped.", nullable=True
        ),
        Col(
            "approx_kl",
            "float64",
            "Mean (old - new) log-prob, a policy-drift diagnostic.",
            nullable=True,
        ),
        Col(
            "entropy",
            "float64",
            "Mean token entropy (nats) of the policy over the step's completion tokens.",
            nullable=True,
        ),
        Col(
            "gate_frac_open", "float64", "Fraction of sequences whose gate is open.", nullable=True
        ),
        Col("grad_norm", "float64", "Gradient norm before clipping.", nullable=True),
        Col("lr", "float64", "Learning rate used."),
        Col("n_sequences", "int32", "Sequences in the step (all processes).", ge=0),
        Col("n_tokens", "int64", "Completion tokens in the step (all processes).", ge=0),
        Col("step_time_s", "float64", "Wall time of the step.", ge=0),
        Col("skipped", "bool", "Step skipped by the non-finite guard."),
        Col("skip_reason", "string", "Why it was skipped.", nullable=True),
    ),
)

CHECKPOINTS = Table(
    name="checkpoints",
    description="A saved policy: iteration k is the policy after k training iterations (0 = initial).",
    key=("run_id", "iteration"),
    partition=("run_id", "iteration"),
    columns=(
        RUN_ID,
        ITERATION,
        Col(
            "path", "string", "Hugging Face model folder (relative to the workdir when inside it)."
        ),
        Col(
            "optimizer_path",
            "string",
            "Optimizer/scheduler state file (with float32 master weights when the weights are "
            "saved in a lower precision); NULL once a newer version is recorded (only the newest "
            "keeps it) or with train.save_optimizer off.",
            nullable=True,
        ),
        Col("created_at", "timestamp", "When it was written (UTC)."),
        Col("n_params", "int64", "Trainable parameters.", ge=0),
        Col(
            "weights_dtype",
            "string",
            "dtype of the saved weights (train.save_dtype resolved); NULL on rows written before "
            "it was recorded.",
            nullable=True,
            isin=("float32", "bfloat16", "float16"),
        ),
        Col(
            "bytes_on_disk",
            "int64",
            "Bytes of the checkpoint folder now, optimizer state included (updated when the "
            "optimizer state is removed; 0 once pruned); NULL on rows written before it was "
            "recorded.",
            nullable=True,
            ge=0,
        ),
        Col(
            "optimizer_bytes",
            "int64",
            "Bytes of the optimizer state file while it exists, else NULL.",
            nullable=True,
            ge=0,
        ),
        Col(
            "pruned_at",
            "timestamp",
            "When train.keep_checkpoints deleted the folder (UTC); NULL while it exists. The row "
            "stays for audits; the weights are gone.",
            nullable=True,
        ),
    ),
)

# ---------------------------------------------------------------- evaluation stage
EVAL_PREDICTIONS = Table(
    name="eval_predictions",
    description="One test item answered by checkpoint `iteration` of a run.",
    key=("run_id", "iteration", "question_id"),
    partition=("run_id", "iteration"),
    columns=(
        RUN_ID,
        ITERATION,
        Col("question_id", "string", "Curated question id."),
        Col("modality", "string", "Modality.", isin=MODALITIES),
        Col("question_type", "string", "Question type.", isin=QUESTION_TYPES),
        Col("output_text", "string", "Model output."),
        Col("parsed_answer", "string", "Extracted letter.", nullable=True),
        Col("parse_reason", "string", "Why no letter could be extracted.", nullable=True),
        Col("gold_letter", "string", "Correct letter.", isin=LETTERS),
        Col("correct", "bool", "parsed_answer = gold_letter."),
        Col("reward_format", "float64", "Format reward of the output.", ge=0, le=1),
        Col("n_tokens", "int32", "Output tokens.", ge=0),
        Col(
            "model_sha256",
            "string",
            "Fingerprint of the evaluated weights (sha256 over the model folder's config and "
            "weight files); a rerun reuses predictions only with the same fingerprint.",
            nullable=True,
        ),
    ),
)

EVAL_METRICS = Table(
    name="eval_metrics",
    description="Accuracy per modality of checkpoint `iteration`, with a 95 % Wilson interval.",
    key=("run_id", "iteration", "modality"),
    partition=("run_id", "iteration"),
    columns=(
        RUN_ID,
        ITERATION,
        Col("modality", "string", "Modality.", isin=MODALITIES),
        Col("in_domain", "bool", "Modality equals the run's training modality."),
        Col("n", "int32", "Items evaluated.", ge=0),
        Col("n_correct", "int32", "Items answered correctly.", ge=0),
        Col("accuracy", "float64", "n_correct / n.", ge=0, le=1),
        Col("ci_low", "float64", "Wilson 95 % lower bound.", ge=0, le=1),
        Col("ci_high", "float64", "Wilson 95 % upper bound.", ge=0, le=1),
    ),
)

ALL_TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        QUESTIONS,
        REJECTS,
        RUNS,
        STAGES_TABLE,
        PROMPTS,
        ROLLOUTS,
        HINTS,
        HINT_ATTEMPTS,
        TEACHER_TOPK,
        TRAIN_STEPS,
        CHECKPOINTS,
        EVAL_PREDICTIONS,
        EVAL_METRICS,
    )
}
STORE_TABLES: dict[str, Table] = {n: t for n, t in ALL_TABLES.items() if t.storage == "duckdb"}


def get_table(name: str) -> Table:
    """The declared table called `name` (a clear error for unknown names)."""
    try:
        return ALL_TABLES[name]
    except KeyError:
        raise KeyError(
            f"unknown table {name!r}; declared tables: {', '.join(ALL_TABLES)}"
        ) from None
