"""A run handle: its resolved config plus the store, and the paths and seeds derived from them.

Stages receive a `Run` (or re-open one from `(db path, run_id)`), never large objects from the
previous stage: everything a stage needs is in the store, the curated Parquet or a checkpoint
folder.

Checkpoint numbering: version k is the policy after k training iterations. Version 0 is the
initial student (`models.student`); `train_iteration(run, k)` writes version k + 1. The rollout of
iteration k samples from version k, and evaluation of version k writes `iteration = k`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kepo.config import RunConfig
from kepo.store import Store, StoreError, utcnow


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (e.g. master seed, run id, iteration, prompt id)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


@dataclass
class Run:
    """A registered run: config + store."""

    config: RunConfig
    store: Store
    _questions: Any = field(default=None, repr=False)

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, config: RunConfig) -> Run:
        """Register (or re-register) `config` in `<workdir>/kepo.duckdb` and return the handle."""
        store = Store.for_workdir(config.workdir, lock_timeout_s=config.store.lock_timeout_s)
        store.register_run(config)
        return cls(config=config, store=store)

    @classmethod
    def open(cls, db_path: str | Path, run_id: str) -> Run:
        """Re-open a registered run from its database file."""
        store = Store(db_path)
        config = store.run_config(run_id)
        store.lock_timeout_s = config.store.lock_timeout_s
        return cls(config=config, store=store)

    @property
    def run_id(self) -> str:
        return self.config.run_id

    @property
    def workdir(self) -> Path:
        return self.config.workdir

    # ---------------------------------------------------------------- data
    def questions(self) -> Any:
        """The curated dataset (kepo.dataset.QuestionSet), opened once per handle."""
        if self._questions is None:
            from kepo.dataset import QuestionSet

            self._questions = QuestionSet(self.config.data.out_dir)
        return self._questions

    # ---------------------------------------------------------------- seeds
    def seed(self, *parts: object) -> int:
        """Seed derived from the master seed, the run id and `parts` (e.g. 'rollout', k, prompt)."""
        return derive_seed(self.config.seed, self.run_id, *parts)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_dir(self, version: int) -> Path:
        return self.workdir / "checkpoints" / self.run_id / f"policy-{version:04d}"

    def policy_path(self, version: int) -> Path:
        """Model folder of policy `version` (0 = the initial student)."""
        if version == 0:
            return Path(self.config.models.student)
        rows = self.store.read("checkpoints", {"run_id": self.run_id, "iteration": version})
        if not rows.num_rows:
            raise StoreError(
                f"run {self.run_id}: no checkpoint for policy version {version}; "
                f"run the training stage of iteration {version - 1} first"
            )
        path = Path(rows.column("path")[0].as_py())
        return path if path.is_absolute() else self.workdir / path

    def latest_policy_version(self) -> int:
        rows = (
            self.store.query(
                "SELECT max(iteration) AS v FROM checkpoints WHERE run_id = ?", [self.run_id]
            )
            if self.store.path.exists()
            else None
        )
        value = rows.column("v")[0].as_py() if rows is not None and rows.num_rows else None
        return int(value) if value is not None else 0

    def record_checkpoint(
        self, version: int, path: Path, *, optimizer_path: Path | None, n_params: int
    ) -> None:
        """Register policy `version` (paths stored relative to the workdir when inside it)."""

        def rel(p: Path) -> str:
            try:
                return str(Path(p).resolve().relative_to(self.workdir.resolve()))
            except ValueError:
                return str(p)

        row = {
            "run_id": self.run_id,
            "iteration": version,
            "path": rel(path),
            "optimizer_path": rel(optimizer_path) if optimizer_path else None,
            "created_at": utcnow(),
            "n_params": n_params,
        }
        self.store.overwrite_partition("checkpoints", [row], self.run_id, version)
