"""flows/helpers.py against a real (temporary) Prefect API: one writer per database, kepo's log
lines on the flow run, and the markdown artifacts of an iteration."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from test_dashboards import make_dashboard_db

REPO = Path(__file__).resolve().parents[1]


def test_one_writer_per_database(tmp_path: Path, prefect_harness) -> None:
    from flows.helpers import writer_limit_name, writer_slot

    same, other = tmp_path / "a", tmp_path / "b"
    assert writer_limit_name(same) == writer_limit_name(tmp_path / "x" / ".." / "a")
    assert writer_limit_name(same) != writer_limit_name(other)
    spans: dict[str, tuple[float, float]] = {}

    def hold(label: str, workdir: Path) -> None:
        with writer_slot(workdir):
            start = time.monotonic()
            time.sleep(1.5)
            spans[label] = (start, time.monotonic())

    threads = [
        threading.Thread(target=hold, args=(label, wd))
        for label, wd in (("a1", same), ("a2", same), ("b", other))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(spans) == {"a1", "a2", "b"}
    (s1, e1), (s2, e2) = spans["a1"], spans["a2"]
    assert e1 <= s2 or e2 <= s1, "two writers held the same database at once"


def test_kepo_logs_and_artifacts_reach_the_flow_run(tmp_path: Path, prefect_harness) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    from flows.helpers import forward_kepo_logs, publish_iteration_artifacts

    make_dashboard_db(tmp_path / "kepo.duckdb")

    @flow(name="helpers-probe")
    def probe(workdir: str) -> list[str]:
        forward_kepo_logs()
        logging.getLogger("kepo.probe").info("kepo line from the library %d", 42)
        return publish_iteration_artifacts(workdir, "run-a", 0)

    state = probe(str(tmp_path), return_state=True)
    assert state.is_completed()
    assert state.result() == ["run-a-table1", "run-a-iteration-0"]
    flow_run_id = state.state_details.flow_run_id
    for handler in logging.getLogger("kepo").handlers:
        if isinstance(handler, APILogHandler):
            handler.flush()
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30  # logs reach the API in batches
        while True:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            if any(r.name == "kepo.probe" for r in logs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert any(
        r.name == "kepo.probe" and "kepo line from the library 42" in r.message for r in logs
    )
    by_key = {a.key: a.data for a in artifacts}
    assert set(by_key) == {"run-a-table1", "run-a-iteration-0"}
    assert "| Avg OOD |" in by_key["run-a-table1"] and "42.86" in by_key["run-a-table1"]
    assert "| exploration triggered | 1 |" in by_key["run-a-iteration-0"]
    assert "| Log-prob Δ | 0.0625 |" in by_key["run-a-iteration-0"]


def test_the_writer_slot_is_skipped_only_on_kepos_temporary_api(monkeypatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.helpers import api_reclaims_leases
    from flows.server import TEMPORARY_API_ENV

    url = "http://127.0.0.1:9/api"
    monkeypatch.delenv(TEMPORARY_API_ENV, raising=False)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert api_reclaims_leases()  # a server the user runs: slots are leases it reclaims
        monkeypatch.setenv(TEMPORARY_API_ENV, url)
        assert not api_reclaims_leases()  # kepo's ephemeral server: the store lease guards


@pytest.mark.slow
def test_a_slot_held_by_a_killed_process_comes_back(tmp_path: Path) -> None:
    """Against `prefect server start` (as the README runs it): a second writer waits while the
    first lives, and gets the slot once the first is killed with kill -9 and its 60 s lease
    expires (the repossessor runs every 5 s here; Prefect's default is 15 s)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
        "PREFECT_UI_ENABLED": "false",
        "PYTHONPATH": str(REPO),
    }
    env.pop("KEPO_TEMPORARY_PREFECT_API", None)
    prefect = Path(sys.executable).with_name("prefect")
    server = subprocess.Popen(
        [str(prefect), "server", "start", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    holder = waiter = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the Prefect server did not start"
                time.sleep(1)
        code = (
            "import sys, time\n"
            "from flows.helpers import database_writer\n"
            "t = time.monotonic()\n"
            "with database_writer(sys.argv[1]):\n"
            "    print(f'holding {time.monotonic() - t:.1f}', flush=True)\n"
            "    time.sleep(float(sys.argv[2]))\n"
        )
        db = str(tmp_path / "work" / "kepo.duckdb")
        holder = subprocess.Popen(
            [sys.executable, "-c", code, db, "600"], env=env, stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None and holder.stdout.readline().startswith("holding")
        waiter = subprocess.Popen(
            [sys.executable, "-c", code, db, "0"], env=env, stdout=subprocess.PIPE, text=True
        )
        time.sleep(10)
        assert waiter.poll() is None, "a second writer got the slot while the first held it"
        holder.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        out, _ = waiter.communicate(timeout=150)
        assert waiter.returncode == 0 and out.startswith("holding"), out
        assert time.monotonic() - killed < 100  # lease 60 s + repossessor loop + margin
    finally:
        for proc in (holder, waiter):
            if proc is not None and proc.poll() is None:
                proc.kill()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_every_stage_task_writes_inside_the_database_writer(monkeypatch, tmp_path: Path) -> None:
    import contextlib

    import flows.tasks as tasks
    from kepo.pipeline import PlannedStage

    events: list[str] = []

    @contextlib.contextmanager
    def recording_writer(db):
        events.append(f"enter {Path(db).name}")
        yield
        events.append("exit")

    monkeypatch.setattr(tasks, "database_writer", recording_writer)
    monkeypatch.setattr(tasks, "open_run", lambda db, run_id: run_id)
    monkeypatch.setattr(tasks, "execute", lambda run, planned: events.append(planned.stage))
    monkeypatch.setattr(tasks, "run_stage", lambda run, k, stage, fn: events.append(stage))
    tasks._execute(str(tmp_path / "kepo.duckdb"), "r", PlannedStage(0, "train"))
    tasks.commit_task.fn(str(tmp_path / "kepo.duckdb"), "r", 0, [])
    assert events == [
        "enter kepo.duckdb", "train", "exit", "enter kepo.duckdb", "rollout", "exit",
    ]  # fmt: skip
