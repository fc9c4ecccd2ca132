"""flows/helpers.py against a real (temporary) Prefect API: one writer per database, kepo's log
lines on the flow run, and the markdown artifacts of an iteration."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from test_dashboards import make_dashboard_db


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
