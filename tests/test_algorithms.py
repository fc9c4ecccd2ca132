"""The algorithm specs (kepo.algorithms): every spec is complete, names resolve, errors are one line."""

from __future__ import annotations

import pytest

from kepo.algorithms import ALGORITHMS, spec_for
from kepo.config import ConfigError, parse_config


def test_every_spec_names_a_loss_function_and_known_metrics():
    from kepo.train import MICRO_BATCH_LOSS, TOKEN_METRICS

    for name, spec in ALGORITHMS.items():
        assert spec.name == name
        assert callable(MICRO_BATCH_LOSS[spec.loss]), name
        assert set(spec.metrics) <= {*TOKEN_METRICS, "gate_frac_open"}, name
        assert spec.gated <= spec.distills, f"{name}: a gate needs a distillation term"


def test_what_each_algorithm_needs():
    def algo(name, **kw):
        return parse_config({"algorithm": {"name": name, **kw}}).algorithm

    assert not spec_for("sft").uses_policy_samples(algo("sft"))
    assert not spec_for("gkd").uses_policy_samples(algo("gkd", gkd_lambda=0.0))
    assert spec_for("gkd").uses_policy_samples(algo("gkd", gkd_lambda=0.25))
    assert spec_for("kepo").uses_policy_samples(algo("kepo"))
    assert spec_for("grpo").needs_reference(algo("grpo", kl_coef=0.1))
    assert not spec_for("gkd").needs_reference(algo("gkd", kl_coef=0.1))  # no policy term
    kepo_offline = algo("kepo", distill={"mode": "offline"})
    assert spec_for("kepo").stores_teacher_topk(kepo_offline)
    assert not spec_for("kepo").teacher_in_trainer(kepo_offline, True)
    assert spec_for("kepo").teacher_in_trainer(algo("kepo"), True)
    assert not spec_for("kepo").teacher_in_trainer(algo("kepo"), False)
    assert spec_for("gkd").teacher_in_trainer(algo("gkd"), False)
    assert [n for n, s in ALGORITHMS.items() if s.needs_teacher] == ["kepo", "gkd"]
    assert algo("rloo").advantage_estimator == "rloo"
    assert algo("kepo").advantage_estimator == "grpo"


@pytest.mark.parametrize(
    "settings,label",
    [
        ({"algorithm": {"name": "kepo"}}, "KEPO (τ=1, thinking)"),
        (
            {"algorithm": {"name": "kepo"}, "rollout": {"exploration": {"enabled": False}}},
            "KEPO-KE (τ=1, thinking)",
        ),
        ({"algorithm": {"name": "gkd", "gkd_lambda": 0.5}}, "MM-GKD (λ=0.5, thinking)"),
        ({"algorithm": {"name": "grpo"}, "prompts": {"thinking": False}}, "GRPO (non-thinking)"),
        ({"algorithm": {"name": "sft"}}, "SFT (thinking)"),
    ],
)
def test_method_labels(settings, label):
    assert parse_config(settings).method_label == label


def test_unknown_algorithm_is_one_line():
    with pytest.raises(ConfigError) as err:
        parse_config({"algorithm": {"name": "ppo"}})
    message = str(err.value)
    assert "\n" not in message
    assert (
        "algorithm.name: unknown algorithm 'ppo'; use one of grpo, rloo, kepo, gkd, sft" in message
    )
