"""The store: idempotent partition writes, atomicity under SIGKILL, lock handling, validation."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kepo.store import Store, StoreError, StoreLockedError, ValidationFailed, check_read_only


def _metric_rows(run_id: str, iteration: int, accuracy: float) -> list[dict]:
    return [
        {
            "run_id": run_id,
            "iteration": iteration,
            "modality": m,
            "in_domain": m == "MRI",
            "n": 10,
            "n_correct": round(accuracy * 10),
            "accuracy": accuracy,
            "ci_low": 0.0,
            "ci_high": 1.0,
        }
        for m in ("MRI", "CT")
    ]


def test_writing_a_partition_twice_keeps_one_copy(tmp_path: Path) -> None:
    store = Store(tmp_path / "kepo.duckdb")
    store.overwrite_partition("eval_metrics", _metric_rows("r", 0, 0.5), "r", 0)
    store.overwrite_partition("eval_metrics", _metric_rows("r", 0, 0.7), "r", 0)
    store.overwrite_partition("eval_metrics", _metric_rows("r", 1, 0.9), "r", 1)
    rows = store.query(
        "SELECT iteration, modality, accuracy FROM eval_metrics ORDER BY 1, 2"
    ).to_pylist()
    assert rows == [
        {"iteration": 0, "modality": "CT", "accuracy": 0.7},
        {"iteration": 0, "modality": "MRI", "accuracy": 0.7},
        {"iteration": 1, "modality": "CT", "accuracy": 0.9},
        {"iteration": 1, "modality": "MRI", "accuracy": 0.9},
    ]


def test_rows_outside_the_partition_are_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "kepo.duckdb")
    with pytest.raises(StoreError, match="outside the partition"):
        store.overwrite_partition("eval_metrics", _metric_rows("r", 1, 0.5), "r", 0)


def test_invalid_rows_name_the_record_and_column(tmp_path: Path) -> None:
    store = Store(tmp_path / "kepo.duckdb")
    rows = _metric_rows("r", 0, 0.5)
    rows[1]["modality"] = "PET"
    with pytest.raises(
        ValidationFailed, match=r"record 1 .*modality='PET'.*column modality = 'PET' must be one of"
    ):
        store.overwrite_partition("eval_metrics", rows, "r", 0)
    rows = _metric_rows("r", 0, 0.5)
    rows[0]["accuracy"] = 1.5
    with pytest.raises(
        ValidationFailed, match=r"column accuracy = 1.5 must be a value in \[0, 1\]"
    ):
        store.overwrite_partition("eval_metrics", rows, "r", 0)
    rows = _metric_rows("r", 0, 0.5)
    del rows[0]["n"]
    with pytest.raises(ValidationFailed, match=r"missing columns \['n'\]"):
        store.overwrite_partition("eval_metrics", rows, "r", 0)
    assert store.count("eval_metrics") == 0  # nothing half-written


_WRITER = textwrap.dedent(
    """
    import sys
    from kepo.store import Store
    path, value, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    rows = [
        {"run_id": "r", "iteration": 0, "step": i, "global_step": i, "pass_idx": 0,
         "loss_total": value, "loss_pg": None, "loss_distill": None, "loss_kl": None,
         "loss_sft": None, "clipfrac": None, "approx_kl": None, "entropy": None,
         "gate_frac_open": None,
         "grad_norm": None, "lr": value, "n_sequences": 1, "n_tokens": 1, "step_time_s": 0.0,
         "skipped": False, "skip_reason": None}
        for i in range(n)
    ]
    print("ready", flush=True)
    Store(path).overwrite_partition("train_steps", rows, "r", 0)
    print("done", flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_during_overwrite_leaves_old_or_new_partition(tmp_path: Path) -> None:
    db = tmp_path / "kepo.duckdb"
    n = 120_000
    subprocess.run(
        [sys.executable, "-c", _WRITER, str(db), "1.0", str(n)], check=True, capture_output=True
    )
    outcomes = set()
    for attempt, delay in enumerate((0.3, 1.0, 2.5, 6.0)):
        new_value = 2.0 + attempt
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(db), str(new_value), str(n)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rows = (
            Store(db)
            .query(
                "SELECT count(*) AS n, min(loss_total) AS lo, max(loss_total) AS hi FROM train_steps"
            )
            .to_pylist()[0]
        )
        assert rows["n"] == n, rows  # never a half-deleted or half-inserted partition
        assert rows["lo"] == rows["hi"], rows  # never a mix of old and new
        outcomes.add("new" if rows["lo"] == new_value else "old")
        # the next overwrite starts from a clean state
        subprocess.run(
            [sys.executable, "-c", _WRITER, str(db), "1.0", str(n)], check=True, capture_output=True
        )
    assert "old" in outcomes  # at least one kill landed mid-transaction


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from kepo.store import Store
    with Store(sys.argv[1]).connect():
        print("holding", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def test_second_process_gets_a_clear_lock_error_within_the_wait(tmp_path: Path) -> None:
    db = tmp_path / "kepo.duckdb"
    Store(db).initialize()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(db), "20"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        store = Store(db, lock_timeout_s=1.5)
        start = time.monotonic()
        with pytest.raises(StoreLockedError) as err:
            store.query("SELECT count(*) FROM runs")
        waited = time.monotonic() - start
        assert 1.5 <= waited < 6.0
        assert str(db) in str(err.value) and "store.lock_timeout_s" in str(err.value)
    finally:
        holder.kill()
        holder.wait()


def test_lock_released_in_time_is_waited_for(tmp_path: Path) -> None:
    db = tmp_path / "kepo.duckdb"
    Store(db).initialize()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(db), "1.0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        assert Store(db, lock_timeout_s=15).query("SELECT count(*) AS n FROM runs").to_pylist() == [
            {"n": 0}
        ]
    finally:
        holder.wait()


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM runs",
        "DROP TABLE runs",
        "INSERT INTO runs VALUES (1)",
        "COPY runs TO 'x.csv'",
        "ATTACH 'other.db'",
        "SELECT 1; DROP TABLE runs",
        "CREATE TABLE t (a INT)",
    ],
)
def test_read_only_guard_refuses_writes(sql: str) -> None:
    with pytest.raises(StoreError, match=r"read-only|one statement"):
        check_read_only(sql)


