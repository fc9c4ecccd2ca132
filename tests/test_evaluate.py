"""Evaluation: Wilson intervals, item selection, resumable per-modality commits, and the stored
metrics equal to a SQL recomputation from the stored predictions (tiny model, bundled data)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from kepo.cli import app
from kepo.config import RunConfig
from kepo.evaluate import compute_metrics, evaluate, select_items, wilson_interval
from kepo.generation import Completion
from kepo.run import Run
from kepo.store import Store
from schemas.tables import MODALITIES

# eval_metrics recomputed from eval_predictions in SQL (Wilson with z = 1.959963984540054);
# a FULL JOIN so that rows missing on either side count as mismatches.
RECOMPUTE_SQL = """
WITH counts AS (
    SELECT p.run_id, p.iteration, p.modality, p.modality = r.in_domain_modality AS in_domain,
           count(*) AS n, count(*) FILTER (WHERE p.correct) AS k
    FROM eval_predictions AS p JOIN runs AS r ON r.run_id = p.run_id
    GROUP BY ALL
),
wilson AS (
    SELECT *, k / n AS acc, 1.959963984540054 AS z FROM counts
),
recomputed AS (
    SELECT run_id, iteration, modality, in_domain, n, k, acc,
           greatest(0.0, (acc + z * z / (2 * n) - z * sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)))
                         / (1 + z * z / n)) AS lo,
           least(1.0, (acc + z * z / (2 * n) + z * sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)))
                      / (1 + z * z / n)) AS hi
    FROM wilson
)
SELECT count(*) AS mismatches
FROM recomputed AS c
FULL JOIN eval_metrics AS m
  ON c.run_id = m.run_id AND c.iteration = m.iteration AND c.modality = m.modality
WHERE m.run_id IS NULL OR c.run_id IS NULL
   OR c.in_domain <> m.in_domain OR c.n <> m.n OR c.k <> m.n_correct
   OR abs(c.acc - m.accuracy) > 1e-12 OR abs(c.lo - m.ci_low) > 1e-12
   OR abs(c.hi - m.ci_high) > 1e-12
