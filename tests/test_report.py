"""The HTML report: sections, self-containment, and what headless Chromium shows with no network."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from test_dashboards import make_dashboard_db
from typer.testing import CliRunner

from kepo.cli import app
from kepo.config import RunConfig
from kepo.queries import DASHBOARDS_DIR, named_query
from kepo.report import build_report
from kepo.store import Store, StoreError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PLOT = re.compile(r'<figure class="plot">')
TABLE = re.compile(r'<table class="data">')


def expected_counts(db: Path, runs: set[str]) -> tuple[int, int]:
    """(plots, tables) the report must show for `db` (the fixture's data, see test_dashboards)."""
    store = Store(db)

    def has_rows(name: str) -> bool:
        rows = store.query(named_query(name)).to_pylist()
        return any(r["run_id"] in runs for r in rows)

    plots = sum(has_rows(n) for n in ("training_dynamics", "table1", "rewards"))
    # exploration / gate are shipped with the rollout stage; each adds a plot when it has rows.
    plots += sum(
        (DASHBOARDS_DIR / f"{n}.sql").is_file() and has_rows(n) for n in ("exploration", "gate")
    )
    tables = 1 + has_rows("table1") + has_rows("question_types")  # runs, table 1, question types
    return plots, tables


@pytest.fixture
def report_db(tmp_path: Path) -> Path:
    return make_dashboard_db(tmp_path / "kepo.duckdb")


def test_report_sections_and_counts(report_db: Path, tmp_path: Path) -> None:
    out = build_report(report_db, tmp_path / "out" / "report.html")
    text = out.read_text()
    plots, tables = expected_counts(report_db, {"run-a", "run-b", "run-c"})
    assert (plots, tables) == (3 + _optional_plots(report_db), 3)
    if all((DASHBOARDS_DIR / f"{n}.sql").is_file() for n in ("exploration", "gate")):
        assert plots == 5  # the fixture has prompts, hints and gated rollouts
    assert len(PLOT.findall(text)) == plots
    assert len(TABLE.findall(text)) == tables
    # Table 1 shows both evaluated runs with the numbers of the SQL (run-b's OOD avg is 50.00).
    table1 = text.split('id="table1"')[1].split("</table>")[0]
    assert "run-a" in table1 and "run-b" in table1 and "run-c" not in table1
    assert "42.86" in table1 and "56.25" in table1 and "50.00" in table1


def _optional_plots(db: Path) -> int:
    store = Store(db)
    return sum(
        (DASHBOARDS_DIR / f"{n}.sql").is_file() and store.query(named_query(n)).num_rows > 0
        for n in ("exploration", "gate")
    )


def test_report_is_self_contained(report_db: Path, tmp_path: Path) -> None:
    text = build_report(report_db, tmp_path / "report.html").read_text()
    assert "<script" not in text.lower()
    for attr in re.findall(r'(?:src|href)="([^"]*)"', text):
        assert attr.startswith(("data:", "#")), f"external reference {attr[:60]!r}"
    assert "@import" not in text and "url(" not in text


def test_report_without_data_says_so(tmp_path: Path) -> None:
    store = Store(tmp_path / "kepo.duckdb")
    store.register_run(RunConfig(run_id="fresh", algorithm={"name": "grpo"}))
    text = build_report(store.path, tmp_path / "r.html").read_text()
    assert "no rollouts yet" in text
    assert "no evaluations yet" in text
    assert len(PLOT.findall(text)) == 0
    assert len(TABLE.findall(text)) == 1  # the runs table


def test_report_cli_selects_runs_and_rejects_unknown(report_db: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "b.html"
    result = runner.invoke(
        app, ["report", "--db", str(report_db), "--runs", "run-b", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    text = out.read_text()
    table1 = text.split('id="table1"')[1].split("</table>")[0]
    assert "run-b" in table1 and "run-a" not in table1
    assert "no rollouts yet" in text  # only run-a has rollouts
    result = runner.invoke(
        app, ["report", "--db", str(report_db), "--runs", "nope", "--out", str(out)]
    )
    assert result.exit_code == 1
    assert "nope" in result.output and "run-a" in result.output


def test_report_on_missing_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such database"):
        build_report(tmp_path / "absent.duckdb", tmp_path / "r.html")


# ------------------------------------------------------------------------------ Chromium
class DevTools:
    """A minimal Chrome DevTools Protocol client over the browser's websocket (flat sessions)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        if any(e.get("method") == method for e in self.events):
            return
        while time.monotonic() < deadline:
            event = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(event)
            if event.get("method") == method:
                return
        raise TimeoutError(f"no {method} within {timeout} s")


def render_offline(html_path: Path, tmp_path: Path) -> tuple[dict[str, Any], list[dict]]:
    """Open the file in headless Chromium with networking off; return the page facts and events."""
    connect = pytest.importorskip("websockets.sync.client").connect
    # Never route the local DevTools socket through a proxy from the environment.
    no_proxy = {"proxy": None} if "proxy" in inspect.signature(connect).parameters else {}
    profile = tmp_path / "chromium-profile"
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={profile}",
        "--proxy-server=127.0.0.1:9",  # nothing listens there: any network request fails
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    log = (tmp_path / "chromium.log").open("w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"chromium did not start: {(tmp_path / 'chromium.log').read_text()[-2000:]}"
                )
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        with connect(f"ws://127.0.0.1:{port}{path}", max_size=None, **no_proxy) as ws:
            cdp = DevTools(ws)
            target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            for domain in ("Page", "Runtime", "Log", "Network"):
                cdp.call(f"{domain}.enable", session=session)
            cdp.call("Page.navigate", {"url": html_path.resolve().as_uri()}, session=session)
            cdp.wait_for("Page.loadEventFired")
            facts = cdp.call(
                "Runtime.evaluate",
                {
                    "expression": """(async () => {
                        const images = [...document.images];
                        const decoded = await Promise.allSettled(images.map(i => i.decode()));
                        return {
                            plots: document.querySelectorAll('figure.plot').length,
                            tables: document.querySelectorAll('table.data').length,
                            images: images.length,
                            broken: decoded.filter(d => d.status !== 'fulfilled').length
                                + images.filter(i => !(i.naturalWidth > 0)).length,
                            title: document.title,
                        };
                    })()""",
                    "awaitPromise": True,
                    "returnByValue": True,
                },
                session=session,
            )["result"]["value"]
            events = list(cdp.events)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return facts, events


def console_errors(events: list[dict]) -> list[str]:
    errors = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(json.dumps(params["exceptionDetails"])[:300])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(json.dumps(params.get("args"))[:300])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"]["text"])
    return errors


def network_requests(events: list[dict]) -> list[str]:
    urls = [
        e["params"]["request"]["url"]
        for e in events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    return [u for u in urls if not u.startswith(("data:", "file:", "about:"))]


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install chromium); .ci/run installs it",
)
def test_report_renders_offline_in_chromium(report_db: Path, tmp_path: Path) -> None:
    out = build_report(report_db, tmp_path / "report.html")
    plots, tables = expected_counts(report_db, {"run-a", "run-b", "run-c"})
    facts, events = render_offline(out, tmp_path)
    assert facts["title"].startswith("kepo report")
    assert facts["plots"] == plots and plots >= 3
    assert facts["tables"] == tables == 3
    assert facts["images"] == plots and facts["broken"] == 0
    assert console_errors(events) == []
    assert network_requests(events) == []
