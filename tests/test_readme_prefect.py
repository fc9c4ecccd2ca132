"""The README's Prefect quick-start, run as written: its first bash block under "A Prefect
deployment run per iteration" is read from README.md (so the test cannot drift from it) and
executed in a scratch folder laid out like the repository root (`.venv`, `configs`, `flows`).
The one change is the port (a free one instead of 4200, so parallel test runs do not collide)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kepo.store import Store

REPO = Path(__file__).resolve().parents[1]
SECTION = "## A Prefect deployment run per iteration"


def readme_block(section: str = SECTION) -> str:
    text = (REPO / "README.md").read_text()
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, flags=re.S)
    assert blocks, f"no bash block under {section!r} in README.md"
    return blocks[0]


def test_the_quick_start_builds_the_models_the_tiny_configs_use() -> None:
    """Statically: the block builds every model folder configs/tiny/_scale.yaml points at."""
    import yaml

    block = readme_block()
    common = yaml.safe_load((REPO / "configs" / "tiny" / "_scale.yaml").read_text())
    for role in ("student", "teacher"):
        assert f"--out {common['models'][role]}" in block, role
    assert "--watch" in block  # iteration 1 must not start before iteration 0 is done
    # Every mention of the port is the same literal, so the test's substitution moves them all.
    assert "--port 4200" in block and "127.0.0.1:4200/api" in block


def _still_running(pgid: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.5)
    return True


def _stop_group(pgid: int, grace_s: float = 30) -> None:
    """SIGTERM what the block left running (nothing, when it ran to the end), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # raises ProcessLookupError once the group is empty
            time.sleep(0.5)
        os.killpg(pgid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_readme_prefect_quick_start_runs_as_written(tmp_path: Path) -> None:
    venv = Path(sys.prefix)
    for tool in ("kepo", "prefect", "python"):
        if not (venv / "bin" / tool).exists():
            pytest.skip(f"{venv}/bin/{tool} is missing: run the test from the .venv setup.sh makes")
    block = readme_block()
    port = _free_port()
    script = "set -euo pipefail\n" + block.replace("4200", str(port))
    root = tmp_path / "checkout"
    root.mkdir()
    (root / ".venv").symlink_to(venv)
    for name in ("configs", "flows"):
        (root / name).symlink_to(REPO / name)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "KEPO_")) and k != "PYTHONPATH"
    }
    env.update(PYTHONPATH=str(REPO), PREFECT_RUNNER_POLL_FREQUENCY="1")
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the server and the serve process join this group
    )
    try:
        out, _ = proc.communicate(timeout=1500)
        left_running = _still_running(proc.pid, wait_s=60)  # the block's last line stops both
    finally:
        _stop_group(proc.pid)
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}"
        for p in (root / "serve.log", root / "prefect-server.log")
        if p.exists()
    )
    assert proc.returncode == 0, f"{out[-6000:]}\n{logs}"
    store = Store(root / "work" / "tiny" / "kepo-tau1" / "kepo.duckdb")
    stages = {
        (r["iteration"], r["stage"]): r["status"]
        for r in store.read("stages", {"run_id": "tiny-kepo-tau1"}).to_pylist()
    }
    for iteration in (0, 1):
        assert stages[(iteration, "rollout")] == stages[(iteration, "train")] == "succeeded"
    assert stages[(2, "evaluate")] == "succeeded"
    versions = store.query("SELECT iteration FROM checkpoints ORDER BY 1").column(0).to_pylist()
    assert versions == [1, 2]
    # The artifact the block inspects holds Table 1 with the run's last checkpoint.
    assert "Avg OOD" in out and "tiny-kepo-tau1" in out
    assert not left_running, "the server or the serve process outlived the block's stop line"
