"""`kepo sql`: it reads the run's tables and nothing else on the machine; its output formats."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kepo.cli import app
from kepo.store import Store, StoreError


@pytest.fixture
def db(tmp_path: Path) -> Path:
    store = Store(tmp_path / "kepo.duckdb")
    store.initialize()
    return store.path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.csv"
    path.write_text("name,token\nroot,s3cr3t\n")
    return path


def _statements(secret: Path) -> list[str]:
    return [
        f"SELECT * FROM read_text('{secret}')",
        f"SELECT * FROM read_csv('{secret}')",
        f"SELECT * FROM '{secret}'",
        f"SELECT * FROM glob('{secret.parent}/*')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM glob('/root/*')",
        # a URL would make DuckDB install and load httpfs from the network
        "SELECT * FROM read_parquet('https://example.invalid/data.parquet')",
        "SELECT * FROM 's3://bucket/key.parquet'",
    ]


def test_queries_cannot_read_files_or_urls(db: Path, secret: Path) -> None:
    store = Store(db)
    for sql in _statements(secret):
        with pytest.raises(StoreError, match=r"disabled by configuration.*tables of") as err:
            store.query(sql)
        assert "s3cr3t" not in str(err.value), sql


def test_the_console_refuses_each_file_statement(db: Path, secret: Path) -> None:
    runner = CliRunner()
    for sql in _statements(secret):
        result = runner.invoke(app, ["sql", "--db", str(db), sql])
        assert result.exit_code == 1, (sql, result.output)
        assert "disabled by configuration" in result.output, (sql, result.output)
        assert "s3cr3t" not in result.output


def test_the_lockdown_cannot_be_lifted_from_a_query(db: Path, secret: Path) -> None:
    store = Store(db)
    with pytest.raises(StoreError, match="read-only"):
        store.query("SET enable_external_access = true")
    assert store.query(
        "SELECT current_setting('enable_external_access') AS external, "
        "current_setting('autoinstall_known_extensions') AS autoinstall, "
        "current_setting('autoload_known_extensions') AS autoload, "
        "current_setting('lock_configuration') AS locked"
    ).to_pylist() == [{"external": False, "autoinstall": False, "autoload": False, "locked": True}]


def test_python_variables_are_not_scanned(db: Path) -> None:
    """DuckDB's Python client resolves unknown table names to Python variables in scope."""
    store = Store(db)
    with pytest.raises(Exception, match=r"(?i)does not exist"):
        store.query("SELECT * FROM sql")  # a local variable of Store.query


def test_named_queries_still_run(db: Path) -> None:
    result = CliRunner().invoke(app, ["sql", "--db", str(db), "--query", "table1", "--json"])
    assert result.exit_code == 0, result.output


def test_csv_lines_end_with_a_newline_only(db: Path) -> None:
    result = CliRunner().invoke(
        app, ["sql", "--db", str(db), "SELECT 1 AS a, 'x,y' AS b UNION ALL SELECT 2, NULL", "--csv"]
    )
    assert result.exit_code == 0, result.output
    # click's Result.stdout turns \r\n into \n; the bytes are what a shell pipe receives
    assert result.stdout_bytes == b'a,b\n1,"x,y"\n2,\n'


def test_the_database_file_itself_still_opens_from_another_directory(
    db: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = Path.cwd()
    os.chdir(elsewhere)
    try:
        rows = Store(os.path.relpath(db, elsewhere)).query("SELECT count(*) AS n FROM runs")
    finally:
        os.chdir(cwd)
    assert rows.to_pylist() == [{"n": 0}]


def test_named_queries_take_parameters_and_can_be_listed(db: Path) -> None:
    from kepo.config import RunConfig, StudyTag
    from kepo.queries import query_names

    store = Store(db)
    for run_id, study in (("s-a", "s"), ("t-a", "t")):
        cfg = RunConfig(run_id=run_id, study=StudyTag(name=study, method="grpo"))
        store.register_run(cfg)
    runner = CliRunner()
    args = ["sql", "--db", str(db), "--query", "study_runs", "--csv"]
    result = runner.invoke(app, [*args, "--param", "study=t", "--param", "role=method"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "run_id,method,seed,method_label,in_domain_modality"
    assert [line.split(",")[:3] for line in lines[1:]] == [["t-a", "grpo", "0"]]
    result = runner.invoke(app, [*args, "--param", "study=t"])  # role missing
    assert result.exit_code == 1 and "role" in result.output
    result = runner.invoke(app, [*args, "--param", "study"])
    assert result.exit_code == 2 and "NAME=VALUE" in result.output
    result = runner.invoke(app, ["sql", "--db", str(db), "--query", "list"])
    assert result.stdout.split() == query_names() and "study_summary" in query_names()


def test_piped_tables_keep_one_line_per_row(db: Path) -> None:
    """Output to a pipe or a file (not a terminal) is not folded to 80 columns: every row of a
    wide result stays on one line, its cells whole."""
    long_path = "checkpoints/a-long-run-name/policy-0001-" + "x" * 12  # 52 characters
    columns = ", ".join(f"{i} AS column_{i}" for i in range(10))
    sql = f"SELECT 'wide-run' AS run_id, '{long_path}' AS path, {columns}"
    result = CliRunner().invoke(app, ["sql", "--db", str(db), sql])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "wide-run" in line]
    assert len(lines) == 1 and long_path in lines[0], result.output
    assert "column_9" in result.output
