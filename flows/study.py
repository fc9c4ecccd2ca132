"""The `kepo-study` flow: the learning-cliff study from one study config (`kepo study`).

curate the bundled data with the study's in-domain difficulty -> build + warm up the tiny pair
once -> the teacher's reference evaluation -> a `kepo-run` per (method, seed), one after the other
in one DuckDB file -> the HTML report with the study page. Every step is resumable: a rerun
reuses the curated data and the warmed-up models and skips succeeded stages.
"""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import flow, get_run_logger, task

from flows.iteration import kepo_run
from flows.tasks import curate_data_task, report_task
from kepo.config import load_config
from kepo.study import load_study, plan_runs, share_initial_evaluation, teacher_run


@task(name="prepare-study-models")
def models_task(study_path: str, workdir: str | None, curated_dir: str) -> dict:
    from kepo.demo import prepare_models

    study = load_study(study_path, workdir=workdir)
    w = study.warmup
    return prepare_models(
        study.workdir,
        Path(curated_dir),
        in_domain=study.in_domain,
        seed=w.seed,
        student_steps=w.student_steps,
        teacher_steps=w.teacher_steps,
    )


@task(name="share-initial-evaluation")
def share_task(db: str, source_run: str, target_run: str) -> int:
    from kepo.store import Store

    store = Store(db)
    if store.stage_status(target_run, 0, "evaluate") == "succeeded":
        return 0
    return share_initial_evaluation(store, source_run, target_run)


@task(name="register-run")
def register_task(config: str, overrides: dict) -> str:
    from kepo.run import Run

    return Run.create(load_config(config, overrides=overrides)).run_id


@flow(name="kepo-study", log_prints=True)
def kepo_study(config: str, workdir: str | None = None) -> dict:
    """Run the whole study of `config` (workdir from the config unless given)."""
    logger = get_run_logger()
    study = load_study(config, workdir=workdir)
    torch.set_num_threads(study.torch_threads)
    plan = plan_runs(study)
    curated = curate_data_task(plan[0].config_path, plan[0].overrides)
    models_task(config, workdir, curated)
    if study.evaluate_teacher:
        reference = teacher_run(study)
        logger.info("reference run %s", reference.run_id)
        kepo_run(reference.config_path, overrides=reference.overrides)
    db = str(study.db_path)
    for i, planned in enumerate(plan):
        logger.info("run %d/%d: %s", i + 1, len(plan), planned.run_id)
        if study.share_initial_eval and i > 0:
            # Registered first, so the copy finds the run's config in the store.
            register_task(planned.config_path, planned.overrides)
            share_task(db, plan[0].run_id, planned.run_id)
        kepo_run(planned.config_path, overrides=planned.overrides)
    report = report_task(db, str(study.report_path))
    return {"db": db, "report": report, "runs": [p.run_id for p in plan]}
