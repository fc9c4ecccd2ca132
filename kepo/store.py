"""The DuckDB store: the only module that talks to DuckDB.

One database file per run directory (`<workdir>/kepo.duckdb`). Connections are short-lived: each
call takes the file, does its work and lets it go, so other processes (a `kepo sql` in another
terminal, the next Prefect task) can get it. DuckDB allows one read-write process *or* many
read-only ones; when the file is held we retry for `lock_timeout_s` and then fail with a message
naming the file and what to do.

Taking the file is cheap: the process keeps one in-memory DuckDB instance and each call ATTACHes
the database file to it and DETACHes it afterwards (detaching releases the file lock and
checkpoints, as closing a connection does). Opening a fresh DuckDB instance per call costs
10-20 ms (building its function catalog); an ATTACH about 1 ms. Calls nested inside an open
`connect()` of the same file in the same thread share its attachment. The declared tables are
created and checked once per process per database file, not on every write. `query()`, the
console's entry point, keeps its own locked-down instance (no files, URLs or extensions).

Writes are partition replacements inside one explicit transaction
(`BEGIN; DELETE ... WHERE run_id = ? AND iteration = ?; INSERT ...; COMMIT`), so a rerun replaces
rows instead of duplicating them and a process killed mid-write leaves the old partition intact.
Rows are cast to the table's Arrow schema and checked against its declaration (NULLs, allowed
values, ranges; vectorised) before any write. Identifiers come only from `schemas/`; values are
always `?` parameters.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from schemas.core import Table
from schemas.tables import RUNS, STAGES_TABLE, STORE_TABLES, get_table

log = logging.getLogger(__name__)

Rows = pa.Table | Sequence[Mapping[str, Any]]

_READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}

# Read-only connections (every query, `kepo sql` included) see the database file and nothing
# else: no files, globs or URLs (`read_text`, `read_csv`, `glob`, `'s3://...'`), no extension
# downloads or autoloads, no Python variables as tables; `lock_configuration` keeps a query from
# turning any of it back on.
_QUERY_CONNECTION_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "python_enable_replacements": False,
    "lock_configuration": True,
}


class StoreError(RuntimeError):
    """A problem with the store that the user can act on (the message says how)."""


class StoreLockedError(StoreError):
    """Another process holds the database file."""


class StageBusyError(StoreError):
    """Another live process holds the lease of the same (run, iteration, stage)."""


class ValidationFailed(StoreError):
    """Rows do not match a table's declaration."""


