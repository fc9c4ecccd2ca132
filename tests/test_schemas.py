"""Every declared table: DuckDB DESCRIBE, the pyarrow schema and the pandera schema agree."""

from __future__ import annotations

import duckdb
import narwhals.stable.v1 as nw
import pyarrow as pa
import pytest

from schemas.core import Col, Table
from schemas.tables import ALL_TABLES

# DuckDB DESCRIBE spells these types as follows.
_DUCKDB_NAMES = {"TIMESTAMP": "TIMESTAMP", "INTEGER[][]": "INTEGER[][]", "DOUBLE[][]": "DOUBLE[][]"}


@pytest.mark.parametrize("name", sorted(ALL_TABLES))
def test_duckdb_arrow_pandera_agree(name: str) -> None:
    table = ALL_TABLES[name]
    con = duckdb.connect()
    con.execute(table.duckdb_ddl())
    described = con.sql(
        f"DESCRIBE {table.name}"
    ).fetchall()  # (name, type, null, key, default, extra)
    arrow = table.arrow_schema()
    pandera = table.pandera_schema()
    narwhals_schema = nw.from_native(arrow.empty_table()).schema

    assert [d[0] for d in described] == arrow.names == list(pandera.columns) == table.column_names
    for (col_name, duck_type, null, *_), field in zip(described, arrow, strict=True):
        decl = table.column(col_name)
        assert duck_type == _DUCKDB_NAMES.get(decl.duckdb_type, decl.duckdb_type)
        assert (null == "YES") == field.nullable == decl.nullable or (
            col_name in table.key and not field.nullable
        )
        assert field.type == decl.arrow_type
        assert pandera.columns[col_name].nullable == decl.nullable
        # pandera.pyarrow reports dtypes in narwhals terms: compare with narwhals' view of the
        # arrow type rather than by string.
        if decl.type == "binary":  # no binary dtype in pandera's narwhals engine (see core.py)
            assert pandera.columns[col_name].dtype is None
        else:
            assert pandera.columns[col_name].dtype.type == narwhals_schema[col_name], col_name

    # An empty table read back from DuckDB as Arrow has exactly the declared types.
    back = con.sql(f"SELECT * FROM {table.name}").to_arrow_table()
    assert back.schema.remove_metadata().equals(
        pa.schema([pa.field(f.name, f.type) for f in arrow]), check_metadata=False
    ), (back.schema, arrow)
    # ... and passes the pandera schema, as does a round trip of one NULL-free row through DuckDB.
    pandera.validate(back)


def test_key_and_partition_columns_exist_and_are_not_nullable() -> None:
    for table in ALL_TABLES.values():
        for col in (*table.key, *table.partition):
            assert not table.column(col).nullable, (table.name, col)
        if table.storage == "duckdb" and table.name != "runs":
            assert table.partition == ("run_id", "iteration"), table.name


def test_declaration_rejects_unknown_key() -> None:
    with pytest.raises(ValueError, match="not a column"):
        Table(name="t", description="", columns=(Col("a", "string", "a"),), key=("b",))
