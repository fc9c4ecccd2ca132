"""Prefect-side helpers the flows share: one writer per database, kepo's own log lines in the
Prefect UI, and the markdown artifacts of an iteration.

- `writer_slot(workdir)`: a Prefect global concurrency limit of 1 named after the database file
  (`kepo-writer-<hash of its path>`, created on first use), held while a stage runs, so two flow
  runs (served, from a work pool, or `kepo run` against that API) never write the same DuckDB
  file at once; runs on different databases do not wait for each other. `prefect gcl ls` lists
  the limits. The slot is a lease the holder renews: a holder killed with kill -9 stops
  renewing, and the server's repossessor service gives the slot back once the lease (60 s) has
  expired. `database_writer(db)` takes it around every stage task, except on kepo's own
  temporary API (`flows.server`), which is Prefect's ephemeral server: it runs no repossessor,
  and its lease records die with it while the slot counts persist in PREFECT_HOME's database,
  so a killed `kepo run` would leave the slot taken for good. There the store's stage lease
  (`stages.lease_owner`), which every stage takes anyway, is the one-writer guard.
- `forward_kepo_logs()`: the `kepo` loggers also send their records to the Prefect API, so the
  flow run's page shows the library's lines (what PREFECT_LOGGING_EXTRA_LOGGERS=kepo does when
  it is set before Prefect starts; flows/__init__.py sets that default too).
- `publish_iteration_artifacts(workdir, run_id, iteration)`: markdown artifacts on the flow run
  and under stable keys: Table 1 of the database (`<run>-table1`) and the iteration's
  exploration and training-health summary (`<run>-iteration-<k>`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from prefect.concurrency.sync import concurrency

log = logging.getLogger(__name__)


def writer_limit_name(workdir: str | Path) -> str:
    """The global concurrency limit guarding `<workdir>/kepo.duckdb` (stable per absolute path)."""
    db = (Path(workdir) / "kepo.duckdb").resolve()
    return f"kepo-writer-{hashlib.sha256(str(db).encode()).hexdigest()[:16]}"


def _ensure_limit(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it meanwhile
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )


@contextlib.contextmanager
def writer_slot(workdir: str | Path) -> Iterator[None]:
    """Hold the database's single writer slot for the duration of the block."""
    name = writer_limit_name(workdir)
    _ensure_limit(name)
    # A lease renewed while the holder lives (60 s is the server minimum; the default is 300 s).
    with concurrency(name, occupy=1, strict=True, lease_duration=60):
        yield


def api_reclaims_leases() -> bool:
    """Whether the Prefect API in use gives back the slot of a killed holder: any API but kepo's
    own temporary one (`flows.server.temporary_api`) and no API at all."""
    from prefect.settings import PREFECT_API_URL

    from flows.server import TEMPORARY_API_ENV

    url = PREFECT_API_URL.value()
    return bool(url) and url != os.environ.get(TEMPORARY_API_ENV)


@contextlib.contextmanager
def database_writer(db: str | Path) -> Iterator[None]:
    """Hold the writer slot of database file `db` when the API reclaims leases (see above)."""
    if not api_reclaims_leases():
        yield
        return
    with writer_slot(Path(db).parent):
        yield


def forward_kepo_logs() -> None:
    """Send the `kepo` loggers' records (INFO and up) to the Prefect API as well."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("kepo")
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


def artifact_key(*parts: object) -> str:
    """An artifact key Prefect accepts (lowercase letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")


def publish_iteration_artifacts(workdir: str | Path, run_id: str, iteration: int) -> list[str]:
    """Create the markdown artifacts of an iteration; returns their keys."""
    from prefect.artifacts import create_markdown_artifact

    from kepo.report import iteration_markdown, table1_markdown
    from kepo.store import Store

    store = Store(Path(workdir) / "kepo.duckdb")
    keys = [artifact_key(run_id, "table1"), artifact_key(run_id, "iteration", iteration)]
    create_markdown_artifact(
        markdown=table1_markdown(store),
        key=keys[0],
        description=f"Table 1 of {store.path} after iteration {iteration} of {run_id}",
    )
    create_markdown_artifact(
        markdown=iteration_markdown(store, run_id, iteration),
        key=keys[1],
        description=f"Exploration and training health of {run_id}, iteration {iteration}",
    )
    return keys


__all__ = [
    "api_reclaims_leases",
    "artifact_key",
    "database_writer",
    "forward_kepo_logs",
    "publish_iteration_artifacts",
    "writer_limit_name",
    "writer_slot",
]
