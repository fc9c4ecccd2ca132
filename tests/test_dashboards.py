"""The named SQL in dashboards/: hand-built tables in, hand-computed numbers out."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kepo.cli import app
from kepo.config import RunConfig
from kepo.queries import DASHBOARDS_DIR, named_query
from kepo.store import Store
from schemas.tables import MODALITIES

TABLE1_COLUMNS = [
    "run_id",
    "method_label",
    "in_domain_modality",
    "iteration",
    "MRI",
    "CT",
    "XR",
    "US",
    "Der",
    "Fun",
    "OCT",
    "Mic",
    "Avg",
    "Avg_OOD",
    "n_modalities",
    "n_items",
]

# Run A trains on MRI and is evaluated at iterations 0 and 1; run B trains on CT (so its OOD
# average must leave CT out, not MRI) and is evaluated at iteration 2 only; run C is registered
# but never evaluated.
ACC_A0 = dict.fromkeys(MODALITIES, 0.25)
ACC_A1 = dict(zip(MODALITIES, (0.75, 0.5, 0.25, 1.0, 0.0, 0.5, 0.5, 0.25), strict=True))
ACC_B2 = {**dict.fromkeys(MODALITIES, 0.5), "CT": 1.0}


def metric_rows(run_id: str, iteration: int, acc: dict[str, float], in_domain: str) -> list[dict]:
    rows = []
    for modality, a in acc.items():
        rows.append(
            {
                "run_id": run_id,
                "iteration": iteration,
                "modality": modality,
                "in_domain": modality == in_domain,
                "n": 4,
                "n_correct": round(4 * a),
                "accuracy": a,
                "ci_low": 0.0,
                "ci_high": 1.0,
            }
        )
    return rows


def rollout_row(run_id: str, iteration: int, prompt: str, idx: int, **kw: Any) -> dict[str, Any]:
    row = {
        "run_id": run_id,
        "iteration": iteration,
        "prompt_id": prompt,
        "sample_idx": idx,
        "slot": idx,
        "source": "policy",
        "trained": True,
        "replaced_by": None,
        "attempt_id": None,
        "generation_prompt": "p",
        "completion_text": "c",
        "completion_ids": [1, 2],
        "sampled_logprobs": [-0.1, -0.2],
        "old_logprobs": None,
        "ref_logprobs": None,
        "reward_format": 0.0,
        "reward_accuracy": 0.0,
        "reward_total": 0.0,
        "parsed_answer": None,
        "parse_reason": "no_answer_tag",
        "advantage": None,
        "gate_open": False,
        "leak_flag": False,
        "policy_version": iteration,
        "finish_reason": "stop",
        "n_tokens": 2,
    }
    row.update(kw)
    row["reward_total"] = row["reward_format"] + row["reward_accuracy"]
    return row


def prompt_row(run_id: str, iteration: int, prompt: str, position: int, **kw: Any) -> dict:
    return {
        "run_id": run_id,
        "iteration": iteration,
        "prompt_id": prompt,
        "batch_position": position,
        "epoch": 0,
        "modality": "MRI",
        "question_type": "Disease Diagnosis",
        "gold_letter": "A",
        "training_prompt": "p",
        "sampling_seed": 7,
        "n_policy_correct": 0,
        "max_trigger_reward": 0.0,
        "trigger_reason": "all_zero_total" if kw["triggered"] else "not_all_zero",
        **kw,
    }


def prediction_row(
    run_id: str, iteration: int, qid: str, modality: str, qtype: str, correct: bool
) -> dict:
    return {
        "run_id": run_id,
        "iteration": iteration,
        "question_id": qid,
        "modality": modality,
        "question_type": qtype,
        "output_text": "<answer>A</answer>",
        "parsed_answer": "A",
        "parse_reason": None,
        "gold_letter": "A" if correct else "B",
        "correct": correct,
        "reward_format": 1.0,
        "n_tokens": 3,
        "model_sha256": None,
    }


def train_step_row(run_id: str, iteration: int, step: int, **kw: Any) -> dict[str, Any]:
    row = {
        "run_id": run_id,
        "iteration": iteration,
        "step": step,
        "global_step": step,
        "pass_idx": 0,
        "loss_total": None,
        "loss_pg": None,
        "loss_distill": None,
        "loss_kl": None,
        "loss_sft": None,
        "clipfrac": 0.0,
        "approx_kl": 0.0,
        "entropy": None,
        "gate_frac_open": None,
        "grad_norm": None,
        "lr": 1e-6,
        "n_sequences": 4,
        "n_tokens": 8,
        "step_time_s": 1.0,
        "skipped": False,
        "skip_reason": None,
    }
    row.update(kw)
    if row["loss_total"] is None:
        row["loss_total"] = row["loss_pg"]
    return row


def stage_row(
    run_id: str, iteration: int, stage: str, seconds: float, status: str = "succeeded"
) -> dict[str, Any]:
    started = datetime(2026, 1, 1, 12, 0, 0)
    return {
        "run_id": run_id,
        "iteration": iteration,
        "stage": stage,
        "status": status,
        "started_at": started,
        "finished_at": started + timedelta(seconds=seconds),
        "error": None,
        "attempt": 1,
        "lease_owner": None,
    }


def make_dashboard_db(path: Path) -> Path:
    """Three runs with hand-picked metrics, rollouts and predictions (see the numbers above)."""
    store = Store(path)
    store.register_run(RunConfig(run_id="run-a", algorithm={"name": "grpo"}))
    store.register_run(
        RunConfig(run_id="run-b", algorithm={"name": "kepo"}, data={"train_modality": "CT"})
    )
    store.register_run(RunConfig(run_id="run-c", algorithm={"name": "rloo"}))
    store.write_partitions(
        {"eval_metrics": metric_rows("run-a", 0, ACC_A0, "MRI")}, run_id="run-a", iteration=0
    )
    store.write_partitions(
        {"eval_metrics": metric_rows("run-a", 1, ACC_A1, "MRI")}, run_id="run-a", iteration=1
    )
    store.write_partitions(
        {"eval_metrics": metric_rows("run-b", 2, ACC_B2, "CT")}, run_id="run-b", iteration=2
    )
    # run-a iteration 0: prompt p1's three policy samples all score 0, so it explored (2
    # attempts) and an injected hint row (reward 2) took the slot of sample 2; prompt p2 did not
    # explore. The gate (total >= 1) is open on the hint row and on p2's rows.
    # Training health (see test_training_health_*): every sample's generation-time log-probs are
    # (-0.1, -0.2); the trainer's recomputed ones differ by 0.2 on p1/1 and 0.3 on p2/0 (the hint
    # row, sampled under another prompt, differs by 0.9 and must not count). p1's advantages are
    # non-zero after the injection, p2's are both 0. p2/1 was cut at max_new_tokens, p1/2 is 4
    # tokens long.
    rollouts = [
        rollout_row("run-a", 0, "p1", 0, old_logprobs=[-0.1, -0.2], advantage=-0.5),
        rollout_row("run-a", 0, "p1", 1, old_logprobs=[-0.3, -0.2], advantage=-0.5),
        rollout_row("run-a", 0, "p1", 2, trained=False, replaced_by=3, n_tokens=4),
        rollout_row(
            "run-a",
            0,
            "p1",
            3,
            slot=2,
            source="hint",
            reward_format=1.0,
            reward_accuracy=1.0,
            gate_open=True,
            old_logprobs=[-1.0, -1.1],
            advantage=1.0,
        ),
        rollout_row(
            "run-a",
            0,
            "p2",
            0,
            reward_format=1.0,
            reward_accuracy=1.0,
            gate_open=True,
            old_logprobs=[-0.1, -0.5],
            advantage=0.0,
        ),
        rollout_row(
            "run-a",
            0,
            "p2",
            1,
            reward_format=1.0,
            gate_open=True,
            old_logprobs=[-0.1, -0.2],
            advantage=0.0,
            finish_reason="length",
        ),
    ]
    prompts = [
        prompt_row("run-a", 0, "p1", 0, triggered=True, n_attempts=2, n_injected=1),
        prompt_row(
            "run-a", 0, "p2", 1, triggered=False, n_attempts=0, n_injected=0, n_policy_correct=1
        ),
    ]
    hint = {
        "run_id": "run-a",
        "iteration": 0,
        "prompt_id": "p1",
        "teacher": "tiny-teacher",
        "hint_prompt": "h",
        "raw_output": "<hint>look at the edge</hint>",
        "hint_text": "look at the edge",
        "parse_ok": True,
        "parse_reason": None,
        "malformed_rule": None,
    }
    steps = [
        train_step_row("run-a", 0, 0, loss_pg=0.5, entropy=1.0, grad_norm=2.0, lr=1e-6),
        train_step_row(
            "run-a", 0, 1, loss_pg=0.3, entropy=0.8, grad_norm=4.0, lr=2e-6, skipped=True
        ),
    ]
    stages = [
        stage_row("run-a", 0, "rollout", 10.0),
        stage_row("run-a", 0, "train", 20.0),
        stage_row("run-a", 0, "evaluate", 5.0, status="failed"),  # failed: not a duration
    ]
    store.write_partitions(
        {
            "rollouts": rollouts,
            "prompts": prompts,
            "hints": [hint],
            "train_steps": steps,
            "stages": stages,
        },
        run_id="run-a",
        iteration=0,
    )
    predictions = [
        prediction_row("run-a", 1, "q1", "MRI", "Disease Diagnosis", True),
        prediction_row("run-a", 1, "q2", "CT", "Disease Diagnosis", False),
        prediction_row("run-a", 1, "q3", "CT", "Disease Diagnosis", True),
        prediction_row("run-a", 1, "q4", "OCT", "Modality Recognition", False),
    ]
    store.write_partitions({"eval_predictions": predictions}, run_id="run-a", iteration=1)
    return store.path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return make_dashboard_db(tmp_path / "kepo.duckdb")


def query(db: Path, name: str) -> list[dict[str, Any]]:
    return Store(db).query(named_query(name)).to_pylist()


def test_every_owned_dashboard_is_plain_read_only_sql() -> None:
    for name in (
        "table1",
        "training_dynamics",
        "rewards",
        "question_types",
        "training_health",
        "table1_intervals",
    ):
        text = (DASHBOARDS_DIR / f"{name}.sql").read_text()
        assert "?" not in text and "$" not in text, f"{name}.sql must take no parameters"


def test_table1_last_checkpoint_and_ood_from_config(db: Path) -> None:
    rows = {r["run_id"]: r for r in query(db, "table1")}
    assert set(rows) == {"run-a", "run-b"}  # run-c has no evaluation
    a, b = rows["run-a"], rows["run-b"]
    assert a["iteration"] == 1 and b["iteration"] == 2
    assert a["in_domain_modality"] == "MRI" and b["in_domain_modality"] == "CT"
    assert [a[c] for c in ("MRI", "CT", "XR", "US", "Der", "Fun", "OCT", "Mic")] == [
        75.0, 50.0, 25.0, 100.0, 0.0, 50.0, 50.0, 25.0,
    ]  # fmt: skip
    assert a["Avg"] == pytest.approx(46.88, abs=0.006)  # 3.75 / 8
    assert a["Avg_OOD"] == pytest.approx(42.86, abs=1e-9)  # (3.75 - 0.75) / 7
    assert b["Avg"] == pytest.approx(56.25, abs=1e-9)  # 4.5 / 8
    assert b["Avg_OOD"] == pytest.approx(50.0, abs=1e-9)  # CT left out, not MRI (that gives 57.14)
    assert a["n_items"] == 32 and a["n_modalities"] == 8


def test_table1_through_the_cli_has_the_papers_columns(db: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["sql", "--db", str(db), "--query", "table1", "--csv"])
    assert result.exit_code == 0, result.output
    reader = csv.reader(io.StringIO(result.stdout))
    header = next(reader)
    assert header == TABLE1_COLUMNS
    body = list(reader)
    assert [r[0] for r in body] == ["run-a", "run-b"]
    result = runner.invoke(app, ["sql", "--db", str(db), "--query", "table1", "--json"])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[1]["in_domain_modality"] == "CT" and rows[1]["Avg_OOD"] == 50.0


def test_training_dynamics_per_checkpoint(db: Path) -> None:
    rows = [
        (r["run_id"], r["iteration"], r["id_accuracy"], r["ood_average"])
        for r in query(db, "training_dynamics")
    ]
    assert rows == [
        ("run-a", 0, 25.0, 25.0),
        ("run-a", 1, 75.0, pytest.approx(42.86, abs=1e-9)),
        ("run-b", 2, 100.0, 50.0),
    ]


def test_rewards_over_trained_rows_and_policy_samples(db: Path) -> None:
    (row,) = query(db, "rewards")
    assert (row["run_id"], row["iteration"]) == ("run-a", 0)
    # trained: p1/0 (0,0), p1/1 (0,0), p1/3 hint (1,1), p2/0 (1,1), p2/1 (1,0)
    assert row["n_trained"] == 5
    assert row["trained_format"] == 0.6
    assert row["trained_accuracy"] == 0.4
    assert row["trained_total"] == 1.0
    # policy samples: p1/0, p1/1, p1/2 (replaced) all (0,0), p2/0 (1,1), p2/1 (1,0)
    assert row["n_policy"] == 5
    assert row["policy_format"] == 0.4
    assert row["policy_accuracy"] == 0.2
    assert row["policy_total"] == 0.6


def test_question_types(db: Path) -> None:
    rows = {r["question_type"]: r for r in query(db, "question_types")}
    dd, mr = rows["Disease Diagnosis"], rows["Modality Recognition"]
    assert (dd["n"], dd["n_correct"]) == (3, 2)
    assert dd["accuracy"] == pytest.approx(66.67, abs=1e-9)
    assert dd["id_accuracy"] == 100.0 and dd["ood_accuracy"] == 50.0
    assert (mr["n"], mr["n_correct"], mr["accuracy"], mr["id_accuracy"]) == (1, 0, 0.0, None)


def test_every_named_query_runs_and_is_documented(db: Path) -> None:
    from kepo.queries import query_names

    store = Store(db)
    for name in query_names():
        text = named_query(name)
        assert text.startswith("-- "), f"{name}.sql must open with a comment saying what it shows"
        params = {"study": "s", "role": "method"} if "$study" in text else None
        store.query(text, params)  # raises on a typo or a missing column


def test_accuracy_per_modality(db: Path) -> None:
    rows = query(db, "accuracy_per_modality")
    assert len(rows) == 3 * 8  # run-a at 0 and 1, run-b at 2; every modality
    a1 = {r["modality"]: r for r in rows if r["run_id"] == "run-a" and r["iteration"] == 1}
    assert a1["MRI"]["accuracy"] == 75.0 and a1["MRI"]["in_domain"] and a1["MRI"]["n"] == 4
    assert a1["Dermoscopy"]["accuracy"] == 0.0 and not a1["CT"]["in_domain"]
    assert [(r["run_id"], r["modality"], r["iteration"]) for r in rows[:3]] == [
        ("run-a", "CT", 0),
        ("run-a", "CT", 1),
        ("run-a", "Dermoscopy", 0),
    ]


def test_the_demo_summary_prints_named_queries(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kepo demo`'s closing summary (the flow itself replaced by the dashboard fixture)."""
    import flows.demo

    report = db.parent / "report.html"
    monkeypatch.setattr(flows.demo, "kepo_demo", lambda **_: {"db": str(db), "report": str(report)})
    result = CliRunner().invoke(app, ["demo", "--workdir", str(db.parent)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "run-a" in out and "46.88" in out  # Table 1
    assert f"kepo sql --db {db} --query hints_never_accepted" in out
    assert "duckdb_columns()" in out


def test_training_health_per_run_and_iteration(db: Path) -> None:
    rows = query(db, "training_health")
    assert [(r["run_id"], r["iteration"]) for r in rows] == [("run-a", 0)]
    (h,) = rows
    # train_steps: two steps, one skipped
    assert (h["n_steps"], h["n_skipped"]) == (2, 1)
    assert h["loss_pg"] == pytest.approx(0.4) and h["loss_total"] == pytest.approx(0.4)
    assert h["loss_kl"] is None and h["loss_distill"] is None
    assert h["entropy"] == pytest.approx(0.9)
    assert (h["grad_norm"], h["grad_norm_max"]) == (3.0, 4.0)
    assert h["lr"] == 2e-6  # the last step's
    # on-policy samples: p1/0, p1/1, p1/2 (4 tokens), p2/0, p2/1 (truncated)
    assert h["n_samples"] == 5
    assert h["mean_completion_tokens"] == 2.4 and h["truncation_rate"] == 0.2
    # groups: p1 all wrong (advantages non-zero after injection), p2 zero advantage
    assert (h["n_prompts"], h["all_wrong_rate"], h["zero_advantage_rate"]) == (2, 0.5, 0.5)
    # sampler vs trainer over the 8 tokens of the 4 trained policy rows: (0.2 + 0.3) / 8
    assert h["logprob_mismatch_mean"] == pytest.approx(0.0625, abs=1e-6)
    assert h["logprob_mismatch_max"] == pytest.approx(0.3, abs=1e-6)
    # succeeded stages only
    assert (h["rollout_s"], h["train_s"], h["evaluate_s"]) == (10.0, 20.0, None)


def test_wilson_intervals_behind_table1_and_training_dynamics(db: Path) -> None:
    rows = query(db, "table1_intervals")
    # the last checkpoint of each evaluated run, one row per modality; metric_rows stores [0, 1]
    assert {(r["run_id"], r["iteration"]) for r in rows} == {("run-a", 1), ("run-b", 2)}
    assert len(rows) == 16
    mri = next(r for r in rows if r["run_id"] == "run-a" and r["modality"] == "MRI")
    assert (mri["accuracy"], mri["ci_low"], mri["ci_high"], mri["n"]) == (75.0, 0.0, 100.0, 4)
    assert mri["in_domain"]
    rows = {(r["run_id"], r["iteration"]): r for r in query(db, "training_dynamics")}
    b2 = rows[("run-b", 2)]
    assert (b2["id_ci_low"], b2["id_ci_high"]) == (0.0, 100.0)  # the in-domain (CT) interval
    # OOD: run-b's seven OOD modalities pooled, 14 of 28 correct -> Wilson 95 % by hand
    z, n, p = 1.959963984540054, 28, 0.5
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    assert b2["ood_ci_low"] == pytest.approx(100 * (centre - half), abs=0.006)
    assert b2["ood_ci_high"] == pytest.approx(100 * (centre + half), abs=0.006)