def test_read_only_guard_allows_reads() -> None:
    for sql in (
        "SELECT 1",
        "DESCRIBE runs",
        "SUMMARIZE runs",
        "EXPLAIN SELECT 1",
        "WITH a AS (SELECT 1) SELECT * FROM a",
    ):
        check_read_only(sql)


def test_run_config_round_trip_and_stages(tmp_path: Path) -> None:
    from kepo.config import RunConfig

    store = Store(tmp_path / "kepo.duckdb")
    cfg = RunConfig(run_id="abc", iterations=3)
    store.register_run(cfg)
    store.register_run(cfg)
    assert store.run_ids() == ["abc"]
    assert store.run_config("abc") == cfg
    store.set_stage("abc", 0, "rollout", "running")
    store.set_stage("abc", 0, "rollout", "failed", error="ValueError: boom")
    store.set_stage("abc", 0, "rollout", "running")
    row = store.read("stages", {"run_id": "abc"}).to_pylist()[0]
    assert (row["status"], row["attempt"], row["error"]) == ("running", 2, None)
    with pytest.raises(StoreError, match="no run 'zzz'"):
        store.run_config("zzz")


# ------------------------------------------------------------------------ comments
def _comments(store: Store) -> tuple[dict[str, str | None], dict[tuple[str, str], str | None]]:
    tables = {
        r["table_name"]: r["comment"]
        for r in store.query("SELECT table_name, comment FROM duckdb_tables()").to_pylist()
    }
    columns = {
        (r["table_name"], r["column_name"]): r["comment"]
        for r in store.query(
            "SELECT table_name, column_name, comment FROM duckdb_columns()"
        ).to_pylist()
    }
    return tables, columns


def _assert_documented(store: Store) -> None:
    from schemas.tables import STORE_TABLES

    tables, columns = _comments(store)
    for table in STORE_TABLES.values():
        assert table.description and tables[table.name] == table.description, table.name
        for col in table.columns:
            assert col.description, (table.name, col.name)
            assert columns[(table.name, col.name)] == col.description, (table.name, col.name)


