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
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kepo.config import RunConfig, parse_config
from kepo.seeds import derive_seed
from kepo.store import Store, StoreError, utcnow

log = logging.getLogger(__name__)

# Settings that never change a stored row (where things run, how fast, how much of the plan).
HARMLESS_SETTINGS = (
    "iterations",
    "description",
    "workdir",
    "study",
    "store.",
    "models.device",
    "models.torch_threads",
    "models.attn_implementation",
    "rollout.shards",
    "rollout.generation_batch_size",
    "rollout.scoring_batch_size",
    "rollout.vllm_gpu_memory_utilization",
    "eval.batch_size",
    "eval.every",
    "data.image_workers",
    "train.keep_checkpoints",
    "train.keep_versions",
    "train.launcher",
    "train.strategy",
)
# Which stages' stored rows a changed setting invalidates (first matching prefix wins).
_INVALIDATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("data.", ("curate", "rollout", "train", "evaluate")),
    ("eval.", ("evaluate",)),
    ("", ("rollout", "train", "evaluate")),
)
# The tables each stage writes (dropped with it by `discard_stale`).
STAGE_TABLES = {
    "curate": (),
    "rollout": ("prompts", "rollouts", "hints", "hint_attempts", "teacher_topk"),
    "train": ("train_steps", "checkpoints"),
    "evaluate": ("eval_predictions", "eval_metrics"),
}
_PATH_FIELDS = (
    ("workdir",),
    ("data", "out_dir"),
    ("data", "root"),
    ("models", "student"),
    ("models", "teacher"),
    ("models", "reference"),
)


class SettingsChanged(StoreError):
    """A rerun's settings contradict rows the run has stored."""


class CheckpointPruned(StoreError):
    """A policy version's folder was deleted by train.keep_checkpoints (its row stays)."""


