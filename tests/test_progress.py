"""Progress of long work: periodic log lines with done / total and an estimate when stderr is
not a terminal, one progress function for every long loop, and the CLI shows kepo's log lines."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from kepo.progress import progress, progress_line

KEPO = Path(__file__).resolve().parents[1] / "kepo"


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def records() -> list[str]:
    """Messages of the kepo.progress logger (captured on the logger itself)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("kepo.progress")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield seen
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_log_lines_every_interval_with_count_and_estimate(records: list[str]) -> None:
    clock = _Clock()
    with progress(
        10, "warm-up student", unit="steps", every_s=30, terminal=False, clock=clock
    ) as advance:
        for step in range(10):
            clock.now += 12  # 12 s per step
            advance(loss=1.0 / (step + 1))
    # a line once 30 s have passed since the last: 36 s (3 steps), 72 s (6), 108 s (9); the end
    assert records == [
        "warm-up student: 3/10 steps (30%), 36s elapsed, about 1m24s left, loss 0.333",
        "warm-up student: 6/10 steps (60%), 1m12s elapsed, about 48s left, loss 0.167",
        "warm-up student: 9/10 steps (90%), 1m48s elapsed, about 12s left, loss 0.111",
        "warm-up student: 10/10 steps (100%), 2m00s elapsed, loss 0.100",
    ]


def test_short_work_and_disabled_progress_stay_quiet(records: list[str]) -> None:
    clock = _Clock()
    with progress(4, "generate", every_s=30, terminal=False, clock=clock) as advance:
        for _ in range(4):
            clock.now += 1
            advance()
    with progress(4, "train", every_s=0, enabled=False, terminal=False, clock=clock) as advance:
        advance(4)
    assert records == []


def test_on_a_terminal_a_bar_replaces_the_log_lines(records: list[str]) -> None:
    clock = _Clock()
    with progress(3, "rollout", every_s=0, terminal=True, clock=clock) as advance:
        for _ in range(3):
            clock.now += 100
            advance(2, loss=0.5)
    assert records == []


def test_progress_line_formats() -> None:
    assert progress_line("x", 0, 5, "seq", 0.4, {}) == "x: 0/5 seq (0%), 0s elapsed"
    assert (
        progress_line("x", 1, 3, "seq", 3700, {})
        == "x: 1/3 seq (33%), 1h01m elapsed, about 2h03m left"
    )


def test_one_progress_function_for_every_long_loop() -> None:
    """Warm-up, training, generation (rollout, evaluation) and curation report progress through
    kepo/progress.py; no other module builds its own rich bar."""
    users = {
        str(p.relative_to(KEPO))
        for p in KEPO.rglob("*.py")
        if "rich.progress" in p.read_text() and p.name != "progress.py"
    }
    assert users == set()
    for module in ("warmup.py", "train.py", "generation/hf.py", "curate.py"):
        text = (KEPO / module).read_text()
        assert "from kepo.progress import progress" in text or "kepo.progress.progress(" in text


def test_the_cli_shows_kepo_log_lines_when_output_is_not_a_terminal(tmp_path: Path) -> None:
    code = (
        "import logging, sys\n"
        "from typer.testing import CliRunner\n"
        "from kepo.cli import _show_kepo_log\n"
        "_show_kepo_log()\n"
        "from kepo.progress import progress\n"
        "with progress(2, 'demo warm-up', unit='steps', every_s=0, terminal=False) as advance:\n"
        "    advance(); advance()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(KEPO.parent)},
    )
    assert result.returncode == 0, result.stderr
    assert "kepo.progress: demo warm-up: 1/2 steps (50%)" in result.stderr
    assert "demo warm-up: 2/2 steps (100%)" in result.stderr