def test_every_declared_table_and_column_carries_its_description(tmp_path: Path) -> None:
    store = Store(tmp_path / "kepo.duckdb")
    store.initialize()
    _assert_documented(store)


def test_an_older_database_gets_the_comments_and_a_changed_description_is_updated(
    tmp_path: Path,
) -> None:
    import duckdb

    from schemas.tables import STORE_TABLES

    path = tmp_path / "kepo.duckdb"
    con = duckdb.connect(str(path))  # as kepo created databases before comments existed
    for table in STORE_TABLES.values():
        con.execute(table.duckdb_ddl())
    con.execute("COMMENT ON COLUMN rollouts.advantage IS 'an outdated description'")
    con.close()
    store = Store(path)
    assert _comments(store)[1][("rollouts", "run_id")] is None
    store.initialize()
    _assert_documented(store)


def test_the_console_documents_every_rollouts_column(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kepo.cli import app
    from schemas.tables import ROLLOUTS

    store = Store(tmp_path / "kepo.duckdb")
    store.initialize()
    sql = "SELECT column_name, comment FROM duckdb_columns() WHERE table_name='rollouts'"
    result = CliRunner().invoke(app, ["sql", "--db", str(store.path), sql, "--json"])
    assert result.exit_code == 0, result.output
    import json

    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows == [{"column_name": c.name, "comment": c.description} for c in ROLLOUTS.columns]


def test_an_older_database_loses_not_null_on_columns_declared_nullable_since(
    tmp_path: Path,
) -> None:
    """prompts.n_policy_correct / max_trigger_reward were NOT NULL in earlier databases; a prompt
    that never rolled out (SFT, GKD λ = 0) has neither, so writing it must work after opening."""
    import duckdb

    from schemas.tables import PROMPTS, STORE_TABLES

    path = tmp_path / "kepo.duckdb"
    con = duckdb.connect(str(path))  # as an earlier kepo created the tables
    for table in STORE_TABLES.values():
        con.execute(table.duckdb_ddl())
    for name in ("n_policy_correct", "max_trigger_reward"):
        assert PROMPTS.column(name).nullable
        con.execute(f"ALTER TABLE prompts ALTER COLUMN {name} SET NOT NULL")
    con.close()
    Store(path).initialize()
    con = duckdb.connect(str(path), read_only=True)
    nullable = dict(
        con.execute(
            "SELECT column_name, is_nullable FROM information_schema.columns "
            "WHERE table_name = 'prompts' AND column_name IN "
            "('n_policy_correct', 'max_trigger_reward')"
        ).fetchall()
    )
    con.close()
    assert nullable == {"n_policy_correct": "YES", "max_trigger_reward": "YES"}


# ------------------------------------------------------------------------ cost of a call
def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    monkeypatch.setattr(owner, name, staticmethod(counted) if static else counted)
    return calls


def test_tables_are_checked_once_per_process_per_database_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ddl = _count_calls(monkeypatch, Store, "_ensure_tables")
    store = Store(tmp_path / "kepo.duckdb")
    store.overwrite_partition("eval_metrics", _metric_rows("r", 0, 0.5), "r", 0)
    store.overwrite_partition("eval_metrics", _metric_rows("r", 0, 0.7), "r", 0)
    store.set_stage("r", 0, "evaluate", "running")
    Store(tmp_path / "kepo.duckdb").set_stage("r", 0, "evaluate", "succeeded")  # same file
    assert len(ddl) == 1
    Store(tmp_path / "other.duckdb").initialize()  # another file is checked
    assert len(ddl) == 2


def test_a_database_replaced_behind_the_process_gets_its_tables_again(tmp_path: Path) -> None:
    """The check is remembered per file (device, inode); should a replaced file be taken for
    the checked one (a reused inode), the missing table is noticed and the tables made again."""
    import duckdb

    from kepo.store import _file_key, _files

    path = tmp_path / "kepo.duckdb"
    Store(path).initialize()
    path.unlink()
    duckdb.connect(str(path)).close()  # an empty database at the same path
    st = path.stat()
    _files().checked.add((_file_key(path), st.st_dev, st.st_ino))  # as if its inode were reused
    store = Store(path)
    store.overwrite_partition("eval_metrics", _metric_rows("r", 0, 0.5), "r", 0)
    assert store.count("eval_metrics") == 2


def test_nested_calls_share_one_attachment_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kepo.config import RunConfig
    from kepo.store import _Files

    store = Store(tmp_path / "kepo.duckdb")
    store.initialize()
    attaches = _count_calls(monkeypatch, _Files, "attach")
    store.register_run(RunConfig(run_id="abc", iterations=1))  # a read and a write
    assert len(attaches) == 1
    with store.connect():
        store.overwrite_partition("eval_metrics", _metric_rows("abc", 0, 0.5), "abc", 0)
        assert store.count("eval_metrics") == 2
        store.set_stage("abc", 0, "evaluate", "succeeded")
        assert Store(store.path).stage_status("abc", 0, "evaluate") == "succeeded"
    assert len(attaches) == 2
    with store.connect(read_only=True):
        with pytest.raises(StoreError, match="write inside a read-only connection"):
            store.set_stage("abc", 0, "evaluate", "running")
        with pytest.raises(StoreError, match=r"query\(\) inside an open connection"):
            store.query("SELECT 1")


_OPEN_READ_WRITE = textwrap.dedent(
    """
    import sys, duckdb
    con = duckdb.connect(sys.argv[1])  # no retry: fails at once if the file is held
    print(con.execute("SELECT count(*) FROM stages").fetchone()[0])
    con.close()
    """
)


def test_the_file_is_free_for_other_processes_between_calls(tmp_path: Path) -> None:
    store = Store(tmp_path / "kepo.duckdb")
    store.set_stage("r", 0, "rollout", "running")
    assert store.stage_status("r", 0, "rollout") == "running"
    for _ in range(2):  # after a write, then after a read
        out = subprocess.run(
            [sys.executable, "-c", _OPEN_READ_WRITE, str(store.path)],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
        store.read("stages")
    with store.connect(read_only=True):  # ... and held while a connection is open
        out = subprocess.run(
            [sys.executable, "-c", _OPEN_READ_WRITE, str(store.path)],
            capture_output=True,
            text=True,
        )
        assert out.returncode != 0 and "lock" in out.stderr.lower()


def test_stage_rows_through_running_failed_running_succeeded(tmp_path: Path) -> None:
    store = Store(tmp_path / "kepo.duckdb")
    where = {"run_id": "r", "iteration": 0, "stage": "train"}

    def row() -> dict:
        return store.read("stages", where).to_pylist()[0]

    store.set_stage("r", 0, "train", "succeeded")  # never started: start = end, attempt 1
    first = row()
    assert (first["status"], first["attempt"]) == ("succeeded", 1)
    assert first["started_at"] == first["finished_at"]
    attempt = store.begin_stage("r", 0, "train", owner="me", holder_alive=lambda _: True)
    assert attempt == 2 and row()["lease_owner"] == "me" and row()["finished_at"] is None
    started = row()["started_at"]
    store.set_stage("r", 0, "train", "failed", error="ValueError: boom")
    failed = row()
    assert (failed["status"], failed["attempt"], failed["error"]) == (
        "failed",
        2,
        "ValueError: boom",
    )
    assert failed["started_at"] == started and failed["finished_at"] >= started
    assert failed["lease_owner"] is None
    store.set_stage("r", 0, "train", "running")
    again = row()
    assert (again["attempt"], again["error"], again["finished_at"]) == (3, None, None)
    store.set_stage("r", 0, "train", "succeeded")
    assert (row()["status"], row()["attempt"]) == ("succeeded", 3)
    assert store.count("stages") == 1
    with pytest.raises(ValidationFailed, match=r"\(run_id='r'.*column status = 'done' must be"):
        store.set_stage("r", 0, "train", "done")
    with pytest.raises(ValidationFailed, match=r"column stage = 'deploy' must be one of"):
        store.set_stage("r", 0, "deploy", "running")
    assert row()["status"] == "succeeded"


# ------------------------------------------------------------------------ vectorised checks
def _valid_value(col) -> object:
    from datetime import datetime

    if col.isin is not None:
        return col.isin[0]
    if col.type in ("int32", "int64"):
        return int(col.ge) if col.ge is not None else 0
    if col.type == "float64":
        return float(col.ge) if col.ge is not None else 0.0
    return {
        "string": "x",
        "bool": False,
        "timestamp": datetime(2026, 1, 1),
        "binary": b"",
    }.get(col.type, [])


def _edge_values(col) -> list[object]:
    values: list[object] = [None]
    if col.type == "float64":
        values += [float("nan"), float("inf"), float("-inf")]
    if col.type in ("int32", "int64", "float64"):
        step = 1 if col.type != "float64" else 0.5
        if col.ge is not None:
            values += [col.ge - step, col.ge]
        if col.le is not None:
            values += [col.le + step, col.le]
    if col.isin is not None:
        values += ["not-an-allowed-value"]
    return values


@pytest.mark.parametrize(
    "name", sorted(__import__("schemas.tables", fromlist=["STORE_TABLES"]).STORE_TABLES)
)
def test_vectorised_checks_accept_and_refuse_what_the_pandera_schema_does(name: str) -> None:
    """Every store table, every column, NULL / NaN / infinities / range ends / a value not
    allowed: the write path's vectorised checks agree with the table's pandera schema (which
    the write path used to run as well), and a refusal names the offending record by its key
    and the column."""
    import pandera.errors
    import pyarrow as pa

    from kepo.store import _key_of, to_arrow
    from schemas.tables import STORE_TABLES

    table = STORE_TABLES[name]
    base = {c.name: _valid_value(c) for c in table.columns}
    for col in table.columns:
        for value in _edge_values(col):
            rows = [
                dict(base, run_id=f"r{i}") if "run_id" in base else dict(base) for i in range(3)
            ]
            rows[1][col.name] = value
            data = pa.Table.from_pylist(rows, schema=table.arrow_schema())
            try:
                table.pandera_schema().validate(data)
                pandera_accepts = True
            except (pandera.errors.SchemaError, pandera.errors.SchemaErrors):
                pandera_accepts = False
            try:
                to_arrow(table, rows)
                ours = None
            except ValidationFailed as err:
                ours = str(err)
            # One difference, kept from before the pandera pass was dropped: a NULL in a
            # nullable column with allowed values is refused (pandera would let it through).
            expected = pandera_accepts and not (value is None and col.isin is not None)
            assert (ours is None) == expected, (col.name, value, ours)
            if ours is not None:
                assert f"record 1 {_key_of(table, rows[1])}: column {col.name} = " in ours, ours


def test_several_slices_replaced_at_once_with_a_list_of_values(tmp_path: Path) -> None:
    store = Store(tmp_path / "kepo.duckdb")

    def rows(modality: str, accuracy: float) -> list[dict]:
        return [dict(r, modality=modality) for r in _metric_rows("r", 0, accuracy)[:1]]

    for modality in ("MRI", "CT", "OCT"):
        store.replace_rows(
            {"eval_metrics": rows(modality, 0.1)}, where={"run_id": "r", "modality": modality}
        )
    store.replace_rows(
        {"eval_metrics": rows("MRI", 0.5) + rows("CT", 0.6)},
        where={"run_id": "r", "iteration": 0, "modality": ["MRI", "CT"]},
    )
    got = store.query("SELECT modality, accuracy FROM eval_metrics ORDER BY 1").to_pylist()
    assert got == [
        {"modality": "CT", "accuracy": 0.6},
        {"modality": "MRI", "accuracy": 0.5},
        {"modality": "OCT", "accuracy": 0.1},  # outside the list: kept
    ]
    with pytest.raises(StoreError, match=r"outside the partition.*modality not in \['CT'\]"):
        store.replace_rows({"eval_metrics": rows("OCT", 0.9)}, where={"modality": ["CT"]})
    store.replace_rows({"eval_metrics": []}, where={"run_id": "r", "modality": ["CT", "OCT"]})
    assert store.count("eval_metrics") == 1
    store.replace_rows({"eval_metrics": []}, where={"run_id": "r", "modality": []})  # no slice
    assert store.count("eval_metrics") == 1
