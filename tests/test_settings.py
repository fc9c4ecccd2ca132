"""Every config in configs/methods/ carries the settings of configs/methods/settings.yaml (the
paper's Table 1 / Figure 2 settings with their sources), and SETTINGS.md is rendered from it."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kepo.config import RunConfig, load_config
from kepo.train import nominal_steps_per_iteration

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "configs" / "methods"


def _table_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "settings_table", ROOT / "scripts" / "settings_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TABLE = _table_module()
SETTINGS = TABLE.load()
ROWS = {row["config"]: row for row in SETTINGS["rows"]}


def _steps(cfg: RunConfig) -> int:
    return cfg.iterations * nominal_steps_per_iteration(cfg, 1)


def _eval(cfg: RunConfig) -> str:
    decoding = "greedy" if cfg.eval.greedy else f"T = {cfg.eval.sampling.temperature:g}"
    when = "final" if cfg.eval.every >= max(cfg.iterations, 1) else f"every {cfg.eval.every}"
    return f"{decoding}, {cfg.eval.sampling.max_new_tokens} tokens, {when}"


def _exploration(cfg: RunConfig) -> str:
    ex = cfg.rollout.exploration
    return (
        f"B = {ex.budget}, K = {ex.inject_k}, accept {ex.accept_rule}, "
        f"trigger per {ex.trigger_scope} on {ex.trigger_reward}"
    )


def _decoding(s: Any, with_tokens: bool) -> str:
    text = f"T = {s.temperature:g}, top-p = {s.top_p:g}"
    return f"{text}, {s.max_new_tokens} tokens" if with_tokens else text


def _teacher(cfg: RunConfig) -> str | None:
    return None if cfg.models.teacher is None else cfg.models.teacher.name.removesuffix("-Instruct")


# What each column reads from a resolved config.
ACCESSORS: dict[str, Callable[[RunConfig], Any]] = {
    "prompts_per_step": lambda c: c.rollout.prompts_per_iteration,
    "steps": _steps,
    "group_size": lambda c: c.rollout.group_size,
    "learning_rate": lambda c: c.train.learning_rate,
    "lr_schedule": lambda c: c.train.lr_schedule,
    "warmup": lambda c: c.train.warmup_steps_for(_steps(c)),
    "clip": lambda c: c.algorithm.clip,
    "kl_coef": lambda c: c.algorithm.kl_coef,
    "advantage": lambda c: (
        "(r - mean) / (std + 1e-4)"
        if c.algorithm.scale_by_std and c.algorithm.advantage_estimator == "grpo"
        else "other"
    ),
    "aggregation": lambda c: c.algorithm.aggregation,
    "gate": lambda c: (
        f"reward_{c.algorithm.distill.gate.reward_part} {c.algorithm.distill.gate.comparator} "
        f"{c.algorithm.distill.gate.tau:g}"
    ),
    "divergence": lambda c: (
        f"{c.algorithm.distill.divergence}, β = {c.algorithm.distill.jsd_beta:g}"
    ),
    "normalize": lambda c: c.algorithm.distill.normalize,
    "gkd_lambda": lambda c: c.algorithm.gkd_lambda,
    "exploration": _exploration,
    "hint_decoding": lambda c: _decoding(c.rollout.exploration.hint_sampling, True),
    "max_new_tokens": lambda c: c.rollout.sampling.max_new_tokens,
    "sampling": lambda c: _decoding(c.rollout.sampling, False),
    "thinking": lambda c: c.prompts.thinking,
    "teacher": _teacher,
    "eval": _eval,
}


def _columns_that_apply(cfg: RunConfig) -> set[str]:
    """The settings that mean something for this config's method."""
    name = cfg.algorithm.name
    if cfg.iterations == 0:  # evaluation only
        return {"thinking", "eval"}
    keys = {
        "prompts_per_step",
        "steps",
        "learning_rate",
        "lr_schedule",
        "warmup",
        "aggregation",
        "thinking",
        "eval",
    }
    if name in ("grpo", "rloo", "kepo"):
        keys |= {"group_size", "clip", "kl_coef", "advantage", "max_new_tokens", "sampling"}
    if name == "kepo":
        keys |= {"gate", "divergence", "normalize", "teacher"}
    if name == "gkd":
        keys |= {"gkd_lambda", "divergence", "teacher"}
        if cfg.algorithm.gkd_lambda > 0:  # the student's own samples are trained on
            keys |= {"max_new_tokens", "sampling"}
    if cfg.exploration_active:
        keys |= {"exploration", "hint_decoding"}
    return keys


CONFIGS = sorted(
    p.name for p in METHODS.glob("*.yaml") if p.name not in ("_common.yaml", "settings.yaml")
)


def test_every_method_config_has_a_settings_row_and_every_row_a_config() -> None:
    assert sorted(ROWS) == CONFIGS
    assert {key for key, _ in TABLE.COLUMNS} == set(ACCESSORS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_matches_the_settings_table(name: str) -> None:
    cfg = load_config(METHODS / name)
    row = ROWS[name]
    assert cfg.algorithm.name == row["algorithm"], name
    assert set(row["settings"]) == _columns_that_apply(cfg), name
    for key, (expected, *sources) in row["settings"].items():
        assert sources, f"{name}: {key} cites no source"
        actual = ACCESSORS[key](cfg)
        if isinstance(expected, float) or isinstance(actual, float):
            assert actual == pytest.approx(expected, rel=1e-12), f"{name}: {key}"
        else:
            assert actual == expected, f"{name}: {key} is {actual!r}, the table says {expected!r}"


@pytest.mark.parametrize("name", [n for n in CONFIGS if ROWS[n]["settings"].get("steps")])
def test_one_optimizer_step_per_iteration_of_the_papers_batch(name: str) -> None:
    # prompts / step is prompts_per_iteration only because an iteration is one optimizer step
    # (on one GPU: micro_batch_size x grad_accum_steps sequences hold the whole batch).
    cfg = load_config(METHODS / name)
    assert nominal_steps_per_iteration(cfg, 1) == 1
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    if cfg.algorithm.name in ("grpo", "rloo", "kepo"):
        assert rows_per_step == cfg.rollout.prompts_per_iteration * cfg.rollout.group_size
    elif cfg.algorithm.name == "sft":
        assert rows_per_step == cfg.rollout.prompts_per_iteration


def test_every_source_is_defined_and_every_script_flag_has_a_line() -> None:
    for row in SETTINGS["rows"]:
        for key, (_, *sources) in row["settings"].items():
            for source in sources:
                if source.startswith("script:"):
                    assert row["script"], f"{row['config']}: {key} cites a script it does not have"
                    assert row["script_lines"][source.removeprefix("script:")] > 0
                else:
                    assert source in SETTINGS["sources"], (
                        f"{row['config']}: unknown source {source}"
                    )


def test_settings_md_is_rendered_from_settings_yaml() -> None:
    assert (METHODS / "SETTINGS.md").read_text() == TABLE.render(SETTINGS), (
        "configs/methods/SETTINGS.md is out of date; run python scripts/settings_table.py"
    )
