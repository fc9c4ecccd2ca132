"""Prefect flow `curate`: build or reuse a curated dataset (a thin wrapper over `kepo.curate`).

    python -m flows.curate                                   # MiniMedVQA into data/minimedvqa
    python -m flows.curate --config configs/tiny/kepo-tau1.yaml   # the config's `data:` section
    python -m flows.curate --source omnimedvqa --root path/to/OmniMedVQA --out data/omnimedvqa

A second run with unchanged inputs reuses the output: the first task compares the manifest's
source-file sha256s and settings (and the outputs' sha256s) with what this run asks for
(`kepo.curate.curation_status`); only when they differ does the curation task run. This does not
rely on Prefect's result cache, so it holds across Prefect servers and machines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task

from kepo.config import CurationConfig, deep_merge, load_config
from kepo.curate import (
    BUNDLED_OUT_DIR,
    BUNDLED_TEST_PER_MODALITY,
    BUNDLED_TRAIN_SIZE,
    CurationResult,
    curation_status,
)
from kepo.curate import curate as run_curation


def curation_config(
    config_path: str | None = None,
    source: Literal["bundled", "omnimedvqa"] | None = None,
    root: str | None = None,
    out_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> CurationConfig:
    """The CurationConfig a flow run asks for: the config's `data:` section, else the defaults of
    `kepo curate` (bundled: data/minimedvqa, 300 train / 60 test per modality), then the arguments."""
    if config_path:
        data = load_config(config_path).data.model_dump(mode="json")
    elif (source or "bundled") == "bundled":
        data = {
            "source": "bundled",
            "out_dir": str(BUNDLED_OUT_DIR),
            "train_size": BUNDLED_TRAIN_SIZE,
            "test_per_modality": BUNDLED_TEST_PER_MODALITY,
        }
    else:
        data = {"source": "omnimedvqa", "out_dir": "data/omnimedvqa"}
    given = {"source": source, "root": root, "out_dir": out_dir}
    data.update({k: v for k, v in given.items() if v is not None})
    return CurationConfig.model_validate(deep_merge(data, overrides or {}))


@task(name="curation-status")
def status_task(cfg_json: str) -> tuple[bool, str]:
    """Whether the output folder already holds this curation (manifest hashes + settings)."""
    status = curation_status(CurationConfig.model_validate_json(cfg_json))
    return status.current, status.reason


@task(name="curate-dataset")
def curate_task(cfg_json: str) -> str:
    """Ingest, split, sample and write the Parquet files; returns the manifest path."""
    return str(run_curation(CurationConfig.model_validate_json(cfg_json)).manifest_path)


@flow(name="curate")
def curate(
    config_path: str | None = None,
    source: Literal["bundled", "omnimedvqa"] | None = None,
    root: str | None = None,
    out_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build (or reuse) the curated train/test/rejects Parquet files and manifest.json."""
    logger = get_run_logger()
    cfg = curation_config(config_path, source, root, out_dir, overrides)
    cfg_json = cfg.model_dump_json()
    current, reason = status_task(cfg_json)
    if current and not force:
        logger.info("reusing curated data in %s: %s (nothing recomputed)", cfg.out_dir, reason)
        reused = True
    else:
        logger.info(
            "curating %s into %s (%s)", cfg.source, cfg.out_dir, "forced" if force else reason
        )
        curate_task(cfg_json)
        reused = False
    result = CurationResult.from_manifest(cfg.out_dir, reused=reused)
    logger.info(
        "%s: %d train, %d test items; read %d = accepted %d + rejected %d",
        cfg.out_dir,
        sum(c["train_sample"] for c in result.per_modality.values()),
        sum(c["test_sample"] for c in result.per_modality.values()),
        result.read,
        result.accepted,
        result.rejected,
    )
    return {
        "out_dir": str(Path(cfg.out_dir)),
        "reused": reused,
        "reason": reason,
        "read": result.read,
        "accepted": result.accepted,
        "rejected": result.rejected,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="Run config YAML (its data: section).")
    parser.add_argument("--source", choices=("bundled", "omnimedvqa"))
    parser.add_argument("--root", help="OmniMedVQA folder (source omnimedvqa).")
    parser.add_argument("--out", help="Output folder.")
    parser.add_argument(
        "--force", action="store_true", help="Curate even when the output is current."
    )
    args = parser.parse_args()
    print(json.dumps(curate(args.config, args.source, args.root, args.out, force=args.force)))


if __name__ == "__main__":
    main()
