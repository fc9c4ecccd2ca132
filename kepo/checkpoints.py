"""What a run keeps on disk of its policy versions.

A checkpoint folder (`<workdir>/checkpoints/<run>/policy-NNNN`) holds the model weights in
`train.save_dtype` and, for the newest version only, `optimizer.pt` (AdamW moments, scheduler
position and, when the weights are saved below float32, the float32 master weights the next
iteration resumes from). After a train or evaluate stage succeeds, `prune_checkpoints`

1. deletes the optimizer state of every version but the newest (its `optimizer_path` becomes
   NULL): only the newest is ever resumed from;
2. with `train.keep_checkpoints: N`, deletes the folders of versions older than the newest N,
   except versions listed in `train.keep_versions`, versions the run still has to evaluate
   (`needed`, from the pipeline's plan) and folders outside the run's workdir (version 0, the
   initial student, is `models.student` and has no row). A pruned version keeps its row, with
   `pruned_at` set and `bytes_on_disk` 0, so audits still see it; asking for its weights
   raises `kepo.run.CheckpointPruned` naming the version.

Rows are updated first (one transaction), files deleted after: a kill in between leaves files
that no row needs, and the next prune deletes them. `bytes_on_disk` / `optimizer_bytes` feed
`kepo sql --query checkpoint_disk`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kepo.run import Run, folder_bytes
from kepo.store import utcnow

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class PruneResult:
    """What one `prune_checkpoints` call removed."""

    optimizer_removed: list[int] = field(default_factory=list)
    """Versions whose optimizer state was deleted."""
    pruned: list[int] = field(default_factory=list)
    """Versions whose folder was deleted."""
    bytes_freed: int = 0


def versions_to_keep(
    versions: Iterable[int],
    *,
    keep_checkpoints: int | None,
    keep_versions: Iterable[int] = (),
    needed: Iterable[int] = (),
) -> set[int]:
    """The versions whose folders stay: all with keep_checkpoints None, else the newest N, the
    newest of all, `keep_versions` and `needed`."""
    ordered = sorted(set(versions), reverse=True)
    if keep_checkpoints is None:
        return set(ordered)
    keep = set(ordered[:keep_checkpoints]) | set(ordered[:1])
    return keep | (set(ordered) & (set(keep_versions) | set(needed)))


def prune_checkpoints(run: Run, *, needed: Iterable[int] = ()) -> PruneResult:
    """Apply the run's keep rules (module docstring); `needed` = versions still to evaluate."""
    result = PruneResult()
    rows = run.store.read("checkpoints", {"run_id": run.run_id}).to_pylist()
    if not rows:
        return result
    cfg = run.config.train
    latest = max(r["iteration"] for r in rows)
    keep = versions_to_keep(
        (r["iteration"] for r in rows),
        keep_checkpoints=cfg.keep_checkpoints,
        keep_versions=cfg.keep_versions,
        needed=needed,
    )
    now = utcnow()
    delete_files: list[Path] = []
    delete_folders: list[Path] = []
    changed = False
    for row in rows:
        version, folder = row["iteration"], run.resolve(row["path"])
        if row["pruned_at"] is not None:
            if folder.exists() and run.owns(folder):  # left by a kill after the row was marked
                delete_folders.append(folder)
            continue
        if version not in keep and run.owns(folder):
            result.pruned.append(version)
            result.bytes_freed += folder_bytes(folder)
            delete_folders.append(folder)
            row.update(pruned_at=now, bytes_on_disk=0, optimizer_path=None, optimizer_bytes=None)
            changed = True
            continue
        if version == latest:
            continue
        optimizer = (
            run.resolve(row["optimizer_path"]) if row["optimizer_path"] else folder / OPTIMIZER_FILE
        )
        if not optimizer.is_file() or not run.owns(optimizer):
            continue
        size = optimizer.stat().st_size
        delete_files.append(optimizer)
        result.bytes_freed += size
        if row["optimizer_path"] is not None:
            result.optimizer_removed.append(version)
            row.update(
                optimizer_path=None,
                optimizer_bytes=None,
                bytes_on_disk=max(folder_bytes(folder) - size, 0),
            )
            changed = True
    if changed:
        run.store.replace_rows({"checkpoints": rows}, where={"run_id": run.run_id})
    for path in delete_files:
        path.unlink(missing_ok=True)
    for folder in delete_folders:
        shutil.rmtree(folder, ignore_errors=True)
    removed = [
        f"{what} of version(s) {', '.join(map(str, versions))}"
        for what, versions in (
            ("the optimizer state", result.optimizer_removed),
            ("the folder (train.keep_checkpoints)", result.pruned),
        )
        if versions
    ]
    if removed:
        log.info(
            "run %s: removed %s; %.1f MB freed",
            run.run_id,
            " and ".join(removed),
            result.bytes_freed / 1e6,
        )
    return result
