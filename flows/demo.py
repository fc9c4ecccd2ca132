"""The `kepo-demo` flow: the main job on the embedded default (tiny models, bundled data, CPU).

curate MiniMedVQA -> build + warm up the tiny student and teacher -> a KEPO run and a GRPO run
(each the `kepo-run` flow: rollout -> train -> evaluate per iteration) -> the HTML report.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.iteration import kepo_run
from flows.tasks import curate_data_task, report_task
from kepo.config import load_config
from kepo.demo import DEMO_CONFIGS, model_dirs, prepare_models


def demo_overrides(workdir: Path, iterations: int | None) -> dict:
    dirs = model_dirs(workdir)
    overrides = {
        "workdir": str(workdir),
        "data.out_dir": str(workdir / "data"),
        "models.student": str(dirs["student"]),
        "models.teacher": str(dirs["teacher"]),
    }
    if iterations is not None:
        overrides["iterations"] = iterations
    return overrides


@task(name="prepare-tiny-models")
def models_task(
    workdir: str, curated_dir: str, in_domain: str, student_steps: int, teacher_steps: int
) -> dict:
    return prepare_models(
        Path(workdir),
        Path(curated_dir),
        in_domain=in_domain,
        student_steps=student_steps,
        teacher_steps=teacher_steps,
    )


@flow(name="kepo-demo", log_prints=True)
def kepo_demo(
    workdir: str = "work/demo",
    iterations: int | None = None,
    student_warmup_steps: int = 300,
    teacher_warmup_steps: int = 300,
    configs: list[str] | None = None,
) -> dict:
    """Run the whole demo in `workdir`; returns the paths of the database and the report."""
    logger = get_run_logger()
    root = Path(workdir)
    configs = list(configs or DEMO_CONFIGS)
    overrides = demo_overrides(root, iterations)
    first = load_config(configs[0], overrides=overrides)
    curated = curate_data_task(configs[0], overrides)
    models_task(
        str(root), curated, first.in_domain_modality, student_warmup_steps, teacher_warmup_steps
    )
    for config in configs:
        logger.info("run %s", config)
        kepo_run(config, iterations=iterations, overrides=overrides)
    db = root / "kepo.duckdb"
    report = report_task(str(db), str(root / "report.html"))
    return {"db": str(db), "report": report}