def utcnow() -> datetime:
    """Naive UTC timestamp (the `timestamp` columns are UTC without a zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


# ------------------------------------------------------------------------ rows -> validated Arrow
def to_arrow(table: Table, rows: Rows) -> pa.Table:
    """Cast `rows` to the table's Arrow schema and check them against its declaration.

    Raises ValidationFailed naming the table, the column, the first offending record (by its key
    columns) and what the declaration expects.
    """
    schema = table.arrow_schema()
    if isinstance(rows, pa.Table):
        missing = [n for n in schema.names if n not in rows.column_names]
        extra = [n for n in rows.column_names if n not in schema.names]
        if missing or extra:
            raise ValidationFailed(
                f"{table.name}: columns do not match the declaration in schemas/tables.py "
                f"(missing: {missing or 'none'}, unexpected: {extra or 'none'})"
            )
        try:
            data = rows.select(schema.names).cast(schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
            raise ValidationFailed(
                f"{table.name}: cannot cast rows to the declared types: {err}"
            ) from None
    else:
        rows = list(rows)
        names = set(schema.names)
        for i, row in enumerate(rows):
            if row.keys() == names:
                continue
            missing = [n for n in schema.names if n not in row]
            extra = [n for n in row if n not in schema.names]
            if missing or extra:
                raise ValidationFailed(
                    f"{table.name}: record {i} {_key_of(table, row)}: missing columns {missing or 'none'}, "
                    f"unexpected columns {extra or 'none'}; fix the writer or the declaration in schemas/tables.py"
                )
        try:
            data = pa.Table.from_pylist(rows, schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            bad = _first_uncastable(table, rows)
            raise ValidationFailed(f"{table.name}: {bad or err}") from None
    _validate(table, data)
    return data


def _key_of(table: Table, row: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={row.get(k)!r}" for k in table.key) + ")"


def _first_uncastable(table: Table, rows: list[Mapping[str, Any]]) -> str | None:
    for i, row in enumerate(rows):
        for col in table.columns:
            try:
                pa.array([row[col.name]], type=col.arrow_type)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                return (
                    f"record {i} {_key_of(table, row)}: column {col.name} = {row[col.name]!r:.80} "
                    f"is not a {col.type}"
                )
    return None


def _validate(table: Table, data: pa.Table) -> None:
    """Check the declared NULLs, allowed values and ranges; on failure, point at the first
    offending record of each failing column.

    Types, column names and column order are already enforced by the cast to the Arrow schema
    that precedes this; what is left is checked here with vectorised pyarrow kernels, to the
    rules of the table's pandera schema (`tests/test_store.py` compares the two on edge values):
    NaN counts as NULL, a NULL passes the range checks of a nullable column. One stricter rule,
    as before: a NULL in a nullable column with allowed values (`isin`) is refused.
    """
    problems = _find_violations(table, data)
    if problems:
        raise ValidationFailed(f"{table.name}: " + "; ".join(problems[:5]))


def _find_violations(table: Table, data: pa.Table) -> list[str]:
    """Explain null/range/allowed-value violations with the first offending record's key."""
    problems = []
    for col in table.columns:
        arr = data.column(col.name)
        floating = pa.types.is_floating(arr.type)
        found = []
        if not col.nullable and (arr.null_count or (floating and pc.any(pc.is_nan(arr)).as_py())):
            found.append((pc.is_null(arr, nan_is_null=True), "a value (NULL is not allowed)"))
        elif col.isin is not None or col.ge is not None or col.le is not None:
            if col.isin is not None:
                bad = pc.invert(pc.fill_null(pc.is_in(arr, pa.array(col.isin)), True))
                found.append((bad, f"one of {list(col.isin)}"))
            if col.ge is not None or col.le is not None:
                lo = pc.less(arr, col.ge) if col.ge is not None else None
                hi = pc.greater(arr, col.le) if col.le is not None else None
                bad = lo if hi is None else hi if lo is None else pc.or_(lo, hi)
                found.append((pc.fill_null(bad, False), f"a value in [{col.ge}, {col.le}]"))
        for bad, expect in found:
            if not pc.any(bad).as_py():
                continue
            i = pc.index(bad, True).as_py()
            row = data.slice(i, 1).to_pylist()[0]
            problems.append(
                f"record {i} {_key_of(table, row)}: column {col.name} = {row[col.name]!r:.80} "
                f"must be {expect}"
            )
            break
    return problems


# ------------------------------------------------------------------------ the process's instance
# The instance that database files are attached to: kepo's own SQL only (`query()` has its own
# locked-down instance). No extension is installed or loaded behind the user's back.
_INSTANCE_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


class _Attached:
    """A database file attached to the process's instance: its alias, mode and open users."""

    __slots__ = ("alias", "read_only", "refs")

    def __init__(self, alias: str, read_only: bool) -> None:
        self.alias = alias
        self.read_only = read_only
        self.refs = 1


