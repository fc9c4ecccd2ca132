"""Named queries: the `.sql` files of `dashboards/`, run against a run's store.

The files ship inside the installed package (the `dashboards` package's data), so `kepo sql
--query NAME`, the report and the study page find them from any working directory. The first
`--` comment lines of a file say what it shows. A query may take named parameters (`$study`),
passed as a mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa

from kepo.store import Store, StoreError

DASHBOARDS_DIR = Path(str(resources.files("dashboards")))


def query_names() -> list[str]:
    """The names of every named query, sorted."""
    return sorted(p.stem for p in DASHBOARDS_DIR.glob("*.sql"))


def has_query(name: str) -> bool:
    return (DASHBOARDS_DIR / f"{name}.sql").is_file()


def named_query(name: str) -> str:
    """The SQL text of `dashboards/<name>.sql`."""
    if not has_query(name):
        raise StoreError(
            f"no named query {name!r}; known: {', '.join(query_names()) or 'none'} "
            "(files in dashboards/)"
        )
    return (DASHBOARDS_DIR / f"{name}.sql").read_text()


def run_query(store: Store, name: str, params: Mapping[str, Any] | None = None) -> pa.Table:
    """The rows of the named query `name` on `store`, with its `$parameters` from `params`."""
    return store.query(named_query(name), params)
