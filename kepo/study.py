"""The learning-cliff study: every method on one hard in-domain modality, several seeds each.

A study config (`configs/study-*.yaml`, loaded into `StudyConfig`) names a base run config, the
in-domain modality and the difficulty it is rendered with, the methods (each a name plus config
overrides), the seeds, the number of iterations, the warm-up and the evaluation cap.
`plan_runs(study)` turns it into one run config per (method, seed), all in one workdir and so
one DuckDB file; `flows/study.py` runs them (`kepo study`).

Choices
-------
- One curated dataset and one warmed-up model pair serve every run: seeds vary the RL part
  (sampling, batch order, training shuffles), not the warm-up, so the spread over seeds is the
  spread of the method, not of its starting point.
- Seed s sets a run's master seed and `train.seed`. Derived seeds also hash the run id
  (`kepo.run.Run.seed`), so two methods with the same seed see the same training questions in a
  different order and draw different samples; the seed is a replicate index, not a shared
  random stream.
- Run ids are `<study>-<method>-s<seed>`; every run carries a `study` tag in its config
  (name, method, seed, role), which is how the summary queries and the report find its runs.
- The teacher can be evaluated as a reference run (`evaluate_teacher`: role `teacher`, zero
  iterations), so the report shows that the teacher knows the in-domain answers.
- With greedy evaluation every run's checkpoint 0 is the same warmed-up student answering the
  same items, so its predictions are computed once and copied to the other runs
  (`share_initial_eval`); the evaluation stage still runs for each and finds them complete.

Summary queries (the named queries `dashboards/study_*.sql`, study runs found by their tag):
- `summary_table` (`study_summary`): per method, mean and sample standard deviation over seeds of in-domain
  accuracy, the OOD average and the overall average at each run's last evaluated checkpoint.
- `curves` (`study_curves`): the same per evaluated checkpoint (Figure 2 style).
- `all_zero_rates` (`study_all_zero`): per method and iteration, the share of prompts whose G on-policy samples
  all have accuracy reward 0 (`prompts.n_policy_correct = 0`), pooled over seeds: the learning
  cliff, measured before exploration injects anything.
- `exploration_rates` (`study_exploration`): per method and iteration, prompts that triggered exploration and the
  share of those that got at least one hint-aware trajectory injected (acceptance).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kepo.config import (
    ConfigError,
    DifficultyConfig,
    Modality,
    load_config,
    read_layered_yaml,
)
from kepo.queries import run_query
from kepo.store import Store

# Keys the study sets on every run; neither the study's nor a method's overrides may set them.
RESERVED_KEYS = (
    "run_id",
    "workdir",
    "seed",
    "iterations",
    "train.seed",
    "data.out_dir",
    "data.train_modality",
    "data.bundled.difficulty",
    "models.student",
    "models.teacher",
    "models.torch_threads",
    "study",
)
# Every run shares one curated dataset and one evaluation protocol: methods may not change them.
METHOD_RESERVED_KEYS = (*RESERVED_KEYS, "data", "eval")
TEACHER_METHOD = "teacher"


class StudyError(ValueError):
    """A study config that cannot be run as written (the message says how to fix it)."""


def _f(description: str, default: Any = ..., **kw: Any) -> Any:
    return Field(default, description=description, **kw)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudyWarmup(_Model):
    """The supervised warm-up of the tiny pair (`kepo.warmup`), shared by every run."""

    student_steps: int = _f(
        "Warm-up steps of the student (out-of-domain modalities only).", 300, ge=1
    )
    teacher_steps: int = _f("Warm-up steps of the teacher (every modality).", 300, ge=1)
    seed: int = _f("Seed of the tiny models' weights and the warm-up example order.", 0)


class StudyMethod(_Model):
    """One compared method: a name, the method file it runs (configs/methods/), and overrides."""

    name: str = _f("Method name (part of the run ids).", pattern=r"^[A-Za-z0-9_-]+$")
    method: Path | None = _f(
        "The method's run config (e.g. methods/kepo-tau1.yaml, relative to the study file): its "
        "algorithm, gate, exploration and thinking mode define the method; the study's "
        "base_config is layered over it as the scale, then the study's overrides, then this "
        "method's. Unset: the method is base_config plus its overrides.",
        default=None,
    )
    overrides: dict[str, Any] = _f(
        "Run-config overrides (nested mappings or dotted keys) on top of the study's.",
        default_factory=dict,
    )


class StudyConfig(_Model):
    """A learning-cliff study: methods x seeds on one in-domain modality, one DuckDB file."""

    name: str = _f(
        "Study name: prefix of its run ids and its tag in the runs table.",
        pattern=r"^[A-Za-z0-9_-]+$",
    )
    description: str = _f("Free text kept with the study.", "")
    base_config: Path = _f("Run config every run starts from (relative to the study file).")
    workdir: Path = _f(
        "Study directory: data, models, kepo.duckdb, checkpoints, report.html.", Path("work/study")
    )
    in_domain: Modality = _f("The modality the student is trained on.")
    difficulty: DifficultyConfig = _f(
        "Difficulty the in-domain modality is rendered with (bundled data).",
        default_factory=DifficultyConfig,
    )
    iterations: int = _f("Training iterations of every run.", 4, ge=0)
    seeds: list[int] = _f(
        "Seeds; each method runs once per seed.", default_factory=lambda: [0], min_length=1
    )
    warmup: StudyWarmup = _f(
        "Warm-up of the tiny student and teacher.", default_factory=StudyWarmup
    )
    eval_items_per_modality: int | None = _f(
        "Test items per modality at each evaluation (None = the base config's cap).", None, ge=1
    )
    torch_threads: int = _f("torch.set_num_threads for every stage (1 on a shared CPU).", 1, ge=1)
    evaluate_teacher: bool = _f("Evaluate the teacher once as a reference run.", True)
    share_initial_eval: bool = _f(
        "Compute checkpoint 0's greedy evaluation once and copy it to the other runs.", True
    )
    overrides: dict[str, Any] = _f(
        "Run-config overrides applied to every run.", default_factory=dict
    )
    methods: list[StudyMethod] = _f("The compared methods, in report order.", min_length=1)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds {seeds} repeat a value; list each seed once")
        return seeds

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, methods: list[StudyMethod]) -> list[StudyMethod]:
        names = [m.name for m in methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"method names {dup} appear more than once; give each a new name")
        if TEACHER_METHOD in names:
            raise ValueError(f"method name {TEACHER_METHOD!r} is reserved for the reference run")
        return methods

    # ------------------------------------------------------------------ derived
    def run_id(self, method: str, seed: int) -> str:
        return f"{self.name}-{method}-s{seed}"

    @property
    def teacher_run_id(self) -> str:
        return f"{self.name}-{TEACHER_METHOD}"

    @property
    def curated_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def db_path(self) -> Path:
        return self.workdir / "kepo.duckdb"

    @property
    def report_path(self) -> Path:
        return self.workdir / "report.html"


class PlannedRun(NamedTuple):
    """One run of a study: `kepo_run(config_path, overrides=overrides)` runs it."""

    run_id: str
    config_path: str
    overrides: dict[str, Any]


# ------------------------------------------------------------------------------ loading
def _read_study_file(path: Path) -> dict[str, Any]:
    """One study file merged over its `base:` chain; base_config made relative to each file."""
    if not path.is_file():
        raise StudyError(f"{path}: no such study file; pass one such as configs/study-tiny.yaml")
    return read_layered_yaml(
        path, error=StudyError, relative_keys=("base_config", "methods[].method")
    )


def load_study(path: str | Path, *, workdir: str | Path | None = None) -> StudyConfig:
    """Load a study YAML (`base_config` is relative to the file that names it).

    A study file may start from another (`base: study-tiny.yaml`): mappings merge, this file's
    values win, lists (seeds, methods) are replaced whole.
    """
    path = Path(path)
    data = _read_study_file(path)
    if workdir is not None:
        data["workdir"] = str(workdir)
    try:
        study = StudyConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown field; check its spelling against kepo/study.py StudyConfig"
            lines.append(f"{path}: {loc}: {msg}")
        raise StudyError("\n".join(lines)) from None
    if not study.base_config.is_file():
        raise StudyError(
            f"{path}: base_config {study.base_config} does not exist; fix the path "
            "(it is relative to the study file that sets it)"
        )
    for method in study.methods:
        if method.method is not None and not method.method.is_file():
            raise StudyError(
                f"{path}: methods.{method.name}.method {method.method} does not exist; fix the "
                "path (it is relative to the study file that sets it), e.g. "
                "methods/kepo-tau1.yaml"
            )
    checks = [("overrides", study.overrides, RESERVED_KEYS)] + [
        (f"methods.{m.name}.overrides", m.overrides, METHOD_RESERVED_KEYS) for m in study.methods
    ]
    for source, overrides, reserved in checks:
        for key in flatten_overrides(overrides):
            hit = next((r for r in reserved if key == r or key.startswith(r + ".")), None)
            if hit:
                raise StudyError(
                    f"{path}: {source}: {key!r} may not be set here ({hit} is fixed by the "
                    "study for every run); use the study's own fields or its common overrides"
                )
    return study


def flatten_overrides(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested override mappings as dotted keys (leaves are non-mapping values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_overrides(value, dotted + "."))
        else:
            out[dotted] = value
    return out


# ------------------------------------------------------------------------------ planning
def model_dirs(study: StudyConfig) -> dict[str, Path]:
    """Where `kepo.demo.prepare_models` puts the warmed-up pair of this study."""
    from kepo.demo import model_dirs as demo_model_dirs

    return demo_model_dirs(study.workdir)


# What a method file defines; the study's scale (base_config) must leave these to the method.
METHOD_DEFINING_KEYS = (
    "algorithm.name",
    "algorithm.gkd_lambda",
    "algorithm.distill.gate.tau",
    "rollout.exploration.enabled",
    "prompts.thinking",
)


def scale_overrides(study: StudyConfig) -> dict[str, Any]:
    """base_config as dotted overrides laid over a method file (the run id is the study's); a
    key that defines the method is refused rather than silently overriding it."""
    layer = flatten_overrides(read_layered_yaml(study.base_config, error=StudyError))
    for key in layer:
        if key in METHOD_DEFINING_KEYS:
            raise StudyError(
                f"{study.base_config}: sets {key!r}, which the study's method files define; "
                "remove it from the scale config (set it in a method's overrides instead)"
            )
    return {k: v for k, v in layer.items() if k != "run_id"}


def shared_overrides(study: StudyConfig) -> dict[str, Any]:
    """Overrides every run of the study gets (data, models, schedule, evaluation cap)."""
    dirs = model_dirs(study)
    out = flatten_overrides(study.overrides)
    out.update(
        {
            "workdir": str(study.workdir),
            "iterations": study.iterations,
            "data.out_dir": str(study.curated_dir),
            "data.train_modality": study.in_domain,
            # One dotted key for the whole entry: the other modalities keep the base config's.
            f"data.bundled.difficulty.{study.in_domain}": study.difficulty.model_dump(),
            "models.student": str(dirs["student"]),
            "models.teacher": str(dirs["teacher"]),
            "models.torch_threads": study.torch_threads,
        }
    )
    if study.eval_items_per_modality is not None:
        out["eval.max_items_per_modality"] = study.eval_items_per_modality
    return out


def plan_runs(study: StudyConfig) -> list[PlannedRun]:
    """One run per (method, seed), methods in config order, seeds inner; each config validated."""
    common = shared_overrides(study)
    plan = []
    for method in study.methods:
        for seed in study.seeds:
            run_id = study.run_id(method.name, seed)
            overrides = {
                **common,
                **flatten_overrides(method.overrides),
                "run_id": run_id,
                "seed": seed,
                "train.seed": seed,
                "study": {
                    "name": study.name,
                    "method": method.name,
                    "seed": seed,
                    "role": "method",
                },
            }
            if method.method is None:
                plan.append(PlannedRun(run_id, str(study.base_config), overrides))
            else:
                # method x scale: the method file, then base_config as the scale overlay.
                overrides = {**scale_overrides(study), **overrides}
                plan.append(PlannedRun(run_id, str(method.method), overrides))
    for planned in plan:
        try:
            load_config(planned.config_path, overrides=planned.overrides)
        except ConfigError as err:
            raise StudyError(f"run {planned.run_id}: {err}") from None
    return plan


def teacher_run(study: StudyConfig) -> PlannedRun:
    """The reference run: the warmed-up teacher evaluated as policy version 0, no training."""
    common = shared_overrides(study)
    overrides = {
        **common,
        "run_id": study.teacher_run_id,
        "seed": study.warmup.seed,
        "iterations": 0,
        "models.student": common["models.teacher"],
        "algorithm.name": "grpo",
        "algorithm.label": "Teacher (reference)",
        "rollout.exploration.enabled": False,
        "study": {
            "name": study.name,
            "method": TEACHER_METHOD,
            "seed": study.warmup.seed,
            "role": "teacher",
        },
    }
    return PlannedRun(study.teacher_run_id, str(study.base_config), overrides)


def share_initial_evaluation(store: Store, source_run: str, target_run: str) -> int:
    """Copy checkpoint 0's eval_predictions of `source_run` to `target_run`; returns the rows.

    Only valid when both runs answer the same items greedily from the same student with the
    same prompts and lengths (checked; a clear error otherwise). The target's evaluation stage
    then finds every modality complete and only recomputes its metrics.
    """
    from kepo.evaluate import select_items

    source = store.run_config(source_run)
    target = store.run_config(target_run)
    if not (source.eval.greedy and target.eval.greedy):
        raise StudyError("share_initial_eval needs greedy evaluation (eval.greedy: true)")
    same = (
        Path(source.models.student) == Path(target.models.student)
        and source.eval.sampling.max_new_tokens == target.eval.sampling.max_new_tokens
        and source.eval.max_items_per_modality == target.eval.max_items_per_modality
        and source.prompts == target.prompts
        and Path(source.data.out_dir) == Path(target.data.out_dir)
        and source.models.dtype == target.models.dtype
    )
    if not same:
        raise StudyError(
            f"runs {source_run} and {target_run} differ in student, prompts, data or evaluation "
            "settings, so checkpoint 0's predictions cannot be shared; set share_initial_eval: false"
        )
    from kepo.dataset import QuestionSet

    wanted = select_items(QuestionSet(target.data.out_dir).test, target.eval.max_items_per_modality)
    expected = sum(len(v) for v in wanted.values())
    rows = store.read("eval_predictions", {"run_id": source_run, "iteration": 0})
    if rows.num_rows != expected:
        raise StudyError(
            f"run {source_run}: checkpoint 0 has {rows.num_rows} predictions, expected {expected}; "
            "let its evaluation finish before sharing it"
        )
    copied = [dict(r, run_id=target_run) for r in rows.to_pylist()]
    store.replace_rows({"eval_predictions": copied}, where={"run_id": target_run, "iteration": 0})
    return len(copied)


# ------------------------------------------------------------------------------ summary
def _rows(store: Store, query: str, study: str, role: str = "method") -> list[dict[str, Any]]:
    return run_query(store, query, {"study": study, "role": role}).to_pylist()


def study_names(store: Store, runs: list[str] | None = None) -> list[str]:
    """Names of the studies with runs in the store (among `runs` when given), first-run order."""
    rows = run_query(store, "studies").to_pylist()
    names: list[str] = []
    for r in rows:
        if (runs is None or r["run_id"] in runs) and r["study"] not in names:
            names.append(r["study"])
    return names


def study_runs(store: Store, study: str, *, role: str = "method") -> list[dict[str, Any]]:
    """run_id, method, seed, method_label, in_domain_modality of the study's runs of `role`."""
    return _rows(store, "study_runs", study, role)


def summary_table(store: Store, study: str) -> list[dict[str, Any]]:
    """One row per method: mean and SD over seeds at each run's last checkpoint (accuracy %)."""
    return _rows(store, "study_summary", study)


def reference_table(store: Store, study: str) -> list[dict[str, Any]]:
    """The teacher reference run's accuracies, in the summary table's columns (no SD)."""
    return _rows(store, "study_summary", study, TEACHER_METHOD)


def curves(store: Store, study: str) -> list[dict[str, Any]]:
    """Per method and evaluated checkpoint: mean and SD over seeds of ID and OOD accuracy (%)."""
    return _rows(store, "study_curves", study)


def all_zero_rates(store: Store, study: str) -> list[dict[str, Any]]:
    """Per method and iteration: share of prompts whose G policy samples were all wrong."""
    return _rows(store, "study_all_zero", study)


def exploration_rates(store: Store, study: str) -> list[dict[str, Any]]:
    """Per method and iteration: prompts triggered and the share with a trajectory injected."""
    return _rows(store, "study_exploration", study)


__all__ = [
    "PlannedRun",
    "StudyConfig",
    "StudyError",
    "StudyMethod",
    "StudyWarmup",
    "all_zero_rates",
    "curves",
    "exploration_rates",
    "flatten_overrides",
    "load_study",
    "plan_runs",
    "reference_table",
    "share_initial_evaluation",
    "shared_overrides",
    "study_names",
    "study_runs",
    "summary_table",
    "teacher_run",
]