class _Files:
    """The process's DuckDB instance, the database files attached to it (at most one attachment
    per file, used by one thread at a time) and the files whose tables were checked."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.instance: duckdb.DuckDBPyConnection | None = None
        self.guard = threading.Lock()  # the dicts below and the instance's base connection
        self.locks: dict[str, threading.RLock] = {}
        self.attached: dict[str, _Attached] = {}
        self.checked: set[tuple[str, int, int]] = set()
        self.counter = 0

    @contextmanager
    def holding(self, key: str, store: Store) -> Iterator[None]:
        """Hold the file for this thread (re-entrant); waits for another thread's block."""
        with self.guard:
            lock = self.locks.setdefault(key, threading.RLock())
        if not lock.acquire(timeout=max(store.lock_timeout_s, 0.001)):
            raise StoreLockedError(
                f"{store.path} is held by another thread of this process (waited "
                f"{store.lock_timeout_s:g} s); one thread uses the file at a time"
            )
        try:
            yield
        finally:
            lock.release()

    def attach(self, key: str, store: Store, read_only: bool) -> _Attached:
        def attach_once() -> _Attached:
            with self.guard:
                if self.instance is None:
                    self.instance = duckdb.connect(":memory:", config=_INSTANCE_CONFIG)
                self.counter += 1
                alias = f"kepo_{self.counter}"
                mode = "TYPE DUCKDB, READ_ONLY" if read_only else "TYPE DUCKDB"
                self.instance.execute(f"ATTACH {_sql_literal(key)} AS {alias} ({mode})")
                attached = self.attached[key] = _Attached(alias, read_only)
                return attached

        return store._retry_while_locked(attach_once)

    def detach(self, key: str) -> None:
        """DETACH releases the file lock (a checkpoint first, as closing a connection does)."""
        with self.guard:
            attached = self.attached.pop(key)
            assert self.instance is not None
            self.instance.execute(f"DETACH {attached.alias}")

    def cursor(self) -> duckdb.DuckDBPyConnection:
        with self.guard:
            assert self.instance is not None
            return self.instance.cursor()

    def forget_checked(self, key: str) -> bool:
        """Drop the record that `key`'s tables were checked; whether there was one."""
        with self.guard:
            stale = {ident for ident in self.checked if ident[0] == key}
            self.checked -= stale
        return bool(stale)


_FILES = _Files()
_INHERITED: list[_Files] = []  # a forked child's copy of its parent's state: never used again


def _files() -> _Files:
    """This process's `_Files` (a forked child starts its own: an instance must not cross a fork)."""
    global _FILES
    if _FILES.pid != os.getpid():
        _INHERITED.append(_FILES)
        _FILES = _Files()
    return _FILES


def _file_key(path: Path) -> str:
    return os.path.realpath(path)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# ------------------------------------------------------------------------ the store
