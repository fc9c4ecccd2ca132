"""`kepo audit` and kepo.audit over a scripted rollout whose every decision is known in advance."""

from __future__ import annotations

import json

import pytest
from test_rollout import B, G, K, category_of, make_run, scripted_student, scripted_teacher
from typer.testing import CliRunner

from kepo.audit import prompt_story
from kepo.cli import app
from kepo.rollout import run_rollout
from kepo.store import StoreError


@pytest.fixture()
def audited_run(tmp_path, curated_bundled):
    run = make_run(tmp_path, curated_bundled)
    run_rollout(run, 0, backend=scripted_student(run), teacher_backend=scripted_teacher())
    by_category = {c: pid for pid, c in sorted(category_of(run).items(), key=lambda x: x[1])}
    return run, by_category


def test_story_of_an_accepted_prompt(audited_run):
    run, pid_of = audited_run
    story = prompt_story(run.store, run.run_id, 0, pid_of[1])
    assert story["trigger"] == {
        "triggered": True,
        "reason": "all_zero_total",
        "explanation": f"triggered: all {G} policy samples scored 0 on the total reward",
    }
    assert story["hint"]["hint_text"] == "Compare the shapes." and story["hint"]["parse_ok"]
    assert [(a["attempt_idx"], a["k_idx"]) for a in story["attempts"]] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert [a["attempt_accepted"] for a in story["attempts"]] == [False, False, True, True]
    assert story["accepted_attempt_idx"] == 1
    injected = story["injected"]
    assert [i["attempt_id"] for i in injected] == [f"{pid_of[1]}/b1/k0", f"{pid_of[1]}/b1/k1"]
    assert [i["sample_idx"] for i in injected] == [G, G + 1]
    # each injected row took the slot of the policy sample it replaced
    replaced = {r["replaced_by"]: r["slot"] for r in story["replaced"]}
    assert replaced == {i["sample_idx"]: i["slot"] for i in injected}
    # distilled = gate open (total >= 1) and trained: exactly the two injected correct answers
    assert story["distilled"] == [G, G + 1]
    assert [t["sample_idx"] for t in story["teacher_topk"]] == [G, G + 1]
    statuses = [s["status"] for s in story["samples"]]
    assert sum(s.startswith("replaced by") for s in statuses) == K
    assert "completion_ids" not in story["samples"][0] and "old_logprob_sum" in story["samples"][0]


def test_story_of_untriggered_and_exhausted_prompts(audited_run):
    run, pid_of = audited_run
    calm = prompt_story(run.store, run.run_id, 0, pid_of[0])
    assert calm["trigger"]["triggered"] is False
    assert (
        calm["trigger"]["explanation"]
        == f"not triggered: the best of the {G} policy samples scored 2 > 0 on the total reward"
    )
    assert calm["hint"] is None and calm["attempts"] == [] and calm["injected"] == []
    assert calm["distilled"] == [
        0,
        1,
    ]  # the correct and the well-formatted wrong answer (tau = 1, >=)
    spent = prompt_story(run.store, run.run_id, 0, pid_of[2])
    assert len(spent["attempts"]) == B * K and spent["injected"] == [] and spent["replaced"] == []
    assert spent["accepted_attempt_idx"] is None
    full = prompt_story(run.store, run.run_id, 0, pid_of[2], full=True)
    assert len(full["samples"][0]["completion_ids"]) == full["samples"][0]["n_tokens"]


def test_cli_json_and_rich_output(audited_run):
    run, pid_of = audited_run
    runner = CliRunner()
    base = ["audit", "--db", str(run.config.db_path), "--run", run.run_id, "--iteration", "0"]
    result = runner.invoke(app, [*base, "--prompt", pid_of[1], "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["prompt_id"] == pid_of[1] and len(doc["injected"]) == K
    result = runner.invoke(
        app, [*base, "--prompt", pid_of[1], "--width", "40"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    for phrase in (
        "exploration: all_zero_total",
        "teacher hint",
        "hint-aware attempts",
        "injected: sample",
        "replaced (kept, not trained)",
        "distilled (gate open and trained)",
    ):
        assert phrase in result.stdout, phrase
    listing = runner.invoke(app, base, env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and pid_of[2] in listing.stdout


def test_unknown_prompt_is_a_clear_error(audited_run):
    run, _ = audited_run
    with pytest.raises(StoreError, match=r"no prompt 'nope'.*prompts of that iteration"):
        prompt_story(run.store, run.run_id, 0, "nope")
    result = CliRunner().invoke(
        app,
        [
            "audit",
            "--db",
            str(run.config.db_path),
            "--run",
            run.run_id,
            "--iteration",
            "5",
            "--prompt",
            "x",
        ],
    )
    assert result.exit_code == 1 and "no rollout for iteration 5" in " ".join(result.output.split())


def test_dashboards_on_a_known_rollout(audited_run):
    """The exploration dashboards over a rollout whose decisions are scripted: positions 0..3 are
    categories 0, 1, 2, 0 (no trigger / accepted at attempt 1 / budget exhausted / no trigger)."""
    from kepo.queries import named_query

    run, pid_of = audited_run

    def dash(name):
        return run.store.query(named_query(name)).to_pylist()

    [ex] = dash("exploration")
    assert (ex["n_prompts"], ex["n_triggered"], ex["trigger_rate"]) == (4, 2, 0.5)
    assert (ex["n_accepted"], ex["acceptance_rate"], ex["attempts_per_accepted"]) == (1, 0.5, 2)
    assert (ex["n_attempts"], ex["n_injected"], ex["triggered_by_batch"]) == (2 * B, K, 0)
    [never] = dash("hints_never_accepted")
    assert never["prompt_id"] == pid_of[2] and (never["n_attempts"], never["n_samples"]) == (
        B,
        B * K,
    )
    assert never["n_correct"] == 0
    [leaks] = dash("leaks")
    assert (leaks["n_hint_aware"], leaks["n_leaks"], leaks["n_injected"]) == (2 * B * K, 0, K)
    gate = {r["source"]: r for r in dash("gate")}
    # policy: 16 samples - 2 replaced = 14 trained; open = samples 0 and 1 of the 2 untriggered prompts
    assert (gate["policy"]["n_trained"], gate["policy"]["n_gate_open"]) == (4 * G - K, 4)
    assert gate["policy"]["gate_frac_open"] == round(4 / 14, 4)
    assert (
        gate["hint"]["n_trained"],
        gate["hint"]["n_gate_open"],
        gate["hint"]["n_teacher_topk"],
    ) == (K, K, K)
