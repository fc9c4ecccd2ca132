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


# ------------------------------------------------------------------------------ TRL names
TRL_EXAMPLES = {  # TRL name: (value, kepo field, value the field gets)
    "num_generations": (4, "rollout.group_size", 4),
    "max_completion_length": (256, "rollout.sampling.max_new_tokens", 256),
    "temperature": (0.7, "rollout.sampling.temperature", 0.7),
    "top_p": (0.9, "rollout.sampling.top_p", 0.9),
    "top_k": (20, "rollout.sampling.top_k", 20),
    "beta": (0.04, "algorithm.kl_coef", 0.04),
    "epsilon": (0.3, "algorithm.clip_eps_low", 0.3),
    "epsilon_high": (0.28, "algorithm.clip_eps_high", 0.28),
    "scale_rewards": ("none", "algorithm.scale_by_std", False),
    "loss_type": ("grpo", "algorithm.loss_aggregation", "seq_mean_token_mean"),
    "lmbda": (0.5, "algorithm.gkd_lambda", 0.5),
    "num_iterations": (3, "train.passes", 3),
    "per_device_train_batch_size": (4, "train.micro_batch_size", 4),
    "gradient_accumulation_steps": (5, "train.grad_accum_steps", 5),
    "learning_rate": (1e-5, "train.learning_rate", 1e-5),
    "weight_decay": (0.01, "train.weight_decay", 0.01),
    "warmup_steps": (7, "train.warmup_steps", 7),
    "max_grad_norm": (0.5, "train.max_grad_norm", 0.5),
    "gradient_checkpointing": (True, "train.gradient_checkpointing", True),
}


def _field(cfg: RunConfig, dotted: str) -> object:
    node: object = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_trl_alias_is_tested() -> None:
    from kepo.config import TRL_ALIASES

    assert set(TRL_EXAMPLES) == set(TRL_ALIASES)
    assert all(TRL_ALIASES[n] == field for n, (_, field, _) in TRL_EXAMPLES.items())


@pytest.mark.parametrize("name", sorted(TRL_EXAMPLES))
def test_a_trl_name_in_the_file_and_in_set_sets_the_kepo_field(name: str, tmp_path: Path) -> None:
    value, field, expected = TRL_EXAMPLES[name]
    default = _field(RunConfig(), field)
    assert default != expected, "pick an example value that differs from the default"
    cfg = load_config(_write(tmp_path, f"trl:\n  {name}: {value!r}\n"))
    assert _field(cfg, field) == expected
    cfg = load_config(_write(tmp_path, "run_id: x\n"), overrides={f"trl.{name}": value})
    assert _field(cfg, field) == expected


def test_epsilon_alone_sets_both_bounds_and_turns_clipping_on(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "trl:\n  epsilon: 0.3\n"))
    a = cfg.algorithm
    assert (a.clip, a.clip_eps_low, a.clip_eps_high) == (True, 0.3, 0.3)
    cfg = load_config(
        _write(tmp_path, "trl:\n  epsilon: 0.3\nalgorithm:\n  clip_eps_high: 0.28\n  clip: false\n")
    )
    a = cfg.algorithm  # kepo fields given explicitly stay as given
    assert (a.clip, a.clip_eps_low, a.clip_eps_high) == (False, 0.3, 0.28)


def test_scale_rewards_and_loss_type_values(tmp_path: Path) -> None:
    for value, expected in ((True, True), ("group", True), (False, False), ("none", False)):
        cfg = load_config(_write(tmp_path, "run_id: x\n"), overrides={"trl.scale_rewards": value})
        assert cfg.algorithm.scale_by_std is expected, value
    cfg = load_config(_write(tmp_path, "trl:\n  loss_type: dapo\n"))
    assert cfg.algorithm.loss_aggregation == "token_mean"
    for name, value, why in (
        ("scale_rewards", "batch", "group std only"),
        ("loss_type", "dr_grpo", "max_completion_length"),
        ("loss_type", "bnpo", "whole optimizer step"),
    ):
        with pytest.raises(ConfigError) as err:
            load_config(_write(tmp_path, f"trl:\n  {name}: {value}\n"))
        msg = str(err.value)
        assert (
            "\n" not in msg and f"trl.{name}" in msg and why in msg and "no kepo equivalent" in msg
        )


def test_an_alias_and_its_field_disagreeing_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "trl:\n  beta: 0.1\nalgorithm:\n  kl_coef: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "trl.beta" in msg and "algorithm.kl_coef" in msg and "keep one" in msg
    with pytest.raises(ConfigError, match=r"trl.num_generations .* rollout.group_size"):
        load_config(
            _write(tmp_path, "run_id: x\n"),
            overrides={"trl.num_generations": 4, "rollout.group_size": 6},
        )
    # the same value twice is no conflict
    cfg = load_config(_write(tmp_path, "trl:\n  beta: 0.1\nalgorithm:\n  kl_coef: 0.1\n"))
    assert cfg.algorithm.kl_coef == 0.1


def test_a_trl_name_overrides_its_base_file_like_the_kepo_name(tmp_path: Path) -> None:
    _write(tmp_path, "algorithm:\n  kl_coef: 0.2\ntrain:\n  passes: 2\n", "base.yaml")
    path = _write(tmp_path, "base: base.yaml\ntrl:\n  beta: 0.05\n")
    cfg = load_config(path)
    assert cfg.algorithm.kl_coef == 0.05 and cfg.train.passes == 2
    cfg = load_config(path, overrides={"trl.beta": 0.0})  # --set wins over the file
    assert cfg.algorithm.kl_coef == 0.0


def test_trl_names_that_are_not_aliases_say_why(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "trl:\n  mask_truncated_completions: true\n"))
    msg = str(err.value)
    assert "\n" not in msg and "not an alias" in msg and "finish_reason" in msg
    with pytest.raises(ConfigError, match="not a TRL name kepo knows"):
        load_config(_write(tmp_path, "run_id: x\n"), overrides={"trl.num_generationz": 4})
