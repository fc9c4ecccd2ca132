"""The named SQL in dashboards/: hand-built tables in, hand-computed numbers out."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kepo.cli import app
from kepo.commands.sql import DASHBOARDS_DIR, named_query
from kepo.config import RunConfig
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
    rollouts = [
        rollout_row("run-a", 0, "p1", 0),
        rollout_row("run-a", 0, "p1", 1),
        rollout_row("run-a", 0, "p1", 2, trained=False, replaced_by=3),
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
        ),
        rollout_row("run-a", 0, "p2", 0, reward_format=1.0, reward_accuracy=1.0, gate_open=True),
        rollout_row("run-a", 0, "p2", 1, reward_format=1.0, gate_open=True),
    ]
    prompts = [
        prompt_row("run-a", 0, "p1", 0, triggered=True, n_attempts=2, n_injected=1),
        prompt_row("run-a", 0, "p2", 1, triggered=False, n_attempts=0, n_injected=0),
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
    store.write_partitions(
        {"rollouts": rollouts, "prompts": prompts, "hints": [hint]}, run_id="run-a", iteration=0
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
    for name in ("table1", "training_dynamics", "rewards", "question_types"):
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