@dataclass
class Run:
    """A registered run: config + store."""

    config: RunConfig
    store: Store
    _questions: Any = field(default=None, repr=False)

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(
        cls, config: RunConfig, *, store: Store | None = None, discard_stale: bool = False
    ) -> Run:
        """Register (or re-register) `config` in `<workdir>/kepo.duckdb` and return the handle.

        Re-registering with settings that contradict stored rows raises SettingsChanged naming
        the settings; `discard_stale=True` drops the affected stages' rows first (and the
        run's checkpoint folders when training is affected), so they are recomputed.
        """
        if store is None:
            store = Store.for_workdir(config.workdir, lock_timeout_s=config.store.lock_timeout_s)
        run = cls(config=config, store=store)
        stored = None
        if store.path.is_file() and config.run_id in store.run_ids():
            stored = relocate(store.run_config(config.run_id), store.path)
        if stored is not None:
            changes = changed_settings(stored, config)
            affected = run.stages_with_rows(invalidated_stages(changes))
            if affected and not discard_stale:
                shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:4])
                raise SettingsChanged(
                    f"run {config.run_id}: changed settings ({shown}) contradict its stored "
                    f"{'/'.join(affected)} rows; use a new run id (e.g. --set run_id=NEW) or "
                    "rerun with --discard-stale to drop those rows and recompute them"
                )
            if affected:
                run.discard(affected)
        store.register_run(config)
        return run

    @classmethod
    def open(cls, db_path: str | Path, run_id: str) -> Run:
        """Re-open a registered run from its database file.

        The run's folder is the database's folder: a run registered elsewhere (a copied or moved
        workdir) has its workdir, and every configured path inside the old workdir, moved here,
        so nothing is ever read from or written into the original tree.
        """
        store = Store(db_path)
        if not store.path.exists():
            raise StoreError(
                f"{store.path}: no such database; pass the run's <workdir>/kepo.duckdb with --db"
            )
        config = relocate(store.run_config(run_id), store.path)
        store.lock_timeout_s = config.store.lock_timeout_s
        return cls(config=config, store=store)

    # ---------------------------------------------------------------- stored rows
    def stages_with_rows(self, stages: tuple[str, ...]) -> list[str]:
        """The stages among `stages` that have a `stages` row for this run."""
        if not stages or not self.store.path.is_file():
            return []
        rows = self.store.read("stages", {"run_id": self.run_id}, columns=["stage"])
        present = set(rows.column("stage").to_pylist())
        return [s for s in stages if s in present]

    def discard(self, stages: list[str]) -> None:
        """Drop every row the given stages wrote for this run (all iterations)."""
        log.warning("run %s: discarding the stored rows of %s", self.run_id, ", ".join(stages))
        for stage in stages:
            self.store.replace_rows({"stages": []}, where={"run_id": self.run_id, "stage": stage})
        tables = [t for s in stages for t in STAGE_TABLES[s]]
        if tables:
            self.store.replace_rows({t: [] for t in tables}, where={"run_id": self.run_id})
        if "train" in stages:
            folder = self.workdir / "checkpoints" / self.run_id
            if folder.is_dir():
                shutil.rmtree(folder)

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
            import pyarrow as pa
            import pyarrow.parquet as pq

            from kepo.dataset import QuestionSet

            out_dir = Path(self.config.data.out_dir)
            try:
                questions = QuestionSet(out_dir)
                for name in ("train.parquet", "test.parquet", "pool.parquet"):
                    if name != "pool.parquet" or (out_dir / name).exists():
                        pq.read_metadata(out_dir / name)  # a truncated file fails here
                self._questions = questions
            except (pa.ArrowInvalid, OSError) as err:
                raise StoreError(
                    f"the curated data in {out_dir} cannot be read ({str(err).splitlines()[0]}); "
                    f"delete that folder and rerun `kepo run` (it re-curates), or `kepo curate`"
                ) from None
        return self._questions

    # ---------------------------------------------------------------- seeds
    def seed(self, *parts: object) -> int:
        """Seed derived from the master seed, the run id and `parts` (e.g. 'rollout', k, prompt)."""
        return derive_seed(self.config.seed, self.run_id, *parts)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_dir(self, version: int) -> Path:
        return self.workdir / "checkpoints" / self.run_id / f"policy-{version:04d}"

    def new_checkpoint_dir(self, version: int) -> Path:
        """A folder for a new copy of `version` that no stored row points to.

        `checkpoint_dir(version)` when free, else `policy-NNNN-2`, `-3`, ...: a rerun writes
        beside the recorded copy, records the new one, and only then removes the old.
        """
        base = self.checkpoint_dir(version)
        recorded = self.recorded_checkpoint(version)
        candidate, n = base, 1
        while candidate.exists() or (recorded is not None and candidate == recorded):
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")
        return candidate

    def recorded_checkpoint(self, version: int) -> Path | None:
        """The folder the `checkpoints` row of `version` points to (None without a row).

        A pruned version's row still names its (deleted) folder; `policy_path` refuses it."""
        row = self.checkpoint_row(version)
        return None if row is None else self.resolve(row["path"])

    def checkpoint_row(self, version: int) -> dict[str, Any] | None:
        """The `checkpoints` row of `version` (None without one)."""
        rows = self.store.read("checkpoints", {"run_id": self.run_id, "iteration": version})
        return rows.to_pylist()[0] if rows.num_rows else None

    def resolve(self, stored: str | Path) -> Path:
        """A path as stored in a row: relative paths are inside the workdir."""
        path = Path(stored)
        return path if path.is_absolute() else self.workdir / path

    def relative(self, path: Path) -> str:
        """`path` as a row stores it: relative to the workdir when inside it."""
        try:
            return str(Path(path).resolve().relative_to(self.workdir.resolve()))
        except ValueError:
            return str(path)

    def owns(self, path: Path) -> bool:
        """Whether `path` lies inside this run's workdir (only such folders are ever removed)."""
        try:
            Path(path).resolve().relative_to(self.workdir.resolve())
        except ValueError:
            return False
        return True

    def policy_path(self, version: int) -> Path:
        """Model folder of policy `version` (0 = the initial student)."""
        if version == 0:
            return Path(self.config.models.student)
        row = self.checkpoint_row(version)
        if row is None:
            raise StoreError(
                f"run {self.run_id}: no checkpoint for policy version {version}; "
                f"run the training stage of iteration {version - 1} first"
            )
        if row.get("pruned_at") is not None:
            rows = self.store.read("checkpoints", {"run_id": self.run_id}).to_pylist()
            kept = [r["iteration"] for r in rows if r["pruned_at"] is None]
            raise CheckpointPruned(
                f"run {self.run_id}: policy version {version} was pruned by "
                f"train.keep_checkpoints on {row['pruned_at']:%Y-%m-%d %H:%M} UTC (its row stays, "
                f"its weights are gone; kept versions: {kept or 'none'}); use a kept version, "
                f"or retrain under a new run_id with train.keep_versions: [{version}]"
            )
        return self.resolve(row["path"])

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

    def generation_backend(
        self,
        model_path: str | Path,
        *,
        role: Literal["student", "teacher", "reference"] = "student",
        purpose: Literal["rollout", "eval"] = "rollout",
    ) -> Any:
        """The configured generation backend (kepo.generation) for `role` on a local model folder.

        The one place a run turns its settings into a backend (`kepo.generation.open_backend`:
        HF or vLLM per role, engine settings, teacher placement); rollout and evaluation differ
        only in the batch size (`purpose`). Raises FileNotFoundError when the folder does not
        exist.
        """
        from kepo.generation import open_backend

        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"model folder {path} does not exist; build or download it, or train the "
                "checkpoint first"
            )
        return open_backend(self.config, role, path, purpose=purpose)

    def record_checkpoint(
        self,
        version: int,
        path: Path,
        *,
        optimizer_path: Path | None,
        n_params: int,
        weights_dtype: str | None = None,
    ) -> None:
        """Register policy `version` (paths stored relative to the workdir when inside it), with
        the bytes its folder and its optimizer state take on disk."""
        row = {
            "run_id": self.run_id,
            "iteration": version,
            "path": self.relative(path),
            "optimizer_path": self.relative(optimizer_path) if optimizer_path else None,
            "created_at": utcnow(),
            "n_params": n_params,
            "weights_dtype": weights_dtype,
            "bytes_on_disk": folder_bytes(path),
            "optimizer_bytes": Path(optimizer_path).stat().st_size if optimizer_path else None,
            "pruned_at": None,
        }
        self.store.overwrite_partition("checkpoints", [row], self.run_id, version)


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the files under `folder` (0 when it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ models
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".gguf")
_WHOLE_FILE_BYTES = 64 << 20
_BLOCKS, _BLOCK_BYTES = 64, 64 << 10
_fingerprints: dict[tuple, str] = {}


