"""The Prefect side of the pipeline: stage bookkeeping, failure, resume, sharding, deployments.

These run the real stages on the tiny Hugging Face models and the small bundled curated set
(session fixtures), through real Prefect flows (a temporary local API, or a `prefect server`
plus a served deployment for the deployment test). They prove the orchestration contract —
which stages run, in which order, what is recorded and that reruns do not duplicate rows — not
that any method learns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kepo.run import Run
from kepo.store import Store

REPO = Path(__file__).resolve().parents[1]

# Keys (beyond run_id, iteration) that identify a row of each per-iteration table.
TABLE_KEYS = {
    "prompts": "prompt_id",
    "rollouts": "prompt_id, sample_idx",
    "hints": "prompt_id",
    "hint_attempts": "prompt_id, attempt_idx, k_idx",
    "train_steps": "step",
    "checkpoints": "1",
    "eval_predictions": "question_id",
    "eval_metrics": "modality",
}


def write_config(
    tmp_path: Path, curated: Path, models: tuple[Path, Path], *, name: str = "run.yaml", **overrides
) -> Path:
    """A tiny KEPO run config over the session's curated set (same settings, so it is reused)."""
    student, teacher = models
    data = {
        "run_id": "flow-run",
        "workdir": str(tmp_path / "work"),
        "seed": 3,
        "iterations": 2,
        "data": {
            "out_dir": str(curated),
            "train_size": 12,
            "test_per_modality": 2,
            "bundled": {
                "synthetic_per_modality": 10,
                "real_variants_per_image": 1,
                "image_size": 32,
            },
        },
        "models": {
            "student": str(student),
            "teacher": str(teacher),
            "device": "cpu",
            "torch_threads": 1,
        },
        "rollout": {
            "prompts_per_iteration": 4,
            "group_size": 2,
            "sampling": {"max_new_tokens": 8},
            "exploration": {
                "enabled": True,
                "budget": 1,
                "inject_k": 1,
                "hint_sampling": {"temperature": 0.0, "max_new_tokens": 8},
            },
        },
        "algorithm": {"name": "kepo"},
        "train": {"learning_rate": 1e-3, "micro_batch_size": 4, "grad_accum_steps": 2},
        "eval": {"max_items_per_modality": 1, "batch_size": 8, "sampling": {"max_new_tokens": 8}},
    }
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def assert_no_duplicates(store: Store) -> None:
    for table, key in TABLE_KEYS.items():
        dup = store.query(
            f"SELECT count(*) AS n FROM (SELECT run_id, iteration, {key}, count(*) AS c "
            f"FROM {table} GROUP BY ALL HAVING c > 1)"
        ).to_pylist()[0]["n"]
        assert dup == 0, table


def stage_rows(store: Store) -> dict[tuple[int, str], dict]:
    return {(r["iteration"], r["stage"]): r for r in store.read("stages").to_pylist()}


@pytest.mark.slow
def test_run_flow_records_every_stage(
    tmp_path, tiny_models, curated_bundled, prefect_harness
) -> None:
    from flows.iteration import kepo_run

    config = write_config(tmp_path, curated_bundled, tiny_models)
    db = kepo_run(str(config))
    store = Store(db)
    stages = stage_rows(store)
    expected = {
        (0, "curate"),
        (0, "evaluate"),
        (0, "rollout"),
        (0, "train"),
        (1, "evaluate"),
        (1, "rollout"),
        (1, "train"),
        (2, "evaluate"),
    }
    assert set(stages) == expected
    assert all(r["status"] == "succeeded" and r["attempt"] == 1 for r in stages.values())
    assert (
        store.query("SELECT count(DISTINCT iteration) AS n FROM checkpoints").to_pylist()[0]["n"]
        == 2
    )
    assert_no_duplicates(store)
    # A second call finds everything done and runs nothing.
    kepo_run(str(config))
    assert all(r["attempt"] == 1 for r in stage_rows(store).values())


