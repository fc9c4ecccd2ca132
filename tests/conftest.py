"""Session fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(student_dir, teacher_dir): tiny Qwen3-VL folders sharing one tokenizer, built once."""
    import torch

    from kepo.tiny import build_tiny_pair

    # Tiny models are dominated by per-op overhead: one thread avoids OpenMP threads waiting on
    # each other when the cores are shared (measured 2x faster on a loaded 2-core machine).
    torch.set_num_threads(1)
    return build_tiny_pair(tmp_path_factory.mktemp("tiny_models"), seed=0)


@pytest.fixture(scope="session")
def curated_bundled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small curated bundled dataset (train 12 MRI items, 2 test items per modality), built once."""
    from kepo.config import BundledDatasetConfig, CurationConfig
    from kepo.curate import curate_bundled

    out = tmp_path_factory.mktemp("curated_bundled")
    bundled = BundledDatasetConfig(
        synthetic_per_modality=10, real_variants_per_image=1, image_size=32
    )
    curate_bundled(out, CurationConfig(train_size=12, test_per_modality=2, bundled=bundled))
    return out


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary local Prefect API for the whole session (started once, about 12 s)."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