def model_fingerprint(folder: str | Path | None) -> str | None:
    """sha256 over a model folder's config.json and weight files (None if it is not a folder).

    Two folders with the same weights have the same fingerprint wherever they are; results
    stored with a fingerprint are reused only for the same one. Files up to 64 MiB are hashed
    whole; larger ones by their size and 64 evenly spaced 64 KiB blocks (training changes every
    tensor, so a retrained checkpoint differs in every block, and a 2B model is read in
    milliseconds, not seconds). Cached per (file, size, mtime).
    """
    if folder is None or not Path(folder).is_dir():
        return None
    folder = Path(folder)
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.name == "config.json" or p.name.endswith(_WEIGHT_SUFFIXES))
    )
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _fingerprints:
        digest = hashlib.sha256()
        for p in files:
            size = p.stat().st_size
            digest.update(f"{p.name}\0{size}\0".encode())
            with p.open("rb") as f:
                if size <= _WHOLE_FILE_BYTES:
                    digest.update(f.read())
                    continue
                for i in range(_BLOCKS):
                    f.seek((size - _BLOCK_BYTES) * i // (_BLOCKS - 1))
                    digest.update(f.read(_BLOCK_BYTES))
        _fingerprints[key] = digest.hexdigest()
    return _fingerprints[key]


# ------------------------------------------------------------------------------ settings
def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def changed_settings(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted settings whose value differs and that can change stored rows: {name: (old, new)}."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    changes = {}
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        if any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS_SETTINGS):
            continue
        changes[key] = (a.get(key), b.get(key))
    return changes


def invalidated_stages(changes: dict[str, Any]) -> tuple[str, ...]:
    """The stages whose stored rows the changed settings invalidate (pipeline order)."""
    hit: set[str] = set()
    for key in changes:
        for prefix, stages in _INVALIDATES:
            if key.startswith(prefix):
                hit.update(stages)
                break
    return tuple(s for s in ("curate", "rollout", "train", "evaluate") if s in hit)


# ------------------------------------------------------------------------------ paths
def relocate(config: RunConfig, db_path: str | Path) -> RunConfig:
    """`config` with its run folder moved to the database's folder (see `Run.open`).

    Unchanged when the stored workdir is that folder. Otherwise the workdir becomes the
    database's folder, and every configured path inside the old workdir is moved with it;
    paths outside it (a shared curated dataset, model folders) stay as they are.
    """
    home = Path(db_path).resolve().parent
    old = Path(config.workdir)
    if _resolve(old) == home:
        return config
    data = config.model_dump(mode="json")
    moved = []
    for path in _PATH_FIELDS:
        node = data
        for part in path[:-1]:
            node = node[part]
        value = node[path[-1]]
        if value is None:
            continue
        rel = _inside(Path(value), old)
        if rel is not None:
            node[path[-1]] = str(home / rel)
            moved.append(".".join(path))
    log.info(
        "run %s was registered in %s; its database is in %s: %s resolve there",
        config.run_id,
        old,
        home,
        ", ".join(moved),
    )
    return parse_config(data, "stored config")


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def _inside(path: Path, folder: Path) -> Path | None:
    """`path` relative to `folder` when inside it (lexically, or once both are resolved)."""
    for p, f in ((path, folder), (_resolve(path), _resolve(folder))):
        try:
            return p.relative_to(f)
        except ValueError:
            continue
    return None
