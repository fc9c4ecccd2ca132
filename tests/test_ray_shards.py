"""Rollout shards as Ray tasks through Prefect (`rollout.task_runner: ray`, flows/runners.py).

The flow tests run the real rollout on the tiny models on a local Ray cluster (2 CPUs, no
dashboard) started once for the module; prefect-ray's task runner finds it initialised and uses
it. They compare the rows with the unsharded in-process rollout of the same seeds, and kill or
fail one shard on its first attempt to show that it is rerun and that nothing is duplicated.
"""

from __future__ import annotations

import logging
import time

import pytest
from test_flows import assert_no_duplicates, stage_rows, write_config
from train_fixtures import load_params

from kepo.config import ConfigError, RolloutConfig, load_config
from kepo.run import Run
from kepo.store import Store

COLUMNS = (
    "prompt_id, sample_idx, slot, source, trained, completion_ids, sampled_logprobs, "
    "old_logprobs, reward_total, advantage, gate_open"
)
FLOAT_COLUMNS = ("sampled_logprobs", "old_logprobs", "advantage")


def test_inprocess_is_the_default_and_uses_threads() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.runners import task_runner_for

    config = RolloutConfig(shards=3)
    assert config.task_runner == "inprocess"
    runner = task_runner_for(config)
    assert isinstance(runner, ThreadPoolTaskRunner)
    assert runner._max_workers == 3


