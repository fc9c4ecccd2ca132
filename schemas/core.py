"""The table declaration language: one `Table` per table, everything else derived from it.

A `Table` lists its columns (name, logical type, nullability, checks, description), its key
columns and its partition columns. From that single declaration we derive:

- `duckdb_ddl()`      -> the `CREATE TABLE` statement the store runs,
- `duckdb_comments()` -> `COMMENT ON` statements carrying the descriptions into DuckDB,
- `arrow_schema()`    -> the pyarrow schema rows are cast to before writing (and Parquet files use),
- `pandera_schema()`  -> the `pandera.pyarrow` validation of curated Parquet data (the store's
                         writes run the same checks vectorised, `kepo.store._validate`).

`tests/test_schemas.py` checks, for every declared table, that DuckDB's `DESCRIBE`, the pyarrow
schema and the pandera schema agree column for column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import pyarrow as pa

LogicalType = Literal[
    "string",
    "int32",
    "int64",
    "float64",
    "bool",
    "timestamp",
    "binary",
    "list<int32>",
    "list<float64>",
    "list<string>",
    "list<list<int32>>",
    "list<list<float64>>",
]

# logical type -> (DuckDB type, pyarrow type)
_TYPES: dict[str, tuple[str, pa.DataType]] = {
    "string": ("VARCHAR", pa.string()),
    "int32": ("INTEGER", pa.int32()),
    "int64": ("BIGINT", pa.int64()),
    "float64": ("DOUBLE", pa.float64()),
    "bool": ("BOOLEAN", pa.bool_()),
    "timestamp": ("TIMESTAMP", pa.timestamp("us")),
    "binary": ("BLOB", pa.binary()),
    "list<int32>": ("INTEGER[]", pa.list_(pa.int32())),
    "list<float64>": ("DOUBLE[]", pa.list_(pa.float64())),
    "list<string>": ("VARCHAR[]", pa.list_(pa.string())),
    "list<list<int32>>": ("INTEGER[][]", pa.list_(pa.list_(pa.int32()))),
    "list<list<float64>>": ("DOUBLE[][]", pa.list_(pa.list_(pa.float64()))),
}


@dataclass(frozen=True)
class Col:
    """One column: name, logical type, whether NULL is allowed, value checks and a description."""

    name: str
    type: LogicalType
    description: str
    nullable: bool = False
    isin: tuple[Any, ...] | None = None
    ge: float | None = None
    le: float | None = None

    @property
    def duckdb_type(self) -> str:
        return _TYPES[self.type][0]

    @property
    def arrow_type(self) -> pa.DataType:
        return _TYPES[self.type][1]


@dataclass(frozen=True)
class Table:
    """A table: its columns, key (unique per row) and partition columns (what a rerun replaces)."""

    name: str
    description: str
    columns: tuple[Col, ...]
    key: tuple[str, ...]
    partition: tuple[str, ...] = ()
    storage: Literal["duckdb", "parquet"] = "duckdb"
    _by_name: dict[str, Col] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise ValueError(f"table {self.name}: duplicate column names in {names}")
        for k in (*self.key, *self.partition):
            if k not in names:
                raise ValueError(f"table {self.name}: key/partition column {k!r} is not a column")
        self._by_name.update({c.name: c for c in self.columns})

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Col:
        return self._by_name[name]

    def duckdb_ddl(self) -> str:
        cols = [
            f"    {c.name} {c.duckdb_type}{'' if c.nullable else ' NOT NULL'}" for c in self.columns
        ]
        if self.key:
            cols.append(f"    PRIMARY KEY ({', '.join(self.key)})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n" + ",\n".join(cols) + "\n)"

    def duckdb_comments(self) -> dict[str | None, str]:
        """`COMMENT ON` statements that attach the descriptions (None = the table's own), so
        `duckdb_tables()` / `duckdb_columns()` explain every table and column."""
        statements: dict[str | None, str] = {
            None: f"COMMENT ON TABLE {self.name} IS {_sql_literal(self.description)}"
        }
        for c in self.columns:
            statements[c.name] = (
                f"COMMENT ON COLUMN {self.name}.{c.name} IS {_sql_literal(c.description)}"
            )
        return statements

    def arrow_schema(self) -> pa.Schema:
        return _arrow_schema(self)

    def pandera_schema(self) -> Any:
        return _pandera_schema(self)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@cache
def _arrow_schema(table: Table) -> pa.Schema:
    return pa.schema(
        [
            pa.field(
                c.name, c.arrow_type, nullable=c.nullable, metadata={"description": c.description}
            )
            for c in table.columns
        ],
        metadata={"table": table.name, "description": table.description},
    )


@cache
def _pandera_schema(table: Table) -> Any:
    import pandera.pyarrow as ppa  # imported lazily: pandera is slow to import

    columns = {}
    for c in table.columns:
        checks = []
        if c.isin is not None:
            checks.append(ppa.Check.isin(list(c.isin)))
        if c.ge is not None:
            checks.append(ppa.Check.ge(c.ge))
        if c.le is not None:
            checks.append(ppa.Check.le(c.le))
        # pandera's narwhals engine has no binary dtype; binary columns are type-checked by the
        # cast to the arrow schema that precedes every validation.
        dtype = None if c.type == "binary" else c.arrow_type
        columns[c.name] = ppa.Column(
            dtype, checks=checks, nullable=c.nullable, description=c.description
        )
    return ppa.DataFrameSchema(columns, name=table.name, strict=True, ordered=True)


def cols(*columns: Col) -> tuple[Col, ...]:
    return tuple(columns)


def run_partition_cols() -> tuple[Col, Col]:
    """The two partition columns shared by every per-iteration table."""
    return (
        Col("run_id", "string", "Run identifier (a run directory holds one or more runs)."),
        Col(
            "iteration", "int32", "Training iteration (policy version for evaluation tables).", ge=0
        ),
    )


def names(columns: Sequence[Col]) -> list[str]:
    return [c.name for c in columns]
