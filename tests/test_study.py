"""The learning-cliff study: config and plan, the summary SQL on hand-made rows, the study page,
and (slow) the CI-sized study end to end through the `kepo-study` flow.

The end-to-end test checks pipeline invariants — every stage of every planned run succeeded,
every checkpoint evaluated on all eight modalities, one summary row per method, the all-zero
rate computed, exploration only where it is on, the study page in the report, and that a run
repeated from the same data, models and seeds gives the same rows — never which method wins.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from test_dashboards import metric_rows, prompt_row

from kepo.config import RunConfig, load_config
from kepo.report import build_report
from kepo.store import Store
from kepo.study import (
    StudyError,
    all_zero_rates,
    curves,
    exploration_rates,
    load_study,
    plan_runs,
    reference_table,
    summary_table,
    teacher_run,
)
from schemas.tables import MODALITIES

REPO = Path(__file__).resolve().parents[1]
STUDY_TINY = REPO / "configs" / "study-tiny.yaml"
STUDY_CI = REPO / "configs" / "study-ci.yaml"
KEPO_METHODS = {"kepo-tau0", "kepo-tau1"}


# ------------------------------------------------------------------------------ config and plan
@pytest.mark.parametrize("path", [STUDY_TINY, STUDY_CI])
def test_plan_has_one_run_per_method_and_seed(path: Path, tmp_path: Path) -> None:
    study = load_study(path, workdir=tmp_path / "w")
    plan = plan_runs(study)
    assert len(plan) == len(study.methods) * len(study.seeds)
    assert len({p.run_id for p in plan}) == len(plan)
    assert {m.name for m in study.methods} == {
        "grpo", "gkd-lambda1", "kepo-ke-tau0", "kepo-ke-tau1", "kepo-tau0", "kepo-tau1",
    }  # fmt: skip
    for planned in plan:
        cfg = load_config(planned.config_path, overrides=planned.overrides)
        assert cfg.run_id == planned.run_id and cfg.study is not None
        assert cfg.workdir == tmp_path / "w" and cfg.data.out_dir == tmp_path / "w" / "data"
        assert cfg.iterations == study.iterations and cfg.models.torch_threads == 1
        assert cfg.seed == cfg.train.seed == cfg.study.seed
        assert cfg.in_domain_modality == study.in_domain
        assert cfg.data.bundled.difficulty[study.in_domain] == study.difficulty
        assert cfg.models.student == tmp_path / "w" / "models" / "student"
        # The demo's reward convention for every run; exploration only for KEPO.
        assert cfg.rollout.exploration.trigger_reward == "accuracy"
        assert cfg.algorithm.distill.gate.reward_part == "accuracy"
        assert cfg.exploration_active == (cfg.study.method in KEPO_METHODS)
        if cfg.algorithm.name == "kepo":
            assert cfg.algorithm.distill.gate.tau == float(cfg.study.method[-1])
        assert cfg.eval.max_items_per_modality == study.eval_items_per_modality
    reference = load_config(teacher_run(study).config_path, overrides=teacher_run(study).overrides)
    assert reference.models.student == tmp_path / "w" / "models" / "teacher"
    assert reference.iterations == 0 and reference.study.role == "teacher"


def test_study_tiny_makes_the_in_domain_modality_harder() -> None:
    study = load_study(STUDY_TINY)
    default = type(study.difficulty)()
    d = study.difficulty
    assert d.n_options > default.n_options and d.contrast < default.contrast
    assert d.lesion_scale < default.lesion_scale and d.distractors > default.distractors


@pytest.mark.parametrize("path", [STUDY_TINY, STUDY_CI])
def test_each_study_method_is_its_method_file_at_the_demo_scale(path: Path, tmp_path: Path) -> None:
    """Method x scale: what defines a method comes from its configs/methods/ file, the sizes and
    optimiser from the study's scale (demo/_common.yaml), so the study never redefines a method."""
    study = load_study(path, workdir=tmp_path / "w")
    scale = load_config(study.base_config)
    by_name = {m.name: m for m in study.methods}
    for planned in plan_runs(study):
        method = by_name[planned.run_id.split("-", 2)[2].rsplit("-s", 1)[0]]
        assert method.method is not None and method.method.parent.name == "methods"
        paper = load_config(method.method)
        cfg = load_config(planned.config_path, overrides=planned.overrides)
        assert cfg.algorithm.name == paper.algorithm.name
        assert cfg.algorithm.gkd_lambda == paper.algorithm.gkd_lambda
        assert cfg.algorithm.distill.gate.tau == paper.algorithm.distill.gate.tau
        assert cfg.rollout.exploration.enabled == paper.rollout.exploration.enabled
        assert cfg.prompts.thinking == paper.prompts.thinking
        # ...and the scale's settings, not the paper's GPU ones.
        assert cfg.train.learning_rate == scale.train.learning_rate != paper.train.learning_rate
        assert cfg.models.device == "cpu" and cfg.train.mixed_precision == "no"
        assert cfg.data.source == "bundled" and cfg.data.root is None