def test_unknown_shard_resource_is_one_line_error(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  task_runner: ray\n  shard_resources: {gpus: 1}\n")
    with pytest.raises(ConfigError, match=r"rollout.shard_resources.*num_gpus"):
        load_config(path)


def test_ray_runner_settings_without_starting_ray() -> None:
    pytest.importorskip("prefect_ray", reason="the 'ray' extra (prefect-ray) is not installed")
    from prefect_ray.task_runners import RayTaskRunner

    from flows.runners import ray_remote_options, task_runner_for

    local = task_runner_for(RolloutConfig(task_runner="ray", shards=2))
    assert isinstance(local, RayTaskRunner)
    assert local.address is None and local.init_kwargs["include_dashboard"] is False
    remote = task_runner_for(RolloutConfig(task_runner="ray", ray_address="ray://head:10001"))
    assert remote.address == "ray://head:10001" and "include_dashboard" not in remote.init_kwargs

    config = RolloutConfig(
        task_runner="ray", shard_resources={"num_gpus": 1, "num_cpus": 2}, shard_retries=3
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4299/api"}):
        options = ray_remote_options(config)
    assert options["num_gpus"] == 1 and options["num_cpus"] == 2 and options["max_retries"] == 3
    env = options["runtime_env"]["env_vars"]
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4299/api"
    import kepo

    assert str(__import__("pathlib").Path(kepo.__file__).parents[1]) in env["PYTHONPATH"]


# ----------------------------------------------------------------------------- on a Ray cluster
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the 'ray' extra (prefect-ray) is not installed")
    pytest.importorskip("prefect_ray", reason="the 'ray' extra (prefect-ray) is not installed")
    ray.init(num_cpus=2, include_dashboard=False, namespace="prefect", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def unsharded_rows(tmp_path_factory, tiny_models, curated_bundled, prefect_harness):
    """Rollout rows of iteration 0, unsharded and in-process (the reference)."""
    from flows.iteration import kepo_iteration

    tmp = tmp_path_factory.mktemp("unsharded")
    config = write_config(tmp, curated_bundled, tiny_models, **{"eval.every": 5})
    run = Run.create(load_config(config))
    state = kepo_iteration(run.run_id, 0, workdir=str(run.workdir), return_state=True)
    assert state.is_completed(), state
    evaluate_version_0(run)
    return {"rollouts": rollout_rows(run), **eval_rows(run)}


def evaluate_version_0(run: Run) -> None:
    from flows.iteration import run_planned
    from kepo.pipeline import PlannedStage

    run_planned(str(run.store.path), run, PlannedStage(0, "evaluate"))


def eval_rows(run: Run) -> dict[str, list[dict]]:
    return {
        table: run.store.query(
            f"SELECT * EXCLUDE (run_id) FROM {table} WHERE iteration = 0 ORDER BY ALL"
        ).to_pylist()
        for table in ("eval_predictions", "eval_metrics")
    }


def rollout_rows(run: Run) -> list[dict]:
    return run.store.query(
        f"SELECT {COLUMNS} FROM rollouts ORDER BY prompt_id, sample_idx"
    ).to_pylist()


def assert_same_rows(expected: list[dict], got: list[dict]) -> None:
    assert expected and len(expected) == len(got)
    for a, b in zip(expected, got, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key in FLOAT_COLUMNS and a[key] is not None:
                assert b[key] == pytest.approx(a[key], abs=1e-5), key
            else:
                assert a[key] == b[key], key


def run_on_ray(tmp_path, tiny_models, curated_bundled, monkeypatch, fail: str) -> Run:
    from flows.iteration import kepo_iteration

    monkeypatch.setenv("KEPO_FAIL_SHARD_ONCE", fail)
    config = write_config(
        tmp_path,
        curated_bundled,
        tiny_models,
        **{
            "eval.every": 5,
            "rollout.shards": 2,
            "rollout.task_runner": "ray",
            "rollout.shard_resources": {"num_cpus": 1},
            "rollout.shard_retries": 1,
            "eval.shards": 2,
        },
    )
    run = Run.create(load_config(config))
    state = kepo_iteration(run.run_id, 0, workdir=str(run.workdir), return_state=True)
    assert state.is_completed(), state
    return run


def shard_folder(run: Run, index: int):
    return run.workdir / "shards" / run.run_id / "iteration-0000" / f"shard-{index:03d}"


@pytest.mark.slow
def test_ray_shards_equal_unsharded_and_a_failed_shard_is_retried(
    tmp_path, tiny_models, curated_bundled, prefect_harness, local_ray, unsharded_rows, monkeypatch
) -> None:
    run = run_on_ray(tmp_path, tiny_models, curated_bundled, monkeypatch, fail="1:raise")
    # Shard 1 raised on its first attempt (the marker) and its rerun's rows were committed.
    assert (shard_folder(run, 1).parent / "shard-001.failed-once").read_text() == "raise"
    assert_same_rows(unsharded_rows["rollouts"], rollout_rows(run))
    # Evaluation in 2 shards on Ray (modalities dealt round-robin) equals the unsharded one.
    evaluate_version_0(run)
    sharded = eval_rows(run)
    assert len(unsharded_rows["eval_metrics"]) > 1
    for table in ("eval_predictions", "eval_metrics"):
        assert sharded[table] == unsharded_rows[table], table
    assert stage_rows(run.store)[(0, "evaluate")]["status"] == "succeeded"
    assert_no_duplicates(run.store)
    assert stage_rows(run.store)[(0, "rollout")]["status"] == "succeeded"
    manifests = sorted(p.parent.name for p in run.workdir.rglob("manifest.json"))
    assert manifests == ["shard-000", "shard-001"]


@pytest.mark.slow
def test_a_shard_whose_ray_worker_dies_is_rerun(
    tmp_path, tiny_models, curated_bundled, prefect_harness, local_ray, unsharded_rows, monkeypatch
) -> None:
    # os._exit in the shard task: had it run in this process, the test process would be gone.
    run = run_on_ray(tmp_path, tiny_models, curated_bundled, monkeypatch, fail="0:exit")
    assert (shard_folder(run, 0).parent / "shard-000.failed-once").read_text() == "exit"
    assert_same_rows(unsharded_rows["rollouts"], rollout_rows(run))
    assert_no_duplicates(run.store)


def test_evaluation_shards_need_ray(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("eval:\n  shards: 2\n")
    with pytest.raises(ConfigError, match=r"eval\.shards=2 needs rollout\.task_runner: ray"):
        load_config(path)


# tau = 0 opens the quality gate of every row (rewards are >= 0), so each iteration's step has a
# distillation gradient: the tiny run's rewards alone are all 0 (no policy gradient).
TRAINS = {"algorithm.distill.gate.tau": 0.0}
RAY_SHARDS = {
    "rollout.task_runner": "ray",
    "rollout.shards": 2,
    "rollout.shard_resources": {"num_cpus": 1},
    "eval.shards": 2,
}


def kepo_run_tables(folder, curated_bundled, tiny_models, **overrides) -> dict:
    """`kepo_run` of the two-iteration tiny config; its evaluation tables, store and wall time."""
    from flows.iteration import kepo_run

    config = write_config(folder, curated_bundled, tiny_models, **overrides)
    start = time.perf_counter()
    store = Store(kepo_run(str(config)))
    wall_s = time.perf_counter() - start
    assert_no_duplicates(store)
    tables = {
        table: store.query(f"SELECT * EXCLUDE (run_id) FROM {table} ORDER BY ALL").to_pylist()
        for table in ("eval_metrics", "eval_predictions")
    }
    return {"tables": tables, "store": store, "wall_s": wall_s}


@pytest.fixture(scope="module")
def inprocess_run(tmp_path_factory, tiny_models, curated_bundled, prefect_harness):
    """The reference: the same run with every stage in the flow's process."""
    return kepo_run_tables(
        tmp_path_factory.mktemp("inprocess-run"), curated_bundled, tiny_models, **TRAINS
    )


@pytest.mark.slow
def test_kepo_run_on_ray_equals_the_inprocess_run(
    tmp_path, tiny_models, curated_bundled, prefect_harness, local_ray, inprocess_run
) -> None:
    """Two iterations through `kepo_run`: rollout and evaluation in 2 Ray shards each give the
    Table 1 rows (eval_metrics) and predictions of the unsharded in-process run."""
    tables = {"inprocess": inprocess_run["tables"]}
    ray = kepo_run_tables(tmp_path, curated_bundled, tiny_models, **TRAINS, **RAY_SHARDS)
    tables["ray"] = ray["tables"]
    assert {r["iteration"] for r in tables["ray"]["eval_metrics"]} == {0, 1, 2}
    assert tables["ray"] == tables["inprocess"]


@pytest.mark.slow
def test_kepo_run_on_ray_with_launched_training_equals_the_inprocess_run(
    tmp_path, tiny_models, curated_bundled, prefect_harness, local_ray, inprocess_run
) -> None:
    """Two iterations through `kepo_run` with rollout and evaluation in 2 Ray shards AND training
    launched as 2 processes (`train.launcher: accelerate`, gloo): the same Table 1 rows.

    Tolerances: eval_metrics and the predicted texts exactly equal; the policies' parameters
    within 1e-5 absolute and each step's loss within 1e-5 relative (two processes add the
    loss in another order, so the weights, and their fingerprint, differ in the last bits).
    One optimizer step per iteration either way: 8 rows, micro_batch 4 x grad_accum 2 on one
    process, 4 x 2 x 2 = 16 rows per step on two."""
    launched = kepo_run_tables(
        tmp_path,
        curated_bundled,
        tiny_models,
        **TRAINS,
        **RAY_SHARDS,
        **{"train.launcher": "accelerate", "train.num_processes": 2},
    )
    logging.getLogger(__name__).warning(
        "wall time of the two-iteration kepo run: in-process %.1f s, Ray shards + 2 launched "
        "training processes %.1f s",
        inprocess_run["wall_s"],
        launched["wall_s"],
    )
    expected, got = inprocess_run["tables"], launched["tables"]
    assert {r["iteration"] for r in got["eval_metrics"]} == {0, 1, 2}
    assert got["eval_metrics"] == expected["eval_metrics"]

    def predictions(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "model_sha256"} for r in rows]

    assert predictions(got["eval_predictions"]) == predictions(expected["eval_predictions"])

    store, reference = launched["store"], inprocess_run["store"]
    stages = store.query(
        "SELECT iteration, status, lease_owner FROM stages WHERE stage = 'train' ORDER BY 1"
    ).to_pylist()
    assert stages == [{"iteration": k, "status": "succeeded", "lease_owner": None} for k in (0, 1)]
    steps_query = "SELECT iteration, step, loss_total, grad_norm FROM train_steps ORDER BY 1, 2"
    steps, reference_steps = (
        store.query(steps_query).to_pylist(),
        reference.query(steps_query).to_pylist(),
    )
    assert len(steps) == len(reference_steps) == 2
    for a, b in zip(steps, reference_steps, strict=True):
        assert b["grad_norm"] > 0  # a real update, so the parameters below can differ
        assert a["loss_total"] == pytest.approx(b["loss_total"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5, abs=1e-7)
    params = load_params(Run.open(store.path, "flow-run").policy_path(2))
    reference_params = load_params(Run.open(reference.path, "flow-run").policy_path(2))
    initial = load_params(tiny_models[0])
    assert max((reference_params[k] - initial[k]).abs().max().item() for k in initial) > 1e-4
    assert max((params[k] - reference_params[k]).abs().max().item() for k in params) < 1e-5