"""


# ------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (5, 10, 0.236593, 0.763407),  # textbook values of the Wilson interval
        (0, 10, 0.0, 0.277533),
        (10, 10, 0.722467, 1.0),
        (1, 3, 0.061492, 0.792340),
    ],
)
def test_wilson_interval_known_values(k: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-6)
    assert hi == pytest.approx(high, abs=1e-6)


def test_wilson_interval_float64_reference() -> None:
    # Reference: the interval is where |p_hat - p| = z sqrt(p(1-p)/n), solved by bisection.
    z = 1.959963984540054
    for k, n in [(3, 7), (17, 40), (299, 300)]:
        p_hat = k / n

        def gap(p: float, p_hat: float = p_hat, n: int = n) -> float:
            return abs(p_hat - p) - z * math.sqrt(p * (1 - p) / n)

        def root(a: float, b: float) -> float:
            for _ in range(200):
                m = (a + b) / 2
                a, b = (m, b) if (gap(a) > 0) == (gap(m) > 0) else (a, m)
            return (a + b) / 2

        lo, hi = wilson_interval(k, n)
        assert lo == pytest.approx(root(1e-15, p_hat), abs=1e-12)
        assert hi == pytest.approx(root(p_hat, 1 - 1e-15), abs=1e-12)


def test_wilson_interval_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="n_correct"):
        wilson_interval(4, 3)


def test_compute_metrics_by_hand() -> None:
    predictions = pa.table(
        {
            "modality": ["CT", "MRI", "MRI", "CT", "MRI", "OCT"],
            "correct": [True, True, False, True, True, False],
        }
    )
    rows = compute_metrics(predictions, run_id="r", iteration=3, in_domain_modality="CT")
    assert [(r["modality"], r["n"], r["n_correct"], r["in_domain"]) for r in rows] == [
        ("MRI", 3, 2, False),  # paper order: MRI, CT, ..., OCT
        ("CT", 2, 2, True),
        ("OCT", 1, 0, False),
    ]
    assert rows[0]["accuracy"] == pytest.approx(2 / 3)
    assert (rows[0]["ci_low"], rows[0]["ci_high"]) == wilson_interval(2, 3)
    assert all(r["iteration"] == 3 and r["run_id"] == "r" for r in rows)


def test_select_items_caps_by_question_id_order() -> None:
    test = pa.table(
        {
            "question_id": ["m3", "c1", "m1", "m2", "c0"],
            "modality": ["MRI", "CT", "MRI", "MRI", "CT"],
            "question_type": ["Disease Diagnosis"] * 5,
            "question": ["q"] * 5,
            "options": [["a", "b"]] * 5,
            "gold_letter": ["A"] * 5,
        }
    )
    picked = select_items(test, 2)
    assert list(picked) == ["MRI", "CT"]  # paper order, empty modalities left out
    assert [r["question_id"] for r in picked["MRI"]] == ["m1", "m2"]
    assert [r["question_id"] for r in picked["CT"]] == ["c0", "c1"]
    assert len(select_items(test, None)["MRI"]) == 3


# ------------------------------------------------------------------------------ fakes
class FakeBackend:
    """Answers each question with a letter derived from its id; records every call."""

    name = "fake"

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.calls: list[list[Any]] = []
        self.samplings: list[Any] = []
        self.closed = False

    def generate(
        self, requests: Sequence[Any], sampling: Any, *, desc: str = ""
    ) -> list[list[Completion]]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append(list(requests))
        self.samplings.append(sampling)
        out = []
        for r in requests:
            letter = "AB"[sum(map(ord, r.request_id)) % 2]
            text = f"<think>look</think><answer>{letter}</answer>"
            out.append([Completion(r.request_id, 0, text, [1, 2, 3], [-0.1] * 3, "stop")])
        return out

    def close(self) -> None:
        self.closed = True


class Interrupting:
    """Wraps a real backend and raises after `n` generate calls (a crash mid-evaluation)."""

    def __init__(self, inner: Any, n: int) -> None:
        self.inner, self.n, self.calls = inner, n, 0
        self.name = "interrupting"

    def generate(self, requests: Sequence[Any], sampling: Any, *, desc: str = "") -> Any:
        if self.calls >= self.n:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.inner.generate(requests, sampling, desc=desc)


def make_run(
    workdir: Path, curated: Path, student: Path, run_id: str = "eval-tiny", **overrides: Any
) -> Run:
    data: dict[str, Any] = {
        "run_id": run_id,
        "workdir": str(workdir),
        "data": {"out_dir": str(curated)},
        "models": {"student": str(student), "teacher": None, "device": "cpu", "torch_threads": 2},
        "algorithm": {"name": "grpo"},
        "eval": {"batch_size": 3, "sampling": {"temperature": 0.0, "max_new_tokens": 12}},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return Run.create(RunConfig.model_validate(data))


def predictions(run: Run, iteration: int) -> list[dict]:
    return run.store.read(
        "eval_predictions", {"run_id": run.run_id, "iteration": iteration}
    ).to_pylist()


def metrics(run: Run, iteration: int) -> list[dict]:
    return run.store.read(
        "eval_metrics", {"run_id": run.run_id, "iteration": iteration}
    ).to_pylist()


def mismatches(store: Store) -> int:
    return store.query(RECOMPUTE_SQL).column("mismatches")[0].as_py()


# ------------------------------------------------------------------------------ with a fake backend
def test_evaluate_writes_tables_and_skips_complete_modalities(
    tmp_path: Path, curated_bundled: Path
) -> None:
    run = make_run(tmp_path, curated_bundled, tmp_path / "unused-model")
    n_test = run.questions().test.num_rows
    backend = FakeBackend()
    result = evaluate(run, 0, backend=backend)
    rows = predictions(run, 0)
    assert len(rows) == n_test == result.n_generated
    assert result.evaluated_modalities == list(MODALITIES)
    # batch_size 3, 2 items per modality: one call per modality, greedy decoding
    assert [len(c) for c in backend.calls] == [2] * 8
    assert all(
        s.temperature == 0.0 and s.n == 1 and s.max_new_tokens == 12 for s in backend.samplings
    )
    # the prompt is the evaluation prompt (training prompt by default) with the image
    request = backend.calls[0][0]
    assert request.image is not None and request.messages[0]["content"][0] == {"type": "image"}
    assert "Think through the question step by step" in request.messages[0]["content"][1]["text"]
    for r in rows:
        assert (
            r["correct"] == (r["parsed_answer"] == r["gold_letter"]) and r["reward_format"] == 1.0
        )
    assert {m["modality"]: m["in_domain"] for m in metrics(run, 0)} == {
        m: m == "MRI" for m in MODALITIES
    }
    assert mismatches(run.store) == 0
    assert backend.closed is False  # a backend passed in belongs to the caller

    again = evaluate(run, 0, backend=FakeBackend(fail_after=0))  # nothing left to generate
    assert again.skipped_modalities == list(MODALITIES) and again.n_generated == 0
    assert predictions(run, 0) == rows


def test_evaluate_redoes_modalities_whose_items_changed(
    tmp_path: Path, curated_bundled: Path
) -> None:
    run = make_run(tmp_path, curated_bundled, tmp_path / "m", eval={"max_items_per_modality": 1})
    evaluate(run, 2, backend=FakeBackend())
    assert len(predictions(run, 2)) == 8 and {m["n"] for m in metrics(run, 2)} == {1}
    run.config.eval.max_items_per_modality = None
    result = evaluate(run, 2, backend=FakeBackend())
    assert result.evaluated_modalities == list(MODALITIES)
    assert len(predictions(run, 2)) == 16 and {m["n"] for m in metrics(run, 2)} == {2}
    assert mismatches(run.store) == 0


def test_sampled_evaluation_seeds_each_item(tmp_path: Path, curated_bundled: Path) -> None:
    run = make_run(
        tmp_path,
        curated_bundled,
        tmp_path / "m",
        eval={"greedy": False, "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5}},
    )
    backend = FakeBackend()
    evaluate(run, 1, backend=backend)
    sampling = backend.samplings[0]
    assert (sampling.temperature, sampling.top_p, sampling.max_new_tokens) == (0.7, 0.9, 5)
    for call in backend.calls:
        for request in call:
            assert request.seed == run.seed("eval", 1, request.request_id)


def test_evaluate_fails_clearly_without_a_checkpoint(tmp_path: Path, curated_bundled: Path) -> None:
    run = make_run(tmp_path, curated_bundled, tmp_path / "m")
    with pytest.raises(Exception, match="no checkpoint for policy version 3"):
        evaluate(run, 3)


# ------------------------------------------------------------------------------ tiny model
def test_resumed_evaluation_equals_uninterrupted(
    tmp_path: Path, curated_bundled: Path, tiny_models: tuple[Path, Path]
) -> None:
    from kepo.generation import make_backend

    student, _ = tiny_models
    one_each = {"max_items_per_modality": 1}  # 8 items per evaluation keep this test quick
    whole = make_run(tmp_path / "whole", curated_bundled, student, eval=one_each)
    evaluate(whole, 0)  # builds and closes its own backend from run.policy_path(0)
    assert mismatches(whole.store) == 0

    resumed = make_run(tmp_path / "resumed", curated_bundled, student, eval=one_each)
    backend = make_backend("hf", student, device="cpu", generation_batch_size=3)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            evaluate(resumed, 0, backend=Interrupting(backend, 3))
        done = {r["modality"] for r in predictions(resumed, 0)}
        assert done == set(MODALITIES[:3])  # committed modality by modality
        assert len(metrics(resumed, 0)) == 3 and mismatches(resumed.store) == 0
        counting = Interrupting(backend, 10**6)
        result = evaluate(resumed, 0, backend=counting)
    finally:
        backend.close()
    assert result.skipped_modalities == list(MODALITIES[:3])
    assert result.evaluated_modalities == list(MODALITIES[3:])
    assert counting.calls == 5  # only the unfinished modalities were generated
    assert predictions(resumed, 0) == predictions(whole, 0)
    assert metrics(resumed, 0) == metrics(whole, 0)
    assert mismatches(resumed.store) == 0


def test_eval_cli_model_and_checkpoint_forms(
    tmp_path: Path, curated_bundled: Path, tiny_models: tuple[Path, Path]
) -> None:
    student, _ = tiny_models
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_id": "from-config",
                "workdir": str(tmp_path / "w"),
                "data": {"out_dir": str(curated_bundled), "train_modality": "CT"},
                "models": {"student": "elsewhere", "teacher": None, "device": "cpu"},
                "algorithm": {"name": "grpo"},
                "eval": {"sampling": {"max_new_tokens": 8}},
            }
        )
    )
    db = tmp_path / "base.duckdb"
    runner = CliRunner()
    args = [
        "eval",
        "--db",
        str(db),
        "--run",
        "base",
        "--model",
        str(student),
        "--config",
        str(config),
    ]
    result = runner.invoke(app, [*args, "--max-items", "1"])
    assert result.exit_code == 0, result.output
    assert "items/s" in result.output
    store = Store(db)
    cfg = store.run_config("base")
    assert Path(cfg.models.student) == student and cfg.in_domain_modality == "CT"
    rows = store.read("eval_metrics", {"run_id": "base", "iteration": 0}).to_pylist()
    assert len(rows) == 8 and [r["modality"] for r in rows if r["in_domain"]] == ["CT"]

    # The checkpoint form re-opens the registered run; everything is already there.
    result = runner.invoke(
        app, ["eval", "--db", str(db), "--run", "base", "--checkpoint", "0", "--max-items", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output
    result = runner.invoke(app, ["eval", "--db", str(db), "--run", "base"])
    assert result.exit_code == 1 and "--checkpoint" in result.output


def test_modalities_that_left_the_test_split_are_removed(
    tmp_path: Path, curated_bundled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kepo.evaluate as evaluation

    run = make_run(tmp_path, curated_bundled, tmp_path / "m")
    evaluate(run, 0, backend=FakeBackend())
    full = evaluation.select_items

    def mri_and_ct_only(test: pa.Table, cap: int | None) -> dict[str, list[dict]]:
        return {m: rows for m, rows in full(test, cap).items() if m in ("MRI", "CT")}

    monkeypatch.setattr(evaluation, "select_items", mri_and_ct_only)
    result = evaluate(run, 0, backend=FakeBackend(fail_after=0))
    assert result.skipped_modalities == ["MRI", "CT"]
    assert {r["modality"] for r in predictions(run, 0)} == {"MRI", "CT"}
    assert sorted(m["modality"] for m in metrics(run, 0)) == ["CT", "MRI"]
    assert mismatches(run.store) == 0


class Watching(FakeBackend):
    """A fake backend that, before each generate call, notes which modalities another process
    would find committed (a fresh read of the file)."""

    def __init__(self, db: Path, fail_after: int | None = None) -> None:
        super().__init__(fail_after)
        self.db = db
        self.seen: list[set[str]] = []

    def generate(self, requests: Sequence[Any], sampling: Any, *, desc: str = "") -> Any:
        rows = Store(self.db).read("eval_predictions", columns=["modality"])
        self.seen.append(set(rows.column("modality").to_pylist()))
        return super().generate(requests, sampling, desc=desc)


def test_finished_modalities_commit_together_within_the_commit_interval(
    tmp_path: Path, curated_bundled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kepo.evaluate as evaluation

    run = make_run(tmp_path / "batched", curated_bundled, tmp_path / "m")
    writes: list[list[str]] = []
    real = Store.replace_rows

    def counted(self: Store, tables: Any, *, where: Any) -> Any:
        if "eval_predictions" in tables:  # not the metrics recomputed at the end
            writes.append(list(where["modality"]))
        return real(self, tables, where=where)

    monkeypatch.setattr(Store, "replace_rows", counted)
    backend = Watching(run.store.path)
    result = evaluate(run, 0, backend=backend)  # well within COMMIT_EVERY_S: one commit
    assert writes == [list(MODALITIES)] and result.evaluated_modalities == list(MODALITIES)
    assert backend.seen == [set()] * 8
    assert mismatches(run.store) == 0

    monkeypatch.setattr(evaluation, "COMMIT_EVERY_S", 0.0)  # every modality commits alone
    writes.clear()
    run = make_run(tmp_path / "each", curated_bundled, tmp_path / "m")
    backend = Watching(run.store.path)
    result = evaluate(run, 0, backend=backend)
    assert writes == [[m] for m in MODALITIES] and result.evaluated_modalities == list(MODALITIES)
    assert backend.seen == [set(MODALITIES[:i]) for i in range(8)]
    assert mismatches(run.store) == 0


def test_a_failing_modality_commits_the_finished_ones_before_the_error(
    tmp_path: Path, curated_bundled: Path
) -> None:
    run = make_run(tmp_path, curated_bundled, tmp_path / "m")
    backend = Watching(run.store.path, fail_after=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(run, 0, backend=backend)
    assert backend.seen == [set()] * 4  # nothing committed while generating ...
    assert {r["modality"] for r in predictions(run, 0)} == set(MODALITIES[:3])  # ... then these
    assert len(metrics(run, 0)) == 3 and mismatches(run.store) == 0
    result = evaluate(run, 0, backend=FakeBackend())
    assert result.skipped_modalities == list(MODALITIES[:3])
    assert result.evaluated_modalities == list(MODALITIES[3:])
