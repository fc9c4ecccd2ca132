"""Stage integrity: a run's rows, files and settings always agree, whichever entry point runs it.

Each test reproduces a defect found by using the CLI as a new user would (copies of a run
directory, a second process, a kill, a long reader, wrong paths) on the tiny models and the
small bundled curated set of the session fixtures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_flows import REPO, write_config
from typer.testing import CliRunner

from kepo.cli import app
from kepo.config import load_config
from kepo.pipeline import PlannedStage, execute, is_done
from kepo.run import Run, model_fingerprint
from kepo.store import StageBusyError, Store, StoreError

RUN_ID = "flow-run"


def one_line_error(result) -> str:
    """The CLI exited with a message, not a traceback; returns the output."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_models, curated_bundled) -> Path:
    """A run directory whose iteration 0 is rolled out and trained (policy version 1 exists)."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(
        root,
        curated_bundled,
        tiny_models,
        **{"rollout.prompts_per_iteration": 2, "store.lock_timeout_s": 0.3},
    )
    run = Run.create(load_config(config))
    execute(run, PlannedStage(0, "rollout"))
    execute(run, PlannedStage(0, "train"))
    return run.workdir


def copy_of(trained_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(trained_run, target)
    return target


def tree_state(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ------------------------------------------------------------------------------ paths
def test_a_copied_workdir_never_writes_into_the_original(trained_run, tmp_path) -> None:
    copy = copy_of(trained_run, tmp_path)
    original = tree_state(trained_run / "checkpoints")
    result = CliRunner().invoke(
        app, ["train", "--db", str(copy / "kepo.duckdb"), "--run", RUN_ID, "--iteration", "0"]
    )
    assert result.exit_code == 0, result.output
    assert tree_state(trained_run / "checkpoints") == original  # the original is untouched
    run = Run.open(copy / "kepo.duckdb", RUN_ID)
    assert run.workdir == copy.resolve()
    new = run.policy_path(1)
    assert new.resolve().is_relative_to(copy.resolve()) and (new / "config.json").is_file()


# ------------------------------------------------------------------------------ evaluation
def test_eval_does_not_reuse_predictions_of_other_weights(
    trained_run, tmp_path, tiny_models
) -> None:
    from kepo.evaluate import evaluate

    run = Run.open(copy_of(trained_run, tmp_path) / "kepo.duckdb", RUN_ID)
    student = tiny_models[0]
    first = evaluate(run, 1, model_path=student)  # some other model's answers, as version 1
    assert first.n_generated > 0
    second = evaluate(run, 1)  # the real checkpoint 1: nothing may be reused
    assert second.skipped_modalities == []
    assert second.n_generated == first.n_generated
    stored = run.store.read("eval_predictions", {"run_id": RUN_ID, "iteration": 1})
    assert set(stored.column("model_sha256").to_pylist()) == {model_fingerprint(run.policy_path(1))}
    assert model_fingerprint(run.policy_path(1)) != model_fingerprint(student)
    third = evaluate(run, 1)  # the same weights again: resumed
    assert third.n_generated == 0


def test_eval_cli_refuses_another_model_on_a_run(tmp_path, curated_bundled, tiny_models) -> None:
    config = write_config(tmp_path, curated_bundled, tiny_models, **{"algorithm.name": "grpo"})
    db = str(tmp_path / "base.duckdb")
    base = ["eval", "--db", db, "--run", "base", "--config", str(config), "--max-items", "1"]
    first = CliRunner().invoke(app, [*base, "--model", str(tiny_models[0])])
    assert first.exit_code == 0, first.output
    before = Store(db).read("eval_metrics").to_pylist()
    out = one_line_error(CliRunner().invoke(app, [*base, "--model", str(tiny_models[1])]))
    assert "models.student" in out and "--discard-stale" in out
    assert Store(db).read("eval_metrics").to_pylist() == before


# ------------------------------------------------------------------------------ settings
def test_changed_settings_that_contradict_rows_are_refused(trained_run, tmp_path) -> None:
    copy = copy_of(trained_run, tmp_path)
    store = Store(copy / "kepo.duckdb")
    stored = Run.open(store.path, RUN_ID).config  # workdir: the copy
    changed = stored.model_copy(deep=True)
    changed.rollout.group_size = 3
    with pytest.raises(StoreError, match=r"rollout\.group_size.*--discard-stale"):
        Run.create(changed)
    assert store.run_config(RUN_ID).rollout.group_size == 2  # the stored config is kept
    assert store.count("rollouts", {"run_id": RUN_ID}) > 0

    harmless = stored.model_copy(deep=True)
    harmless.iterations = 5
    Run.create(harmless)  # more iterations invalidate nothing
    assert store.run_config(RUN_ID).iterations == 5

    Run.create(changed, discard_stale=True)
    assert store.run_config(RUN_ID).rollout.group_size == 3
    assert store.count("rollouts", {"run_id": RUN_ID}) == 0
    assert store.count("checkpoints", {"run_id": RUN_ID}) == 0
    assert {r["stage"] for r in store.read("stages").to_pylist()} <= {"curate"}


# ------------------------------------------------------------------------------ stage rows
def test_train_command_writes_the_stage_row_and_replaces_a_failed_one(
    trained_run, tmp_path
) -> None:
    copy = copy_of(trained_run, tmp_path)
    store = Store(copy / "kepo.duckdb")
    store.set_stage(RUN_ID, 0, "train", "failed", error="an old failure")
    stale = copy / "checkpoints" / RUN_ID / "policy-0001.tmp-999999"  # a killed attempt's copy
    stale.mkdir()
    result = CliRunner().invoke(
        app, ["train", "--db", str(copy / "kepo.duckdb"), "--run", RUN_ID, "--iteration", "0"]
    )
    assert result.exit_code == 0, result.output
    row = store.read("stages", {"run_id": RUN_ID, "iteration": 0, "stage": "train"}).to_pylist()[0]
    assert row["status"] == "succeeded" and row["error"] is None and row["attempt"] == 2
    assert not stale.exists()


def test_a_checkpoint_becomes_visible_only_when_complete(
    trained_run, tmp_path, monkeypatch
) -> None:
    copy = copy_of(trained_run, tmp_path)
    run = Run.open(copy / "kepo.duckdb", RUN_ID)
    recorded = run.policy_path(1)
    real_rename = Path.rename

    def killed_at_rename(self, target):
        if "policy-0001" in str(target):
            raise OSError("killed while swapping the checkpoint in")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_at_rename)
    with pytest.raises(OSError, match="killed"):
        execute(run, PlannedStage(0, "train"))
    monkeypatch.undo()
    assert run.policy_path(1) == recorded
    assert (recorded / "config.json").is_file() and any(recorded.glob("*.safetensors"))


def test_resume_checks_that_a_succeeded_stage_left_its_outputs(trained_run, tmp_path) -> None:
    run = Run.open(copy_of(trained_run, tmp_path) / "kepo.duckdb", RUN_ID)
    assert is_done(run, 0, "train") and is_done(run, 0, "rollout")
    shutil.rmtree(run.policy_path(1))
    assert not is_done(run, 0, "train")
    run.store.replace_rows({"prompts": []}, where={"run_id": RUN_ID, "iteration": 0})
    assert not is_done(run, 0, "rollout")


def test_a_redone_stage_makes_the_stages_that_read_it_stale(trained_run, tmp_path, caplog) -> None:
    """`kepo train --iteration 0` rerun on a run whose iteration 1 is rolled out and trained:
    the rollout of iteration 1 was sampled from the policy version that rerun replaced, and
    the training of iteration 1 resumed from it. Both were trusted as done (a resume checked
    only that their rows and folders exist); now the rerun says so and a resume redoes them,
    in order, while the stages before stay done."""
    run = Run.open(copy_of(trained_run, tmp_path) / "kepo.duckdb", RUN_ID)
    execute(run, PlannedStage(1, "rollout"))
    execute(run, PlannedStage(1, "train"))
    assert is_done(run, 1, "rollout") and is_done(run, 1, "train")
    caplog.set_level("WARNING", logger="kepo.pipeline")
    result = CliRunner().invoke(
        app, ["train", "--db", str(run.store.path), "--run", RUN_ID, "--iteration", "0"]
    )
    assert result.exit_code == 0, result.output
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "rollout of iteration 1, train of iteration 1" in warned, warned
    assert is_done(run, 0, "rollout") and is_done(run, 0, "train")
    assert not is_done(run, 1, "rollout")
    assert not is_done(run, 1, "train")
    execute(run, PlannedStage(1, "rollout"))  # what a resume runs next
    assert is_done(run, 1, "rollout") and not is_done(run, 1, "train")
    execute(run, PlannedStage(1, "train"))
    assert is_done(run, 1, "train")


# ------------------------------------------------------------------------------ leases
_HOLDER = """
import sys, time
from kepo.pipeline import run_stage
from kepo.run import Run
run = Run.open(sys.argv[1], sys.argv[2])
run_stage(run, 0, "train", lambda: (print("holding", flush=True), time.sleep(120)))
"""


def test_a_second_copy_of_a_running_stage_is_refused(trained_run, tmp_path) -> None:
    copy = copy_of(trained_run, tmp_path)
    db = copy / "kepo.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(db), RUN_ID],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        run = Run.open(db, RUN_ID)
        with pytest.raises(StageBusyError, match="already running"):
            execute(run, PlannedStage(0, "train"))
        result = CliRunner().invoke(
            app, ["train", "--db", str(db), "--run", RUN_ID, "--iteration", "0"]
        )
        assert "already running" in one_line_error(result)
        assert not list(run.checkpoint_dir(1).parent.glob("*.tmp*"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The holder is gone (kill -9): its lease is taken over, and every attempt is counted.
    execute(run, PlannedStage(0, "train"))
    row = run.store.read("stages", {"run_id": RUN_ID, "iteration": 0, "stage": "train"})
    assert row.to_pylist()[0]["status"] == "succeeded"
    assert row.to_pylist()[0]["attempt"] == 3


# ------------------------------------------------------------------------------ long readers
_READER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
print("reading", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold_read_lock(db: Path, seconds: float) -> subprocess.Popen:
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(db), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert reader.stdout.readline().strip() == "reading"
    return reader


def test_a_long_reader_does_not_discard_a_finished_rollout(
    trained_run, tmp_path, monkeypatch
) -> None:
    import kepo.rollout as rollout

    run = Run.open(copy_of(trained_run, tmp_path) / "kepo.duckdb", RUN_ID)
    before = run.store.query(
        "SELECT prompt_id, sample_idx, completion_ids FROM rollouts ORDER BY ALL"
    ).to_pylist()
    computed = []
    real = rollout.compute_rollout
    readers = []

    def compute_then_reader_arrives(*args, **kw):
        result = real(*args, **kw)
        computed.append(1)
        readers.append(_hold_read_lock(run.store.path, 3.0))  # longer than lock_timeout_s
        return result

    monkeypatch.setattr(rollout, "compute_rollout", compute_then_reader_arrives)
    execute(run, PlannedStage(0, "rollout"))  # waits for the reader, then commits
    readers[0].wait(timeout=30)
    assert computed == [1]
    assert run.store.stage_status(RUN_ID, 0, "rollout") == "succeeded"
    after = run.store.query(
        "SELECT prompt_id, sample_idx, completion_ids FROM rollouts ORDER BY ALL"
    ).to_pylist()
    assert after == before


def test_rollout_resumes_from_its_shards_after_the_lock_wait_runs_out(
    trained_run, tmp_path, monkeypatch
) -> None:
    import kepo.pipeline as pipeline
    import kepo.rollout as rollout

    run = Run.open(copy_of(trained_run, tmp_path) / "kepo.duckdb", RUN_ID)
    real = rollout.compute_rollout
    readers = []

    def compute_then_reader_stays(*args, **kw):
        result = real(*args, **kw)
        readers.append(_hold_read_lock(run.store.path, 8.0))
        return result

    monkeypatch.setattr(pipeline, "COMMIT_PATIENCE", 2, raising=False)
    monkeypatch.setattr(rollout, "compute_rollout", compute_then_reader_stays)
    with pytest.raises(StoreError, match="kept in"):
        execute(run, PlannedStage(0, "rollout"))
    readers[0].wait(timeout=30)

    def must_not_recompute(*args, **kw):
        raise AssertionError("the finished rollout was computed again")

    monkeypatch.setattr(rollout, "compute_rollout", must_not_recompute)
    execute(run, PlannedStage(0, "rollout"))
    assert run.store.stage_status(RUN_ID, 0, "rollout") == "succeeded"


# ------------------------------------------------------------------------------ one-line errors
def test_stage_commands_answer_bad_input_in_one_line(trained_run, tmp_path) -> None:
    copy = copy_of(trained_run, tmp_path)
    db = str(copy / "kepo.duckdb")
    out = one_line_error(
        CliRunner().invoke(app, ["rollout", "--db", db, "--run", "nope", "--iteration", "0"])
    )
    assert "no run 'nope'" in out and RUN_ID in out

    garbage = tmp_path / "notes.duckdb"
    garbage.write_text("not a database")
    for bad, words in ((tmp_path, "is a folder"), (garbage, "is not a DuckDB database")):
        stage = ["--run", RUN_ID, "--iteration", "0"]
        for args in (
            ["audit", "--db", str(bad), *stage],
            ["report", "--db", str(bad), "--out", str(tmp_path / "r.html")],
            ["rollout", "--db", str(bad), *stage],
            ["train", "--db", str(bad), *stage],
            ["eval", "--db", str(bad), "--run", RUN_ID, "--checkpoint", "0"],
        ):
            out = one_line_error(CliRunner().invoke(app, args))
            assert words in out, (args, out)


def test_a_truncated_curated_file_is_named_or_recurated(
    tmp_path, tiny_models, curated_bundled
) -> None:
    curated = tmp_path / "curated"
    shutil.copytree(curated_bundled, curated)
    config = write_config(tmp_path, curated, tiny_models)
    run = Run.create(load_config(config))
    execute(run, PlannedStage(0, "curate"))
    assert is_done(run, 0, "curate")
    train = curated / "train.parquet"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    # `kepo run` does not trust the succeeded curation any more: it curates again.
    assert not is_done(Run.open(run.store.path, RUN_ID), 0, "curate")
    result = CliRunner().invoke(
        app, ["rollout", "--db", str(run.store.path), "--run", RUN_ID, "--iteration", "0"]
    )
    out = one_line_error(result)
    assert str(curated) in out and "kepo curate" in out


def test_kepo_run_refuses_a_missing_student_before_any_stage(
    tmp_path, tiny_models, curated_bundled
) -> None:
    config = write_config(tmp_path, curated_bundled, (tmp_path / "no-such-student", tiny_models[1]))
    out = one_line_error(CliRunner().invoke(app, ["run", str(config)]))
    assert "models.student" in out and "no-such-student" in out
    db = tmp_path / "work" / "kepo.duckdb"
    assert not db.exists() or Store(db).read("stages").num_rows == 0


def test_an_unwritable_checkpoint_folder_is_refused_before_training(trained_run, tmp_path) -> None:
    copy = copy_of(trained_run, tmp_path)
    folder = copy / "checkpoints" / RUN_ID
    shutil.rmtree(folder)
    folder.write_text("a file where the checkpoint folder should be")
    store = Store(copy / "kepo.duckdb")
    steps_before = store.read("train_steps").to_pylist()
    result = CliRunner().invoke(
        app, ["train", "--db", str(copy / "kepo.duckdb"), "--run", RUN_ID, "--iteration", "0"]
    )
    out = one_line_error(result)
    assert "not writable" in out and str(folder) in out
    assert store.read("train_steps").to_pylist() == steps_before


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_a_killed_kepo_run_leaves_no_prefect_server(tmp_path, tiny_models, curated_bundled) -> None:
    config = write_config(tmp_path, curated_bundled, tiny_models)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO))
    kepo = Path(sys.executable).with_name("kepo")
    proc = subprocess.Popen(
        [str(kepo), "run", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    server: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not server and proc.poll() is None:
            time.sleep(0.5)
            server = {
                c
                for c in _children(proc.pid)
                if b"uvicorn" in Path(f"/proc/{c}/cmdline").read_bytes()
            }
        assert server, "kepo run started no temporary Prefect API"
        time.sleep(2.0)
        os.kill(proc.pid, signal.SIGKILL)  # only the main process, as a user's kill -9 does
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in server):
            time.sleep(0.5)
        left = [p for p in server if _alive(p)]
        assert not left, f"the temporary Prefect API {left} outlived the killed kepo run"
    finally:
        for pid in server:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_stage_without_its_input_is_refused_before_anything_is_recorded(
    trained_run, tmp_path
) -> None:
    copy = copy_of(trained_run, tmp_path)
    db = str(copy / "kepo.duckdb")
    rows_before = Store(db).read("stages").to_pylist()
    out = one_line_error(
        CliRunner().invoke(app, ["eval", "--db", db, "--run", RUN_ID, "--checkpoint", "5"])
    )
    assert "no checkpoint for policy version 5" in out
    out = one_line_error(
        CliRunner().invoke(app, ["train", "--db", db, "--run", RUN_ID, "--iteration", "3"])
    )
    assert "no checkpoint for policy version 3" in out
    out = one_line_error(
        CliRunner().invoke(app, ["rollout", "--db", db, "--run", RUN_ID, "--iteration", "-1"])
    )
    assert "iteration must be >= 0" in out
    assert Store(db).read("stages").to_pylist() == rows_before  # no row for unreachable stages
    out = one_line_error(
        CliRunner().invoke(
            app, ["audit", "--db", str(tmp_path / "nowhere.duckdb"), "--run", RUN_ID, "-k", "0"]
        )
    )
    assert "no such database" in out
