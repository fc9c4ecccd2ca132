"""One frozen spec per training algorithm: what it needs, what it trains on, how it is labelled.

Every stage asks the spec (`spec_for(cfg.algorithm)`) instead of testing the algorithm's name:
the rollout stage whether to draw policy samples, assign gates and store reference log-probs or
teacher top-k; the trainer which rows to load, whether to load the teacher, which loss function
to call and which diagnostics to record; the config whether a teacher is required.

Adding a method means adding one `AlgorithmSpec` to `ALGORITHMS` and one micro-batch loss
function to `kepo.train.MICRO_BATCH_LOSS` (named by `AlgorithmSpec.loss`). This module imports
neither torch nor the config, so the CLI and the config stay fast to import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Estimator = Literal["grpo", "rloo"]
TrainsOn = Literal["rollouts", "targets", "rollouts_or_targets"]


class AlgorithmSettings(Protocol):
    """The part of `kepo.config.AlgorithmConfig` the specs read."""

    name: str
    kl_coef: float
    gkd_lambda: float
    distill: Any


@dataclass(frozen=True)
class AlgorithmSpec:
    """What one algorithm needs from the stages, and which loss the trainer calls."""

    name: str
    trains_on: TrainsOn
    """rollouts: the G trained rollout rows per prompt; targets: one dataset target per prompt;
    rollouts_or_targets: per prompt one or the other, with probability algorithm.gkd_lambda."""
    policy_term: bool
    """Eq. 5 on stored advantages (+ the reference KL when kl_coef > 0): the rollout stores
    advantages and old log-probs, the trainer requires them."""
    distills: bool
    """Has a distillation term towards the teacher (needs models.teacher)."""
    gated: bool
    """The distillation is gated per row by eq. 7 (the rollout stores gate_open; offline mode
    stores the teacher's top-k of gated-open rows). Ungated distillation runs the teacher online
    on every row."""
    explores: bool
    """Knowledge-enhanced exploration (Algorithm 1) runs when rollout.exploration.enabled."""
    advantage: Estimator
    """Advantage estimator unless algorithm.advantage names one."""
    loss: str
    """Key of the micro-batch loss function in `kepo.train.MICRO_BATCH_LOSS`."""
    metrics: tuple[str, ...]
    """Diagnostics recorded in train_steps (the others stay NULL)."""
    passes_setting: Literal["passes", "sft_epochs"]
    """The train setting that gives the passes over an iteration's rows."""
    label: Callable[[Any, bool], tuple[str, str]]
    """(algorithm config, exploration active) -> (method name, its parameters or "") for
    `method_label`."""

    # -------------------------------------------------------------- what the stages ask
    def uses_policy_samples(self, algo: AlgorithmSettings) -> bool:
        """Whether training reads on-policy samples (else the rollout stage draws none)."""
        if self.trains_on == "targets":
            return False
        if self.trains_on == "rollouts_or_targets":
            return algo.gkd_lambda > 0.0
        return True

    @property
    def needs_teacher(self) -> bool:
        """models.teacher must be set."""
        return self.distills

    def needs_reference(self, algo: AlgorithmSettings) -> bool:
        """The rollout stores reference log-probs and the trainer adds the KL term."""
        return self.policy_term and algo.kl_coef > 0

    def stores_teacher_topk(self, algo: AlgorithmSettings) -> bool:
        """The rollout stores the teacher's top-k of gated-open rows (offline distillation)."""
        return self.gated and algo.distill.mode == "offline"

    def teacher_in_trainer(self, algo: AlgorithmSettings, any_gate_open: bool) -> bool:
        """The trainer loads the teacher and runs it on the rows it distils."""
        if not self.distills:
            return False
        if self.gated:
            return algo.distill.mode == "online" and any_gate_open
        return True

    def passes(self, train: Any) -> int:
        return int(getattr(train, self.passes_setting))

    def method_label(self, algo: AlgorithmSettings, *, explores: bool, mode: str) -> str:
        """E.g. "KEPO (τ=1, thinking)", "GRPO (non-thinking)"."""
        name, params = self.label(algo, explores)
        return f"{name} ({params}, {mode})" if params else f"{name} ({mode})"


def _plain_label(name: str) -> Callable[[Any, bool], tuple[str, str]]:
    return lambda _algo, _explores: (name, "")


ALGORITHMS: dict[str, AlgorithmSpec] = {
    spec.name: spec
    for spec in (
        AlgorithmSpec(
            name="grpo",
            trains_on="rollouts",
            policy_term=True,
            distills=False,
            gated=False,
            explores=False,
            advantage="grpo",
            loss="policy",
            metrics=("clipfrac", "approx_kl"),
            passes_setting="passes",
            label=_plain_label("GRPO"),
        ),
        AlgorithmSpec(
            name="rloo",
            trains_on="rollouts",
            policy_term=True,
            distills=False,
            gated=False,
            explores=False,
            advantage="rloo",
            loss="policy",
            metrics=("clipfrac", "approx_kl"),
            passes_setting="passes",
            label=_plain_label("RLOO"),
        ),
        AlgorithmSpec(
            name="kepo",
            trains_on="rollouts",
            policy_term=True,
            distills=True,
            gated=True,
            explores=True,
            advantage="grpo",
            loss="kepo",
            metrics=("clipfrac", "approx_kl", "gate_frac_open"),
            passes_setting="passes",
            label=lambda algo, explores: (
                "KEPO" if explores else "KEPO-KE",
                f"τ={algo.distill.gate.tau:g}",
            ),
        ),
        AlgorithmSpec(
            name="gkd",
            trains_on="rollouts_or_targets",
            policy_term=False,
            distills=True,
            gated=False,
            explores=False,
            advantage="grpo",
            loss="gkd",
            metrics=(),
            passes_setting="passes",
            label=lambda algo, _explores: ("MM-GKD", f"λ={algo.gkd_lambda:g}"),
        ),
        AlgorithmSpec(
            name="sft",
            trains_on="targets",
            policy_term=False,
            distills=False,
            gated=False,
            explores=False,
            advantage="grpo",
            loss="sft",
            metrics=(),
            passes_setting="sft_epochs",
            label=_plain_label("SFT"),
        ),
    )
}


def spec_for(algo: AlgorithmSettings | str) -> AlgorithmSpec:
    """The spec of an algorithm config (or name); a one-line error for an unknown name."""
    name = algo if isinstance(algo, str) else algo.name
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(
            f"unknown algorithm {name!r}; use one of {', '.join(ALGORITHMS)}"
        ) from None


__all__ = ["ALGORITHMS", "AlgorithmSpec", "spec_for"]