def test_a_scale_that_sets_a_method_defining_key_is_refused(tmp_path: Path) -> None:
    scale = tmp_path / "scale.yaml"
    scale.write_text(
        f"base: {REPO / 'configs' / 'demo' / '_common.yaml'}\nalgorithm:\n  name: grpo\n"
    )
    methods = [{"name": "kepo", "method": str(REPO / "configs" / "methods" / "kepo-tau1.yaml")}]
    study = load_study(_write(tmp_path, base_config=str(scale), methods=methods))
    with pytest.raises(StudyError, match=r"sets 'algorithm\.name', which the study's method files"):
        plan_runs(study)
    missing = [{"name": "kepo", "method": "methods/nowhere.yaml"}]
    with pytest.raises(StudyError, match=r"methods\.kepo\.method .*nowhere\.yaml does not exist"):
        load_study(_write(tmp_path, methods=missing))


def _write(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(STUDY_CI.read_text())
    data.pop("base")
    data |= {
        "base_config": str(REPO / "configs" / "demo" / "_common.yaml"),
        "in_domain": "MRI",
        "methods": [{"name": "grpo", "overrides": {"algorithm": {"name": "grpo"}}}],
    }
    data |= changes
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def test_bad_study_configs_are_refused_with_the_fix(tmp_path: Path) -> None:
    load_study(_write(tmp_path))  # the baseline file is fine
    method_data = [{"name": "grpo", "overrides": {"data": {"train_size": 3}}}]
    with pytest.raises(StudyError, match=r"methods\.grpo\.overrides: 'data\.train_size'"):
        load_study(_write(tmp_path, methods=method_data))
    with pytest.raises(StudyError, match=r"overrides: 'iterations' may not be set"):
        load_study(_write(tmp_path, overrides={"iterations": 3}))
    with pytest.raises(StudyError, match="repeat"):
        load_study(_write(tmp_path, seeds=[1, 1]))
    with pytest.raises(StudyError, match="more than once"):
        load_study(_write(tmp_path, methods=[{"name": "a"}, {"name": "a"}]))
    with pytest.raises(StudyError, match=r"base_config .* does not exist"):
        load_study(_write(tmp_path, base_config="nowhere.yaml"))
    with pytest.raises(StudyError, match="seedz: unknown field"):
        load_study(_write(tmp_path, seedz=[0]))
    # A method override that makes an invalid run config names the run.
    bad = [{"name": "grpo", "overrides": {"rollout": {"group_size": 1}}}]
    with pytest.raises(StudyError, match=r"run study-ci-grpo-s0: .*group_size"):
        plan_runs(load_study(_write(tmp_path, methods=bad)))


# ------------------------------------------------------------------------------ summary SQL
def _tagged(run_id: str, method: str, seed: int, algorithm: str, role: str = "method") -> RunConfig:
    label = "Teacher (reference)" if role == "teacher" else None
    return RunConfig(
        run_id=run_id,
        seed=seed,
        algorithm={"name": algorithm, "label": label},
        study={"name": "s", "method": method, "seed": seed, "role": role},
    )


# Accuracy at the last checkpoint (2): (MRI, every other modality except CT, CT).
LAST = {
    ("grpo", 0): (0.25, 0.5, 0.5),
    ("grpo", 1): (0.75, 0.25, 0.25),
    ("kepo", 0): (0.5, 0.5, 1.0),
    ("kepo", 1): (0.5, 0.5, 0.5),
}
# Iteration-0 prompts: n_policy_correct per prompt, and n_injected for KEPO.
CORRECT = {("grpo", 0): [0, 0, 1, 3], ("grpo", 1): [0, 2, 0, 0],
           ("kepo", 0): [0, 0, 0, 1], ("kepo", 1): [0, 1, 1, 1]}  # fmt: skip
INJECTED = {("kepo", 0): [1, 0, 2, 0], ("kepo", 1): [0, 0, 0, 0]}


def make_study_db(path: Path) -> Store:
    store = Store(path)
    store.register_run(RunConfig(run_id="untagged", algorithm={"name": "grpo"}))
    store.write_partitions(
        {"eval_metrics": metric_rows("untagged", 2, dict.fromkeys(MODALITIES, 1.0), "MRI")},
        run_id="untagged", iteration=2,
    )  # fmt: skip
    for (method, seed), (mri, other, ct) in LAST.items():
        run_id = f"s-{method}-s{seed}"
        store.register_run(_tagged(run_id, method, seed, method))
        acc = {m: (mri if m == "MRI" else ct if m == "CT" else other) for m in MODALITIES}
        for k, table in ((0, dict.fromkeys(MODALITIES, 0.0)), (2, acc)):
            store.write_partitions(
                {"eval_metrics": metric_rows(run_id, k, table, "MRI")}, run_id=run_id, iteration=k
            )
        injected = INJECTED.get((method, seed), [0] * 4)
        prompts = [
            prompt_row(run_id, 0, f"p{i}", i, n_policy_correct=c,
                       triggered=method == "kepo" and c == 0, n_attempts=2 * (c == 0),
                       n_injected=injected[i])
            for i, c in enumerate(CORRECT[(method, seed)])
        ]  # fmt: skip
        store.write_partitions({"prompts": prompts}, run_id=run_id, iteration=0)
    store.register_run(_tagged("s-teacher", "teacher", 0, "grpo", role="teacher"))
    store.write_partitions(
        {"eval_metrics": metric_rows("s-teacher", 0, dict.fromkeys(MODALITIES, 0.75), "MRI")},
        run_id="s-teacher", iteration=0,
    )  # fmt: skip
    return store


def test_summary_queries_on_hand_made_rows(tmp_path: Path) -> None:
    store = make_study_db(tmp_path / "kepo.duckdb")
    summary = {r["method"]: r for r in summary_table(store, "s")}
    assert list(summary) == ["grpo", "kepo"]  # registration order, untagged run left out
    g, k = summary["grpo"], summary["kepo"]
    assert (g["n_seeds"], g["checkpoint"], g["n_modalities"]) == (2, 2, 8)
    # grpo: ID 25 and 75 -> 50 ± 35.36; OOD 50 and 25 -> 37.5 ± 17.68
    assert g["id_mean"] == 50.0 and g["id_sd"] == pytest.approx(25 * math.sqrt(2), abs=0.01)
    assert g["ood_mean"] == 37.5 and g["ood_sd"] == pytest.approx(12.5 * math.sqrt(2), abs=0.01)
    # kepo: OOD (1 + 6 * 0.5) / 7 = 57.14 and 50 -> 53.57 ± 5.05; ID 50 ± 0
    assert k["id_mean"] == 50.0 and k["id_sd"] == 0.0
    assert k["ood_mean"] == pytest.approx(100 * (4 / 7 + 0.5) / 2, abs=0.01)
    assert k["ood_sd"] == pytest.approx(100 * (4 / 7 - 0.5) / math.sqrt(2), abs=0.01)
    assert k["avg_mean"] == pytest.approx(100 * ((0.5 + 4) / 8 + 0.5) / 2, abs=0.01)

    ref = reference_table(store, "s")
    assert len(ref) == 1 and ref[0]["method"] == "teacher" and ref[0]["id_mean"] == 75.0

    points = {(r["method"], r["iteration"]): r for r in curves(store, "s")}
    assert set(points) == {("grpo", 0), ("grpo", 2), ("kepo", 0), ("kepo", 2)}
    assert points[("grpo", 0)]["id_mean"] == 0.0 and points[("grpo", 2)]["ood_mean"] == 37.5

    zero = {r["method"]: r for r in all_zero_rates(store, "s")}
    assert (zero["grpo"]["n_prompts"], zero["grpo"]["n_all_zero"]) == (8, 5)
    assert zero["grpo"]["all_zero_rate"] == pytest.approx(5 / 8)
    assert zero["kepo"]["all_zero_rate"] == pytest.approx(4 / 8)

    explore = {r["method"]: r for r in exploration_rates(store, "s")}
    assert explore["grpo"]["n_triggered"] == 0 and explore["grpo"]["acceptance_rate"] is None
    assert (explore["kepo"]["n_triggered"], explore["kepo"]["n_accepted"]) == (4, 2)
    assert explore["kepo"]["acceptance_rate"] == pytest.approx(0.5)
    assert explore["kepo"]["trigger_rate"] == pytest.approx(4 / 8)
    assert explore["kepo"]["n_injected"] == 3


def test_report_has_the_study_page(tmp_path: Path) -> None:
    make_study_db(tmp_path / "kepo.duckdb")
    text = build_report(tmp_path / "kepo.duckdb", tmp_path / "report.html").read_text()
    assert '<section id="study-s"><h2>Study: s</h2>' in text
    page = text.split('<section id="study-s">')[1].split("</section>")[0]
    assert "50.00 ± 35.36" in page and "37.50 ± 17.68" in page  # grpo's ID and OOD
    assert '<td>Teacher (reference)</td><td>–</td><td class="num">0</td><td>75.00</td>' in page
    assert page.count('<figure class="plot">') == 3  # curves, all-zero rate, acceptance
    assert "<td>62.5 %</td>" in page  # grpo's all-zero rate at iteration 0 (5 of 8 prompts)
    # A database without study runs has no study page.
    other = tmp_path / "plain.duckdb"
    Store(other).register_run(RunConfig(run_id="x", algorithm={"name": "grpo"}))
    assert "Study:" not in build_report(other, tmp_path / "plain.html").read_text()


# ------------------------------------------------------------------------------ end to end
def _stages(store: Store, run_id: str) -> dict[tuple[int, str], str]:
    rows = store.read("stages", {"run_id": run_id}).to_pylist()
    return {(r["iteration"], r["stage"]): r["status"] for r in rows}


@pytest.mark.slow
def test_ci_study_end_to_end(tmp_path: Path, prefect_harness) -> None:
    from flows.study import kepo_study

    workdir = tmp_path / "study"
    result = kepo_study(config=str(STUDY_CI), workdir=str(workdir))
    study = load_study(STUDY_CI, workdir=workdir)
    plan = plan_runs(study)
    store = Store(result["db"])
    assert result["runs"] == [p.run_id for p in plan]

    n = study.iterations
    expected = {(0, "curate"), (0, "evaluate")}
    for k in range(n):
        expected |= {(k, "rollout"), (k, "train"), (k + 1, "evaluate")}
    for planned in plan:
        assert _stages(store, planned.run_id) == dict.fromkeys(expected, "succeeded"), (
            planned.run_id
        )
        metrics = store.read("eval_metrics", {"run_id": planned.run_id}).to_pylist()
        assert {(r["iteration"], r["modality"]) for r in metrics} == {
            (k, m) for k in range(n + 1) for m in MODALITIES
        }
    assert _stages(store, study.teacher_run_id) == {
        (0, "curate"): "succeeded",
        (0, "evaluate"): "succeeded",
    }

    summary = summary_table(store, study.name)
    assert [r["method"] for r in summary] == [m.name for m in study.methods]
    assert all(r["n_seeds"] == len(study.seeds) and r["checkpoint"] == n for r in summary)
    assert all(r["n_modalities"] == 8 and r["id_mean"] is not None for r in summary)
    assert len(reference_table(store, study.name)) == 1

    zero = all_zero_rates(store, study.name)
    assert {(r["method"], r["iteration"]) for r in zero} == {
        (m.name, k) for m in study.methods for k in range(n)
    }
    assert all(0.0 <= r["all_zero_rate"] <= 1.0 for r in zero)

    triggered = {r["method"]: r["n_triggered"] for r in exploration_rates(store, study.name)}
    for method, count in triggered.items():
        if method in KEPO_METHODS:
            assert count > 0, f"{method}: no prompt triggered exploration"
        else:
            assert count == 0, f"{method} must never explore"
    # Every prompt that triggered asked the teacher for a hint (the 20-step CI teacher's hints
    # are mostly malformed, so the hint-aware attempts themselves are left to test_rollout).
    n_hints = store.query("SELECT count(*) AS n FROM hints").to_pylist()[0]["n"]
    assert n_hints == sum(triggered.values())
    reasons = (
        store.query(
            "SELECT DISTINCT trigger_reason FROM prompts WHERE run_id LIKE ? AND run_id NOT LIKE ?",
            ["study-ci-%", "study-ci-kepo-tau%"],
        )
        .column("trigger_reason")
        .to_pylist()
    )
    assert reasons == ["exploration_off"]

    # Checkpoint 0 was generated once and shared: identical predictions in every run.
    initial = [
        store.query("SELECT question_id, output_text FROM eval_predictions WHERE run_id = ? "
                    "AND iteration = 0 ORDER BY question_id", [p.run_id]).to_pylist()
        for p in plan
    ]  # fmt: skip
    assert initial[0] and all(rows == initial[0] for rows in initial)

    report = Path(result["report"]).read_text()
    assert f'<section id="study-{study.name}">' in report

    # Reproducibility: the same command in a fresh workdir (curation, warm-up and every run
    # again) gives the very same rows.
    again = kepo_study(config=str(STUDY_CI), workdir=str(tmp_path / "again"))
    second = Store(again["db"])
    columns = {
        "eval_predictions": "run_id, iteration, question_id, output_text, correct",
        "rollouts": "run_id, iteration, prompt_id, sample_idx, source, trained, completion_ids, "
        "reward_total",
        "prompts": "run_id, iteration, prompt_id, n_policy_correct, triggered, n_injected",
        "hints": "run_id, iteration, prompt_id, raw_output, hint_text",
    }
    for table, cols in columns.items():
        sql = f"SELECT {cols} FROM {table} ORDER BY ALL"
        first_rows = store.query(sql).to_pylist()
        assert first_rows and second.query(sql).to_pylist() == first_rows, table
