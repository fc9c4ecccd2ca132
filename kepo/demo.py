"""The demo's preparation and summary (the flow itself is `flows/demo.py`).

`prepare_models` builds the tiny student and teacher from configs (`kepo.tiny`), with a tokenizer
trained on the curated data's text, and warms them up (`kepo.warmup`). Both steps are skipped
when their output folder already holds a finished result (a `warmup.json` written last).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from kepo.dataset import QuestionSet
from kepo.tiny import build_tiny_pair, corpus_from_parquet
from kepo.warmup import WarmupSettings, warm_up_pair

log = logging.getLogger(__name__)

# The demo's run configs, read from the installed `configs` package (the repository's configs/).
DEMO_CONFIGS = tuple(
    str(Path(str(resources.files("configs"))) / "demo" / name)
    for name in ("kepo.yaml", "grpo.yaml")
)

# Named queries (dashboards/) the demo prints and suggests, with what each shows.
EXAMPLE_QUERIES = (
    ("exploration", "knowledge-enhanced exploration per run and iteration"),
    ("hints_never_accepted", "hints that never led to an accepted sample"),
    ("accuracy_per_modality", "accuracy per modality per checkpoint"),
)


def model_dirs(workdir: Path) -> dict[str, Path]:
    models = Path(workdir) / "models"
    return {
        "base": models / "base",
        "student": models / "student",
        "teacher": models / "teacher",
    }


def prepare_models(
    workdir: Path,
    curated_dir: Path,
    *,
    in_domain: str,
    seed: int = 0,
    student_steps: int = 300,
    teacher_steps: int = 300,
    thinking: bool = True,
    torch_threads: int | None = 1,
) -> dict[str, Any]:
    """Build (if absent) and warm up (if not done) the tiny student and teacher in `workdir`."""
    dirs = model_dirs(workdir)
    marker = dirs["base"].parent / "warmup.json"
    wanted = {
        "seed": seed,
        "student_steps": student_steps,
        "teacher_steps": teacher_steps,
        "in_domain": in_domain,
        "thinking": thinking,
        "curated_dir": str(curated_dir),
        # the data itself, so models warmed up on an older build of the folder are not reused
        "curated_pool_sha256": QuestionSet(curated_dir).manifest["outputs"]["pool.parquet"],
    }
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("settings") == wanted and dirs["student"].is_dir() and dirs["teacher"].is_dir():
            log.info("warmed-up models in %s are current; reusing them", dirs["student"].parent)
            return done
    questions = QuestionSet(curated_dir)
    corpus = corpus_from_parquet([curated_dir / "pool.parquet", curated_dir / "test.parquet"])
    base_student, base_teacher = build_tiny_pair(dirs["base"], seed=seed, corpus_texts=corpus)
    student, teacher = warm_up_pair(
        questions,
        base_student,
        base_teacher,
        dirs["student"],
        dirs["teacher"],
        in_domain=in_domain,
        thinking=thinking,
        student_settings=WarmupSettings(
            steps=student_steps, seed=seed, torch_threads=torch_threads
        ),
        teacher_settings=WarmupSettings(
            steps=teacher_steps, seed=seed, torch_threads=torch_threads
        ),
    )
    result = {
        "settings": wanted,
        "student": {k: v for k, v in asdict(student).items() if k != "losses"}
        | {"model_dir": str(student.model_dir)},
        "teacher": {k: v for k, v in asdict(teacher).items() if k != "losses"}
        | {"model_dir": str(teacher.model_dir)},
    }
    marker.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result