def test_failed_stage_is_recorded_and_the_flow_fails(
    tmp_path, tiny_models, curated_bundled, prefect_harness
) -> None:
    from flows.iteration import kepo_iteration
    from kepo.config import load_config

    config = write_config(tmp_path, curated_bundled, (tmp_path / "missing-student", tiny_models[1]))
    run = Run.create(load_config(config))
    state = kepo_iteration(run.run_id, 0, workdir=str(run.workdir), return_state=True)
    assert state.is_failed()
    row = stage_rows(run.store)[(0, "rollout")]
    assert row["status"] == "failed" and row["finished_at"] is not None
    assert "missing-student" in row["error"]
    assert (0, "train") not in stage_rows(run.store)  # nothing after the failed stage ran


@pytest.mark.slow
def test_sharded_rollout_equals_unsharded(
    tmp_path, tiny_models, curated_bundled, prefect_harness
) -> None:
    from flows.iteration import kepo_iteration
    from kepo.config import load_config

    columns = (
        "prompt_id, sample_idx, slot, source, trained, completion_ids, sampled_logprobs, "
        "old_logprobs, reward_total, advantage, gate_open"
    )
    rows = {}
    for shards in (1, 2):
        config = write_config(
            tmp_path / f"s{shards}",
            curated_bundled,
            tiny_models,
            **{"rollout.shards": shards, "eval.every": 5},
        )
        run = Run.create(load_config(config))
        state = kepo_iteration(run.run_id, 0, workdir=str(run.workdir), return_state=True)
        assert state.is_completed(), state
        rows[shards] = run.store.query(
            f"SELECT {columns} FROM rollouts ORDER BY prompt_id, sample_idx"
        ).to_pylist()
        for table in ("prompts", "hints", "hint_attempts"):
            rows[(shards, table)] = run.store.query(
                f"SELECT * EXCLUDE (run_id) FROM {table} ORDER BY ALL"
            ).to_pylist()
    assert rows[1] and len(rows[1]) == len(rows[2])
    for a, b in zip(rows[1], rows[2], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key in ("sampled_logprobs", "old_logprobs", "advantage") and a[key] is not None:
                assert b[key] == pytest.approx(a[key], abs=1e-5), key
            else:
                assert a[key] == b[key], key
    for table in ("prompts", "hints", "hint_attempts"):
        assert len(rows[(1, table)]) == len(rows[(2, table)])
    shard_dirs = list((tmp_path / "s2" / "work" / "shards").rglob("manifest.json"))
    assert len(shard_dirs) == 2  # two shard tasks each wrote their Parquet files


_RESUME_SCRIPT = """
import sys
from flows.iteration import kepo_run
kepo_run(sys.argv[1])
"""


@pytest.mark.slow
def test_killed_during_training_resumes_at_training(tmp_path, tiny_models, curated_bundled) -> None:
    """SIGKILL the run flow while iteration 1 trains; the rerun continues at iteration 1's training."""
    # enough passes that training lasts well beyond the 50 ms status poll
    config = write_config(tmp_path, curated_bundled, tiny_models, **{"train.passes": 40})
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO))
    # Own process group: the flow starts a temporary Prefect API as a child, which must die too.
    proc = subprocess.Popen(
        [sys.executable, "-c", _RESUME_SCRIPT, str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    db = tmp_path / "work" / "kepo.duckdb"
    deadline = time.monotonic() + 600
    killed = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    status = Store(db, lock_timeout_s=0.2).stage_status("flow-run", 1, "train")
                except Exception:  # the writer holds the file for a moment
                    status = None
                if status == "running":
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
                    break
            time.sleep(0.05)
    finally:
        if not killed:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert killed, "the flow finished or stalled before iteration 1's training started"
    store = Store(db)
    before = stage_rows(store)
    assert (
        before[(1, "train")]["status"] == "running"
        and before[(1, "rollout")]["status"] == "succeeded"
    )
    rollout_rows = store.query(
        "SELECT completion_ids FROM rollouts WHERE iteration = 1 ORDER BY ALL"
    ).to_pylist()

    subprocess.run(
        [sys.executable, "-c", _RESUME_SCRIPT, str(config)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    after = stage_rows(store)
    assert after[(1, "rollout")]["attempt"] == 1  # the rollout was not redone ...
    assert after[(1, "train")]["attempt"] == 2 and after[(1, "train")]["status"] == "succeeded"
    assert all(r["status"] == "succeeded" for r in after.values())
    assert (2, "evaluate") in after
    # ... and its rows are the very same ones
    assert (
        store.query(
            "SELECT completion_ids FROM rollouts WHERE iteration = 1 ORDER BY ALL"
        ).to_pylist()
        == rollout_rows
    )
    assert_no_duplicates(store)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deployment_runs_iterations(tmp_path, tiny_models, curated_bundled) -> None:
    """`prefect server start` + `python -m flows.serve` + two deployment runs (iterations 0 and 1)."""
    from kepo.config import load_config

    config = write_config(tmp_path, curated_bundled, tiny_models)
    run = Run.create(load_config(config))
    port = _free_port()
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PYTHONPATH=str(REPO),
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    prefect = str(Path(sys.executable).with_name("prefect"))
    # Own process groups: `prefect server start` runs uvicorn as a child that must go too.
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=(logs / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    serve = None
    try:
        _wait_healthy(port, server, logs / "server.log")
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--workdir", str(run.workdir)],
            cwd=REPO,
            env=env,
            stdout=(logs / "serve.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        trigger = (
            "import sys\n"
            "from prefect.deployments import run_deployment\n"
            "fr = run_deployment('kepo-iteration/local', parameters={'run_id': sys.argv[1], 'iteration': int(sys.argv[2])},"
            " timeout=600, poll_interval=1)\n"
            "print(fr.state.type.value)\n"
        )
        for iteration in (0, 1):
            out = _trigger_when_registered(trigger, run.run_id, iteration, env, serve, logs)
            assert out.strip().endswith("COMPLETED"), out
    finally:
        for proc in (serve, server):
            if proc is not None:
                _stop_group(proc)
    stages = stage_rows(run.store)
    for iteration in (0, 1):
        assert stages[(iteration, "rollout")]["status"] == "succeeded"
        assert stages[(iteration, "train")]["status"] == "succeeded"
    versions = (
        run.store.query("SELECT iteration FROM checkpoints ORDER BY 1")
        .column("iteration")
        .to_pylist()
    )
    assert versions == [1, 2]
    counts = run.store.query(
        "SELECT iteration, count(*) FILTER (WHERE trained) AS trained FROM rollouts GROUP BY 1 ORDER BY 1"
    ).to_pylist()
    assert counts == [{"iteration": 0, "trained": 4 * 2}, {"iteration": 1, "trained": 4 * 2}]
    assert_no_duplicates(run.store)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL what is left of it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _wait_healthy(port: int, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"prefect server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {timeout} s: {log.read_text()[-2000:]}")


def _trigger_when_registered(
    trigger: str, run_id: str, iteration: int, env: dict, serve, logs: Path
) -> str:
    """Trigger the deployment, retrying while `flows.serve` has not registered it yet."""
    deadline = time.monotonic() + 180
    while True:
        result = subprocess.run(
            [sys.executable, "-c", trigger, run_id, str(iteration)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode == 0:
            return result.stdout
        if (
            serve.poll() is not None
            or time.monotonic() > deadline
            or "ObjectNotFound" not in result.stderr
        ):
            raise AssertionError(
                f"trigger failed: {result.stderr[-3000:]}\nserve log: {(logs / 'serve.log').read_text()[-3000:]}"
            )
        time.sleep(2)
