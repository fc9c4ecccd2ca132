"""The Prefect flow `curate`: runs under Prefect, and a second run reuses the first's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.curate import curate, curation_config, status_task

TINY = {
    "train_size": 4,
    "test_per_modality": 2,
    "bundled": {"synthetic_per_modality": 10, "real_variants_per_image": 1, "image_size": 32},
}


@pytest.mark.slow
def test_second_run_reuses_the_output(tmp_path: Path, prefect_harness: None) -> None:
    out = tmp_path / "minimed"
    first = curate(out_dir=str(out), overrides=TINY)
    assert first["reused"] is False and first["read"] == first["accepted"] > 0
    manifest = out / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    created = json.loads(manifest.read_text())["created_at"]

    second = curate(out_dir=str(out), overrides=TINY)
    assert second["reused"] is True
    assert "match" in second["reason"]
    assert manifest.stat().st_mtime_ns == stamp  # nothing was rewritten
    assert json.loads(manifest.read_text())["created_at"] == created

    changed = curate(out_dir=str(out), overrides={**TINY, "test_per_modality": 3})
    assert changed["reused"] is False and "test_per_modality" in changed["reason"]


def test_tampered_output_is_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "minimed"
    cfg = curation_config(out_dir=str(out), overrides=TINY)
    assert status_task.fn(cfg.model_dump_json()) == (False, f"no manifest in {out}")
    from kepo.curate import curate as run_curation

    run_curation(cfg)
    assert status_task.fn(cfg.model_dump_json())[0] is True
    with open(out / "test.parquet", "ab") as f:
        f.write(b"x")
    current, reason = status_task.fn(cfg.model_dump_json())
    assert not current and "test.parquet" in reason


def test_config_defaults_follow_the_command() -> None:
    cfg = curation_config()
    assert (cfg.source, str(cfg.out_dir), cfg.train_size, cfg.test_per_modality) == (
        "bundled",
        "data/minimedvqa",
        300,
        60,
    )
    omni = curation_config(source="omnimedvqa", root="datasets/OmniMedVQA")
    assert (omni.train_size, omni.test_per_modality, str(omni.root)) == (
        600,
        300,
        "datasets/OmniMedVQA",
    )
    with pytest.raises(ValueError):
        curation_config(overrides={"train_size": 0})
