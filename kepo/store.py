"""The DuckDB store: the only module that talks to DuckDB.

One database file per run directory (`<workdir>/kepo.duckdb`). Connections are short-lived: each
call opens, does its work and closes, so other processes (a `kepo sql` in another terminal, the
next Prefect task) can get the file. DuckDB allows one read-write process *or* many read-only
ones; when the file is held we retry for `lock_timeout_s` and then fail with a message naming the
file and what to do.

Writes are partition replacements inside one explicit transaction
(`BEGIN; DELETE ... WHERE run_id = ? AND iteration = ?; INSERT ...; COMMIT`), so a rerun replaces
rows instead of duplicating them and a process killed mid-write leaves the old partition intact.
Rows are cast to the table's Arrow schema and validated with its pandera schema before any write.
Identifiers come only from `schemas/`; values are always `?` parameters.
"""

from __future__ import annotations

import logging
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
    """Cast `rows` to the table's Arrow schema and validate them with its pandera schema.

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
        for i, row in enumerate(rows):
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
    """Run the pandera schema; on failure, point at the first offending record."""
    problems = _find_violations(table, data)
    if problems:
        raise ValidationFailed(f"{table.name}: " + "; ".join(problems[:5]))
    import pandera.errors

    try:
        table.pandera_schema().validate(data)
    except (pandera.errors.SchemaError, pandera.errors.SchemaErrors) as err:
        raise ValidationFailed(
            f"{table.name}: rows fail the declared checks: {str(err)[:1000]}"
        ) from None


def _find_violations(table: Table, data: pa.Table) -> list[str]:
    """Explain null/range/allowed-value violations with the first offending record's key."""
    problems = []
    for col in table.columns:
        arr = data.column(col.name)
        bad = None
        expect = ""
        if not col.nullable and arr.null_count:
            bad, expect = pc.is_null(arr), "a value (NULL is not allowed)"
        elif col.isin is not None:
            bad = pc.invert(pc.fill_null(pc.is_in(arr, pa.array(col.isin)), True))
            expect = f"one of {list(col.isin)}"
        elif col.ge is not None or col.le is not None:
            lo = pc.less(arr, col.ge) if col.ge is not None else None
            hi = pc.greater(arr, col.le) if col.le is not None else None
            bad = lo if hi is None else hi if lo is None else pc.or_(lo, hi)
            bad = pc.fill_null(bad, False)
            expect = f"a value in [{col.ge}, {col.le}]"
        if bad is None or not pc.any(bad).as_py():
            continue
        i = pc.index(bad, True).as_py()
        row = data.slice(i, 1).to_pylist()[0]
        problems.append(
            f"record {i} {_key_of(table, row)}: column {col.name} = {row[col.name]!r:.80} must be {expect}"
        )
    return problems


# ------------------------------------------------------------------------ the store
class Store:
    """The run directory's DuckDB file. Cheap to create; every method opens its own connection."""

    def __init__(self, path: str | Path, *, lock_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s

    @classmethod
    def for_workdir(cls, workdir: str | Path, *, lock_timeout_s: float = 30.0) -> Store:
        return cls(Path(workdir) / "kepo.duckdb", lock_timeout_s=lock_timeout_s)

    # -------------------------------------------------------------------- connections
    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; retries while another process holds the file."""
        if self.path.is_dir():
            raise StoreError(
                f"{self.path} is a folder, not a database file; pass --db <workdir>/kepo.duckdb"
            )
        if read_only and not self.path.exists():
            raise StoreError(
                f"{self.path}: no such database; run a pipeline stage first (e.g. `kepo demo`)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(
                    str(self.path),
                    read_only=read_only,
                    config=_QUERY_CONNECTION_CONFIG if read_only else {},
                )
                break
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
        try:
            if not read_only:
                self._ensure_tables(con)
            yield con
        finally:
            con.close()

    @staticmethod
    def _ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
        for table in STORE_TABLES.values():
            con.execute(table.duckdb_ddl())
        # A database written before a nullable column was declared gets it added (NULL), and a
        # column declared NOT NULL then and nullable now loses the constraint.
        present = {
            (table_name, column_name): is_nullable == "YES"
            for table_name, column_name, is_nullable in con.execute(
                "SELECT table_name, column_name, is_nullable FROM information_schema.columns"
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

        Every inserted row must itself match `where` (so a rerun of the same slice replaces it).
        """
        prepared: dict[str, pa.Table] = {}
        for name, rows in tables.items():
            decl = _store_table(name)
            for col in where:
                if col not in decl.column_names:
                    raise StoreError(f"{name}: cannot filter on {col!r}, not a column")
            data = to_arrow(decl, rows)
            for col, value in where.items():
                if data.num_rows and not pc.all(pc.equal(data.column(col), value)).as_py():
                    raise StoreError(
                        f"{name}: rows outside the partition being written ({col} != {value!r})"
                    )
            prepared[name] = data
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                written = _replace_in(con, prepared, where)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return written

    # -------------------------------------------------------------------- reads
    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pa.Table:
        """Run a read-only query (refuses statements other than SELECT/EXPLAIN).

        `params`: values of its `?` placeholders (a sequence) or `$name` ones (a mapping).
        """
        check_read_only(sql)
        values = dict(params) if isinstance(params, Mapping) else list(params or ())
        with self.connect(read_only=True) as con:
            try:
                return con.sql(sql, params=values or None).to_arrow_table()
            except duckdb.PermissionException as err:
                raise StoreError(
                    f"refused: {err}. Queries read the tables of {self.path} only (no files, "
                    "URLs or extensions); to look at curated Parquet, use pyarrow or a duckdb "
                    "session of your own"
                ) from None

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
        """Record a stage's progress (running / succeeded / failed) in `stages`."""
        where = {"run_id": run_id, "iteration": iteration, "stage": stage}
        prev = self.read(STAGES_TABLE.name, where)
        prev_row = prev.to_pylist()[0] if prev.num_rows else None
        now = utcnow()
        if status == "running":
            row = {
                **where,
                "status": status,
                "started_at": now,
                "finished_at": None,
                "error": None,
                "attempt": (prev_row["attempt"] + 1) if prev_row else 1,
                "lease_owner": None,
            }
        else:
            started = prev_row["started_at"] if prev_row else now
            row = {
                **where,
                "status": status,
                "started_at": started,
                "finished_at": now,
                "error": error,
                "attempt": prev_row["attempt"] if prev_row else 1,
                "lease_owner": None,
            }
        self.replace_rows({STAGES_TABLE.name: [row]}, where=where)

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
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
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
                _replace_in(con, {STAGES_TABLE.name: to_arrow(STAGES_TABLE, [row])}, where)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return row["attempt"]

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
            "SELECT table_name, comment FROM duckdb_tables() WHERE schema_name = 'main'"
        ).fetchall()
    }
    have.update(
        ((t, c), comment)
        for t, c, comment in con.execute(
            "SELECT table_name, column_name, comment FROM duckdb_columns() "
            "WHERE schema_name = 'main'"
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
    for name, data in prepared.items():
        clause = " AND ".join(f"{col} = ?" for col in where)
        con.execute(f"DELETE FROM {name} WHERE {clause}", list(where.values()))
        if data.num_rows:
            con.register("_kepo_rows", data)
            cols = ", ".join(data.column_names)
            con.execute(f"INSERT INTO {name} ({cols}) SELECT {cols} FROM _kepo_rows")
            con.unregister("_kepo_rows")
        written[name] = data.num_rows
    return written


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
