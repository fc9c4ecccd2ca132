"""Config loading: one-line errors that name the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from kepo.config import ConfigError, RunConfig, describe_fields, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_malformed_yaml_gives_one_line_with_location(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("run_id: x\nrollout:\n  group_size: 4\n   budget: [1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg and "malformed YAML" in msg and "line" in msg and str(path) in msg


def test_invalid_value_names_the_field_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  group_size: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert (
        "rollout.group_size" in msg
        and "greater than or equal to 2" in msg
        and "fix the value" in msg
    )


def test_unknown_field_and_cross_field_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  grup_size: 4\n")
    with pytest.raises(ConfigError, match=r"rollout.grup_size: unknown field"):
        load_config(path)
    path.write_text("algorithm:\n  name: kepo\nmodels:\n  teacher: null\n")
    with pytest.raises(ConfigError, match=r"needs a teacher: set models.teacher"):
        load_config(path)
    path.write_text("rollout:\n  group_size: 2\n  exploration:\n    inject_k: 3\n")
    with pytest.raises(ConfigError, match=r"lower inject_k or raise group_size"):
        load_config(path)


def test_base_include_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "seed: 3\nrollout:\n  group_size: 4\n  budget_unused: null\n".replace(
            "  budget_unused: null\n", ""
        )
    )
    (tmp_path / "child.yaml").write_text("base: base.yaml\nrollout:\n  prompts_per_iteration: 2\n")
    cfg = load_config(tmp_path / "child.yaml", overrides={"train.learning_rate": 1e-3})
    assert (cfg.seed, cfg.rollout.group_size, cfg.rollout.prompts_per_iteration) == (3, 4, 2)
    assert cfg.train.learning_rate == 1e-3


def test_list_valued_base_composes_method_and_scale_in_order(tmp_path: Path) -> None:
    (tmp_path / "common.yaml").write_text("seed: 1\nrollout:\n  group_size: 8\n")
    (tmp_path / "method.yaml").write_text(
        "base: common.yaml\nalgorithm:\n  name: grpo\nrollout:\n  prompts_per_iteration: 8\n"
    )
    (tmp_path / "scale.yaml").write_text("rollout:\n  prompts_per_iteration: 2\n  group_size: 4\n")
    (tmp_path / "tiny-grpo.yaml").write_text("base: [method.yaml, scale.yaml]\nseed: 5\n")
    cfg = load_config(tmp_path / "tiny-grpo.yaml")
    assert cfg.algorithm.name == "grpo" and cfg.seed == 5  # the file itself wins
    assert (cfg.rollout.prompts_per_iteration, cfg.rollout.group_size) == (2, 4)  # scale last
    assert cfg.run_id == "tiny-grpo"  # no run_id of its own: the file name


def test_run_id_comes_from_the_file_not_from_a_base(tmp_path: Path) -> None:
    (tmp_path / "common.yaml").write_text("run_id: common\n")
    (tmp_path / "kepo-x.yaml").write_text("base: common.yaml\n")
    (tmp_path / "named.yaml").write_text("base: common.yaml\nrun_id: mine\n")
    assert load_config(tmp_path / "kepo-x.yaml").run_id == "kepo-x"
    assert load_config(tmp_path / "named.yaml").run_id == "mine"
    assert load_config(tmp_path / "named.yaml", {"run_id": "over"}).run_id == "over"


def test_base_cycles_missing_bases_and_bad_base_yaml_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="form a cycle") as err:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(err.value)
    (tmp_path / "c.yaml").write_text("base: [nowhere.yaml]\n")
    with pytest.raises(ConfigError, match="does not exist; fix the 'base:' path"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "broken.yaml").write_text("rollout:\n  group_size: 4\n   x: [1\n")
    (tmp_path / "d.yaml").write_text("base: broken.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "d.yaml")
    msg = str(err.value)
    assert "\n" not in msg and "broken.yaml" in msg and "malformed YAML" in msg and "line" in msg
    (tmp_path / "e.yaml").write_text("base: {x: 1}\n")
    with pytest.raises(ConfigError, match="must be a file name or a list"):
        load_config(tmp_path / "e.yaml")


def test_tiny_configs_are_the_method_configs_at_the_tiny_scale() -> None:
    for path in sorted((CONFIGS / "tiny").glob("[!_]*.yaml")):
        tiny = load_config(path)
        method = load_config(CONFIGS / "methods" / path.name)
        assert tiny.algorithm.model_dump() == method.algorithm.model_dump(), path.name
        assert tiny.prompts == method.prompts, path.name
        assert tiny.train.lr_schedule == method.train.lr_schedule, path.name
        assert tiny.models.student == Path("work/models/tiny-student"), path.name


def test_every_field_has_a_description() -> None:
    rows = describe_fields(RunConfig)
    assert len(rows) > 50
    missing = [name for name, _, desc in rows if not desc.strip()]
    assert missing == []


# configs/methods/settings.yaml is the settings table (tests/test_settings.py), not a run config.
RUN_CONFIGS = sorted(
    p
    for p in CONFIGS.glob("**/*.yaml")
    if not p.name.startswith("study-") and p.name != "settings.yaml"
)
STUDY_CONFIGS = sorted(CONFIGS.glob("study-*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_run_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: p.name)
def test_shipped_study_configs_load(path: Path) -> None:
    from kepo.study import load_study

    assert load_study(path).methods