class Store:
    """The run directory's DuckDB file. Cheap to create; every method takes the file for its own
    work only (see `connect`)."""

    def __init__(self, path: str | Path, *, lock_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s

    @classmethod
    def for_workdir(cls, workdir: str | Path, *, lock_timeout_s: float = 30.0) -> Store:
        return cls(Path(workdir) / "kepo.duckdb", lock_timeout_s=lock_timeout_s)

    # -------------------------------------------------------------------- connections
    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; retries while another process holds the file.

        The file is attached to the process's DuckDB instance for the duration of the block and
        detached afterwards. Inside the block, calls of this thread on the same file (any
        `Store` of it) share the attachment: a read nested in a write connection reads through
        it, a write nested in a read-only one is refused. Another thread of this process waits
        for the block to end (at most `lock_timeout_s`).
        """
        self._check_path(read_only)
        files = _files()
        key = _file_key(self.path)
        with files.holding(key, self):
            attached = files.attached.get(key)
            if attached is not None:
                if attached.read_only and not read_only:
                    raise StoreError(
                        f"{self.path}: a write inside a read-only connection of the same file; "
                        "open the outer connection with read_only=False"
                    )
                attached.refs += 1
            else:
                attached = files.attach(key, self, read_only)
            try:
                con = files.cursor()
                try:
                    con.execute(f"USE {attached.alias}")
                    if not read_only:
                        self._ensure_tables_once(con, files, key)
                    yield con
                finally:
                    con.close()
            finally:
                attached.refs -= 1
                if not attached.refs:
                    files.detach(key)

    def _check_path(self, read_only: bool) -> None:
        if self.path.is_dir():
            raise StoreError(
                f"{self.path} is a folder, not a database file; pass --db <workdir>/kepo.duckdb"
            )
        if read_only and not self.path.exists():
            raise StoreError(
                f"{self.path}: no such database; run a pipeline stage first (e.g. `kepo demo`)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _retry_while_locked(self, open_: Callable[[], Any]) -> Any:
        """`open_()`, retried while another process holds the file (up to lock_timeout_s)."""
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.05
        while True:
            try:
                return open_()
            except duckdb.IOException as err:
                if "not a valid DuckDB database" in str(err):
                    raise StoreError(
                        f"{self.path} is not a DuckDB database (a kepo store is "
                        "<workdir>/kepo.duckdb); pass the run's database with --db"
                    ) from None
                if "lock" not in str(err).lower():
                    raise
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"{self.path} is held by another process (waited {self.lock_timeout_s:g} s): "
                        "DuckDB allows one writer or many readers. Wait for the running stage to "
                        "finish, close other `kepo`/duckdb sessions on this file, or raise "
                        "store.lock_timeout_s."
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _ensure_tables_once(self, con: duckdb.DuckDBPyConnection, files: _Files, key: str) -> None:
        """Create and check the declared tables, once per process per database file (a file
        replaced at the same path is a new one: it is told apart by device and inode)."""
        st = os.stat(key)
        ident = (key, st.st_dev, st.st_ino)
        if ident in files.checked:
            return
        self._ensure_tables(con)
        files.checked.add(ident)

    @staticmethod
    def _ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
        for table in STORE_TABLES.values():
            con.execute(table.duckdb_ddl())
        # A database written before a nullable column was declared gets it added (NULL), and a
        # column declared NOT NULL then and nullable now loses the constraint.
        present = {
            (table_name, column_name): is_nullable == "YES"
            for table_name, column_name, is_nullable in con.execute(
                "SELECT table_name, column_name, is_nullable FROM information_schema.columns "
                "WHERE table_catalog = current_database() AND table_schema = 'main'"
            ).fetchall()
        }
        for table in STORE_TABLES.values():
            for col in table.columns:
                if not col.nullable:
                    continue
                key = (table.name, col.name)
                if key not in present:
                    con.execute(f"ALTER TABLE {table.name} ADD COLUMN {col.name} {col.duckdb_type}")
                elif not present[key]:
                    con.execute(f"ALTER TABLE {table.name} ALTER COLUMN {col.name} DROP NOT NULL")
        _ensure_comments(con)

    def _write(self, work: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        """`work(con)` inside one transaction of a write connection.

        The tables are checked once per process; should one be missing all the same (the file
        was replaced behind this process's back), they are checked again and `work` redone once.
        """
        for retry in (False, True):
            try:
                with self.connect() as con:
                    con.execute("BEGIN TRANSACTION")
                    try:
                        result = work(con)
                        con.execute("COMMIT")
                    except BaseException:
                        con.execute("ROLLBACK")
                        raise
                return result
            except duckdb.CatalogException:
                if retry or not _files().forget_checked(_file_key(self.path)):
                    raise
        raise AssertionError("unreachable")

    def initialize(self) -> None:
        """Create the file and every declared table."""
        with self.connect():
            pass

    # -------------------------------------------------------------------- writes
    def overwrite_partition(self, table: str, rows: Rows, run_id: str, iteration: int) -> int:
        """Replace the (run_id, iteration) partition of `table` with `rows`; returns rows written."""
        return self.write_partitions({table: rows}, run_id=run_id, iteration=iteration)[table]

    def write_partitions(
        self, tables: Mapping[str, Rows], *, run_id: str, iteration: int | None
    ) -> dict[str, int]:
        """Replace the (run_id[, iteration]) partition of several tables in ONE transaction."""
        where: dict[str, Any] = {"run_id": run_id}
        if iteration is not None:
            where["iteration"] = iteration
        return self.replace_rows(tables, where=where)

    def replace_rows(
        self, tables: Mapping[str, Rows], *, where: Mapping[str, Any]
    ) -> dict[str, int]:
        """For each table: delete the rows matching `where`, insert `rows`; all in one transaction.

        `where` maps columns to a value (`col = value`) or to a list / tuple / set of values
        (`col IN (...)`: several slices replaced at once, e.g. evaluation modalities). Every
        inserted row must itself match `where` (so a rerun of the same slice replaces it).
        """
        prepared: dict[str, pa.Table] = {}
        for name, rows in tables.items():
            decl = _store_table(name)
            for col in where:
                if col not in decl.column_names:
                    raise StoreError(f"{name}: cannot filter on {col!r}, not a column")
            data = to_arrow(decl, rows)
            for col, value in where.items():
                if not data.num_rows:
                    continue
                column = data.column(col)
                if _is_many(value):
                    inside = pc.is_in(column, pa.array(list(value), type=column.type))
                else:
                    inside = pc.equal(column, value)
                if not pc.all(inside).as_py():
                    relation = "not in" if _is_many(value) else "!="
                    raise StoreError(
                        f"{name}: rows outside the partition being written "
                        f"({col} {relation} {value!r})"
                    )
            prepared[name] = data
        return self._write(lambda con: _replace_in(con, prepared, where))

    # -------------------------------------------------------------------- reads
    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pa.Table:
        """Run a read-only query (refuses statements other than SELECT/EXPLAIN).

        `params`: values of its `?` placeholders (a sequence) or `$name` ones (a mapping).
        """
        check_read_only(sql)
        values = dict(params) if isinstance(params, Mapping) else list(params or ())
        self._check_path(read_only=True)
        files = _files()
        key = _file_key(self.path)
        # A fresh instance whose configuration is locked (see _QUERY_CONNECTION_CONFIG), opened
        # while this thread holds the file so that no attachment of it is open beside it.
        with files.holding(key, self):
            if key in files.attached:
                raise StoreError(
                    f"{self.path}: query() inside an open connection of the same file; use "
                    "read() or that connection"
                )
            con = self._retry_while_locked(
                lambda: duckdb.connect(
                    str(self.path), read_only=True, config=_QUERY_CONNECTION_CONFIG
                )
            )
            try:
                return con.sql(sql, params=values or None).to_arrow_table()
            except duckdb.PermissionException as err:
                raise StoreError(
                    f"refused: {err}. Queries read the tables of {self.path} only (no files, "
                    "URLs or extensions); to look at curated Parquet, use pyarrow or a duckdb "
                    "session of your own"
                ) from None
            finally:
                con.close()

    def read(
        self,
        table: str,
        where: Mapping[str, Any] | None = None,
        *,
        columns: Sequence[str] | None = None,
        order_by: Sequence[str] | None = None,
    ) -> pa.Table:
        """Rows of a declared table matching `where` (equality on declared columns)."""
        decl = _store_table(table)
        where = dict(where or {})
        for col in (*where, *(columns or ()), *(order_by or ())):
            if col not in decl.column_names:
                raise StoreError(f"{table}: no column {col!r}")
        sql = f"SELECT {', '.join(columns or decl.column_names)} FROM {table}"
        if where:
            sql += " WHERE " + " AND ".join(f"{c} = ?" for c in where)
        sql += " ORDER BY " + ", ".join(order_by or decl.key)
        if not self.path.exists():
            return decl.arrow_schema().empty_table().select(list(columns or decl.column_names))
        with self.connect(read_only=True) as con:
            result = con.sql(sql, params=list(where.values()) or None).to_arrow_table()
        return result

    def count(self, table: str, where: Mapping[str, Any] | None = None) -> int:
        return self.read(table, where, columns=[_store_table(table).key[0]]).num_rows

    # -------------------------------------------------------------------- runs and stages
    def register_run(self, config: Any) -> None:
        """Store the resolved run config (a kepo.config.RunConfig) in `runs`."""
        with self.connect():  # the read and the write share one attachment of the file
            self._register_run(config)

    def _register_run(self, config: Any) -> None:
        from kepo import __version__

        existing = self.read("runs", {"run_id": config.run_id})
        now = utcnow()
        created = existing.column("created_at")[0].as_py() if existing.num_rows else now
        config_json = config.to_json()
        row = {
            "run_id": config.run_id,
            "created_at": created,
            "updated_at": now,
            "algorithm": config.algorithm.name,
            "method_label": config.method_label,
            "in_domain_modality": config.in_domain_modality,
            "config_json": config_json,
            "config_sha256": config.sha256(),
            "kepo_version": __version__,
        }
        self.write_partitions({RUNS.name: [row]}, run_id=config.run_id, iteration=None)

    def run_config(self, run_id: str) -> Any:
        """The stored RunConfig of `run_id`."""
        from kepo.config import config_from_json

        rows = self.read("runs", {"run_id": run_id}, columns=["config_json"])
        if not rows.num_rows:
            raise StoreError(
                f"{self.path}: no run {run_id!r}; registered runs: {self.run_ids() or 'none'}"
            )
        return config_from_json(rows.column("config_json")[0].as_py())

    def run_ids(self) -> list[str]:
        return self.read("runs", columns=["run_id"]).column("run_id").to_pylist()

    def set_stage(
        self,
        run_id: str,
        iteration: int,
        stage: str,
        status: str,
        *,
        error: str | None = None,
    ) -> None:
        """Record a stage's progress (running / succeeded / failed) in `stages`.

        One statement: `running` inserts attempt 1 or counts one more attempt of an existing row
        and clears its end; `succeeded` / `failed` set the end, status and error and keep the
        start and attempt (a row that was never started gets start = end, attempt 1).
        """
        now = utcnow()
        row = {
            "run_id": run_id,
            "iteration": iteration,
            "stage": stage,
            "status": status,
            "started_at": now,
            "finished_at": None if status == "running" else now,
            "error": None if status == "running" else error,
            "attempt": 1,
            "lease_owner": None,
        }
        to_arrow(STAGES_TABLE, [row])  # the declared checks (stage, status names)
        update = (
            "started_at = excluded.started_at, attempt = stages.attempt + 1"
            if status == "running"
            else None
        )
        self._write(lambda con: _upsert_stage(con, row, update))

    def begin_stage(
        self,
        run_id: str,
        iteration: int,
        stage: str,
        *,
        owner: str,
        holder_alive: Callable[[str], bool],
    ) -> int:
        """Take the lease of (run, iteration, stage) and mark it running; returns the attempt.

        Read and write happen in one transaction on one connection, and DuckDB admits one
        writing process, so two processes cannot both take the lease. A `running` row whose
        `lease_owner` is another process that is still alive (`holder_alive(owner)`) refuses
        with StageBusyError; a row left by a dead process (killed, crashed), or by this process
        (a failure it could not record), is taken over.
        """
        where = {"run_id": run_id, "iteration": iteration, "stage": stage}

        def take(con: duckdb.DuckDBPyConnection) -> int:
            prev = con.execute(
                f"SELECT status, attempt, lease_owner, started_at FROM {STAGES_TABLE.name} "
                "WHERE run_id = ? AND iteration = ? AND stage = ?",
                list(where.values()),
            ).fetchone()
            if (
                prev
                and prev[0] == "running"
                and prev[2]
                and prev[2] != owner  # our own lease, left when a failure could not be recorded
                and holder_alive(prev[2])
            ):
                raise StageBusyError(
                    f"run {run_id}: {stage} of iteration {iteration} is already running "
                    f"(process {prev[2]}, started {prev[3]:%Y-%m-%d %H:%M:%S} UTC); wait for it "
                    "to finish, or stop that process and run the stage again"
                )
            row = {
                **where,
                "status": "running",
                "started_at": utcnow(),
                "finished_at": None,
                "error": None,
                "attempt": (prev[1] + 1) if prev else 1,
                "lease_owner": owner,
            }
            to_arrow(STAGES_TABLE, [row])  # the declared checks
            _upsert_stage(con, row, "started_at = excluded.started_at, attempt = excluded.attempt")
            return row["attempt"]

        return self._write(take)

    def stage_status(self, run_id: str, iteration: int, stage: str) -> str | None:
        rows = self.read(
            STAGES_TABLE.name, {"run_id": run_id, "iteration": iteration, "stage": stage}
        )
        return rows.column("status")[0].as_py() if rows.num_rows else None


def _ensure_comments(con: duckdb.DuckDBPyConnection) -> None:
    """Attach the declared descriptions as DuckDB comments where they are missing or stale
    (databases created before comments, or after a description changed)."""
    have: dict[tuple[str, str | None], str | None] = {
        (t, None): comment
        for t, comment in con.execute(
            "SELECT table_name, comment FROM duckdb_tables() "
            "WHERE database_name = current_database() AND schema_name = 'main'"
        ).fetchall()
    }
    have.update(
        ((t, c), comment)
        for t, c, comment in con.execute(
            "SELECT table_name, column_name, comment FROM duckdb_columns() "
            "WHERE database_name = current_database() AND schema_name = 'main'"
        ).fetchall()
    )
    stale = [
        statement
        for table in STORE_TABLES.values()
        for column, statement in table.duckdb_comments().items()
        if have.get((table.name, column))
        != (table.description if column is None else table.column(column).description)
    ]
    if not stale:
        return
    con.execute("BEGIN TRANSACTION")
    try:
        for statement in stale:
            con.execute(statement)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _replace_in(
    con: duckdb.DuckDBPyConnection, prepared: Mapping[str, pa.Table], where: Mapping[str, Any]
) -> dict[str, int]:
    """Delete the rows matching `where` and insert `prepared`, inside the caller's transaction."""
    written: dict[str, int] = {}
    terms, params = [], []
    for col, value in where.items():
        if _is_many(value):
            values = list(value)
            terms.append(f"{col} IN ({', '.join('?' for _ in values)})" if values else "FALSE")
            params += values
        else:
            terms.append(f"{col} = ?")
            params.append(value)
    clause = " AND ".join(terms)
    for name, data in prepared.items():
        con.execute(f"DELETE FROM {name} WHERE {clause}", params)
        if data.num_rows:
            con.register("_kepo_rows", data)
            cols = ", ".join(data.column_names)
            con.execute(f"INSERT INTO {name} ({cols}) SELECT {cols} FROM _kepo_rows")
            con.unregister("_kepo_rows")
        written[name] = data.num_rows
    return written


def _is_many(value: Any) -> bool:
    return isinstance(value, list | tuple | set | frozenset)


def _upsert_stage(
    con: duckdb.DuckDBPyConnection, row: Mapping[str, Any], update: str | None
) -> None:
    """Insert a `stages` row, or update the existing row of its key: status, end, error and
    lease from `row`, plus `update` (start and attempt; kept when None). One statement."""
    cols = STAGES_TABLE.column_names
    assignments = "status = excluded.status, finished_at = excluded.finished_at, "
    assignments += "error = excluded.error, lease_owner = excluded.lease_owner"
    con.execute(
        f"INSERT INTO {STAGES_TABLE.name} ({', '.join(cols)}) "
        f"VALUES ({', '.join('?' for _ in cols)}) "
        f"ON CONFLICT ({', '.join(STAGES_TABLE.key)}) DO UPDATE SET "
        + assignments
        + (f", {update}" if update else ""),
        [row[c] for c in cols],
    )


def _store_table(name: str) -> Table:
    decl = get_table(name)
    if decl.storage != "duckdb":
        raise StoreError(f"{name} is a Parquet table (curated data), not a store table")
    return decl


def check_read_only(sql: str) -> None:
    """Refuse anything but SELECT/EXPLAIN statements, with a clear message."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as err:
        raise StoreError(f"cannot parse the query: {err}") from None
    if not statements:
        raise StoreError("empty query")
    if len(statements) > 1:
        raise StoreError(f"one statement at a time, please (got {len(statements)})")
    for st in statements:
        kind = st.type.name
        if kind not in _READ_ONLY_STATEMENTS:
            raise StoreError(
                f"refused: `{st.query.strip()[:60]}` is a {kind} statement; `kepo sql` is read-only "
                "(SELECT/EXPLAIN/DESCRIBE/SUMMARIZE only). Tables change only through pipeline stages."
            )
