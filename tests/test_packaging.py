"""A non-editable install (a wheel in a fresh virtual environment) works from any directory:
the named queries and the demo's configs ship inside the package."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from test_dashboards import TABLE1_COLUMNS, make_dashboard_db

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("kepo", "schemas", "flows", "dashboards", "configs", "pyproject.toml", "README.md")


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding kepo installed from its wheel; dependencies come from this interpreter's
    site-packages through a .pth file (nothing is downloaded)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), "."],
        cwd=src,
    )
    (wheel,) = (root / "dist").glob("kepo-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib.stdout.strip()) / "_kepo_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    _run([*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)])
    return venv


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.slow
def test_installed_kepo_runs_a_named_query_from_another_directory(
    installed: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    db = make_dashboard_db(elsewhere / "kepo.duckdb")
    result = _run(
        [str(installed / "bin" / "kepo"), "sql", "--query", "table1", "--db", db.name, "--csv"],
        cwd=elsewhere,
        env=_env(),
    )
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == TABLE1_COLUMNS
    assert [r[0] for r in rows[1:]] == ["run-a", "run-b"]


@pytest.mark.slow
def test_installed_kepo_reads_its_queries_and_demo_configs_from_the_install(
    installed: Path, tmp_path: Path
) -> None:
    code = (
        "from pathlib import Path\n"
        "import kepo, kepo.queries as q, kepo.demo as d\n"
        "from kepo.config import load_config\n"
        "print(Path(kepo.__file__).resolve().parent)\n"
        "print(q.DASHBOARDS_DIR.resolve())\n"
        "print(Path(d.DEMO_CONFIGS[0]).resolve())\n"
        "print(sorted(load_config(c).run_id for c in d.DEMO_CONFIGS))\n"
    )
    result = _run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path, env=_env())
    package, dashboards, demo_config, run_ids = result.stdout.splitlines()
    venv = str(installed.resolve())
    assert package.startswith(venv) and dashboards.startswith(venv) and demo_config.startswith(venv)
    assert (Path(dashboards) / "table1.sql").is_file()
    assert run_ids == "['demo-grpo', 'demo-kepo']"
