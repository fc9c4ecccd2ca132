"""The HTML report: sections, self-containment, and what headless Chromium shows with no network."""

from __future__ import annotations

import base64
import re
import shutil
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
# Figures of the health section on the fixture: loss (total, pg), step diagnostics (clip frac,
# approx KL, entropy, grad norm, lr: 5 panels in two figures), samples, stage durations.
HEALTH_PLOTS = 5
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
    plots += HEALTH_PLOTS if has_rows("training_health") else 0
    # runs, table 1, question types, training health
    tables = 1 + has_rows("table1") + has_rows("question_types") + has_rows("training_health")
    return plots, tables


@pytest.fixture
def report_db(tmp_path: Path) -> Path:
    return make_dashboard_db(tmp_path / "kepo.duckdb")


def test_report_sections_and_counts(report_db: Path, tmp_path: Path) -> None:
    out = build_report(report_db, tmp_path / "out" / "report.html")
    text = out.read_text()
    plots, tables = expected_counts(report_db, {"run-a", "run-b", "run-c"})
    assert (plots, tables) == (3 + _optional_plots(report_db) + HEALTH_PLOTS, 4)
    if all((DASHBOARDS_DIR / f"{n}.sql").is_file() for n in ("exploration", "gate")):
        assert plots == 5 + HEALTH_PLOTS  # the fixture has prompts, hints and gated rollouts
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


def test_report_health_section_and_intervals(report_db: Path, tmp_path: Path) -> None:
    text = build_report(report_db, tmp_path / "report.html").read_text()
    health = text.split('<section id="health">')[1].split("</section>")[0]
    assert len(PLOT.findall(health)) == HEALTH_PLOTS and len(TABLE.findall(health)) == 1
    row = health.split("<tbody>")[1].split("</tr>")[0]  # run-a, iteration 0 (see test_dashboards)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", row)
    assert cells[:5] == ["GRPO (thinking)", "run-a", "0", "2", "1"]  # steps, skipped
    assert "0.0625" in cells and "0.9" in cells  # log-prob mismatch, entropy
    # Table 1: every modality cell carries its Wilson interval (the fixture stores [0, 1]).
    table1 = text.split('id="table1"')[1].split("</table>")[0]
    assert table1.count('<span class="ci">[0.0, 100.0]</span>') == 16  # 2 runs x 8 modalities
    # Figure 2: the intervals are drawn as shaded bands (matplotlib writes fill-opacity 0.15).
    dynamics = text.split('id="dynamics"')[1].split("</section>")[0]
    svg = base64.b64decode(re.search(r"base64,([^\"]+)", dynamics).group(1)).decode()
    assert svg.count("fill-opacity: 0.15") == 2  # run-a's ID and OOD bands
    assert svg.count("stroke-opacity: 0.4") == 2  # run-b's lone checkpoint: an interval bar


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
def render_offline(
    html_path: Path, screenshot: Path | None = None
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Open the file in headless Chromium (playwright driving the system browser, networking
    off); return the page facts, the console errors and the network requests it made."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,  # the system Chromium: no browser download
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--proxy-server=127.0.0.1:9",  # nothing listens there: any network request fails
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda m: (
                    errors.append(f"console.{m.type}: {m.text}")
                    if m.type in ("error", "assert")
                    else None
                ),
            )
            page.on("pageerror", lambda e: errors.append(f"exception: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url[:80]}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html_path.resolve().as_uri(), wait_until="load")
            facts = page.evaluate(
                """async () => {
                    const images = [...document.images];
                    const decoded = await Promise.allSettled(images.map(i => i.decode()));
                    const count = (selector) => document.querySelectorAll(selector).length;
                    return {
                        plots: count('figure.plot'),
                        tables: count('table.data'),
                        images: images.length,
                        broken: decoded.filter(d => d.status !== 'fulfilled').length
                            + images.filter(i => !(i.naturalWidth > 0)).length,
                        title: document.title,
                        health_plots: count('#health figure.plot'),
                        health_tables: count('#health table.data'),
                        health_height: document.querySelector('#health')
                            ?.getBoundingClientRect().height ?? 0,
                    };
                }"""
            )
            if screenshot is not None:
                page.locator("#health").screenshot(path=str(screenshot))
        finally:
            browser.close()
    external = [u for u in requests if not u.startswith(("data:", "file:", "about:"))]
    return facts, errors, external


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install chromium); .ci/run installs it",
)
def test_report_renders_offline_in_chromium(report_db: Path, tmp_path: Path) -> None:
    out = build_report(report_db, tmp_path / "report.html")
    plots, tables = expected_counts(report_db, {"run-a", "run-b", "run-c"})
    shot = tmp_path / "health.png"
    facts, errors, requests = render_offline(out, screenshot=shot)
    assert facts["title"].startswith("kepo report")
    assert facts["plots"] == plots and plots >= 3
    assert facts["tables"] == tables == 4
    assert facts["images"] == plots and facts["broken"] == 0
    assert (facts["health_plots"], facts["health_tables"]) == (HEALTH_PLOTS, 1)
    assert facts["health_height"] > 300  # the section has laid out its table and figures
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert errors == []
    assert requests == []


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_the_browser_check_sees_network_requests_and_console_errors(tmp_path: Path) -> None:
    """The checks above can fail: a page that fetches a URL and throws is caught by both."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"><title>bad</title></head>'
        '<body><img src="http://example.invalid/x.png">'
        "<script>throw new Error('boom')</script></body></html>"
    )
    _, errors, requests = render_offline(page)
    assert requests == ["http://example.invalid/x.png"]
    assert any("boom" in e for e in errors)
