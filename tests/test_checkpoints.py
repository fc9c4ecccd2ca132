"""Checkpoints on disk: weights saved in the training dtype (float32 master weights kept for the
resume), optimizer state only for the newest version, train.keep_checkpoints pruning with the
versions a run still needs kept, the bytes each version takes in `kepo sql`, and a run that
resumes after a kill with pruning on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch
from safetensors import safe_open
from test_flows import REPO, write_config
from train_fixtures import CONFIGS, load_params, make_run, tiny_config, write_rollout_iteration
from typer.testing import CliRunner

from kepo.checkpoints import prune_checkpoints, versions_to_keep
from kepo.cli import app
from kepo.config import load_config
from kepo.pipeline import PlannedStage, execute, is_done, missing_outputs
from kepo.queries import named_query
from kepo.run import CheckpointPruned, Run, folder_bytes
from kepo.store import Store
from kepo.train import checkpoint_dtype, loses_precision, train_iteration


def safetensors_dtypes(folder: Path) -> set[torch.dtype]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {f.get_tensor(name).dtype for name in f.keys()}  # noqa: SIM118


def checkpoint_rows(run: Run) -> dict[int, dict]:
    rows = run.store.read("checkpoints", {"run_id": run.run_id}).to_pylist()
    return {r["iteration"]: r for r in rows}


# ------------------------------------------------------------------------------ settings


def test_save_dtype_auto_is_the_training_dtype_and_the_cpu_configs_stay_float32() -> None:
    def resolved(**overrides) -> str:
        return checkpoint_dtype(load_config(CONFIGS / "tiny" / "grpo-thinking.yaml", overrides))

    assert resolved() == "float32"  # the tiny CPU scale: float32, no mixed precision
    assert resolved(**{"train.mixed_precision": "bf16"}) == "bfloat16"
    assert resolved(**{"train.mixed_precision": "fp16"}) == "float16"
    assert resolved(**{"models.dtype": "bfloat16"}) == "bfloat16"  # trained in bf16
    assert resolved(**{"train.save_dtype": "float32", "train.mixed_precision": "bf16"}) == "float32"
    # the demo and the study (base_config: demo/_common.yaml) save float32, so their numbers do
    # not move; the GPU configs bf16
    demo = sorted((CONFIGS / "demo").glob("*.yaml"))
    assert [p.stem for p in demo] == ["_common", "grpo", "kepo"]
    for path in demo:
        assert checkpoint_dtype(load_config(path)) == "float32", path
    assert checkpoint_dtype(load_config(CONFIGS / "methods" / "kepo-tau1.yaml")) == "bfloat16"

    assert loses_precision(torch.float32, torch.bfloat16)
    assert loses_precision(torch.bfloat16, torch.float16)  # smaller range
    assert loses_precision(torch.float16, torch.bfloat16)  # coarser steps
    assert not loses_precision(torch.bfloat16, torch.float32)


def test_keep_settings_are_validated() -> None:
    from kepo.config import ConfigError

    path = CONFIGS / "tiny" / "grpo-thinking.yaml"
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        load_config(path, {"train.keep_checkpoints": 0})
    with pytest.raises(ConfigError, match=r"keep_versions.*\[0\]"):
        load_config(path, {"train.keep_versions": [0, 2]})
    assert load_config(path, {"train.keep_versions": [3, 2, 3]}).train.keep_versions == [2, 3]


def test_keep_settings_can_change_on_a_registered_run_but_save_dtype_cannot() -> None:
    from kepo.run import changed_settings, invalidated_stages

    path = CONFIGS / "tiny" / "grpo-thinking.yaml"
    base = load_config(path)
    keep = load_config(path, {"train.keep_checkpoints": 2, "train.keep_versions": [1]})
    assert changed_settings(base, keep) == {}  # they change no stored row
    dtype = load_config(path, {"train.save_dtype": "bfloat16"})  # the weights change
    assert invalidated_stages(changed_settings(base, dtype)) == ("rollout", "train", "evaluate")


def test_versions_to_keep_by_hand() -> None:
    versions = [1, 2, 3, 4, 5]
    assert versions_to_keep(versions, keep_checkpoints=None) == {1, 2, 3, 4, 5}
    assert versions_to_keep(versions, keep_checkpoints=1) == {5}
    assert versions_to_keep(versions, keep_checkpoints=2) == {4, 5}
    assert versions_to_keep(versions, keep_checkpoints=1, keep_versions=[2, 9]) == {2, 5}
    assert versions_to_keep(versions, keep_checkpoints=1, needed=[3]) == {3, 5}
    assert versions_to_keep([], keep_checkpoints=1) == set()


# ------------------------------------------------------------------------------ dtype


def test_bf16_checkpoint_holds_bf16_tensors_reloads_and_resumes_from_fp32_master_weights(
    tmp_path: Path, tiny_models
) -> None:
    from kepo.models import load_policy

    half = make_run(
        tiny_config(
            "grpo-thinking", tmp_path / "bf16", tiny_models, **{"train.save_dtype": "bfloat16"}
        )
    )
    full = make_run(tiny_config("grpo-thinking", tmp_path / "fp32", tiny_models))
    for run in (half, full):
        write_rollout_iteration(run, 0)  # both from version 0: identical rows
        train_iteration(run, 0)

    folder = half.policy_path(1)
    assert safetensors_dtypes(folder) == {torch.bfloat16}
    assert safetensors_dtypes(full.policy_path(1)) == {torch.float32}  # the default: unchanged
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    size_half = (folder / "model.safetensors").stat().st_size
    size_full = (full.policy_path(1) / "model.safetensors").stat().st_size
    assert 0.45 < size_half / size_full < 0.55
    model, _ = load_policy(folder)  # reloads, cast to float32 for training
    assert next(model.parameters()).dtype == torch.float32

    # optimizer.pt keeps the float32 weights training ended with; the folder holds them rounded
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    master = state["master_weights"]
    assert "master_weights" not in torch.load(full.policy_path(1) / "optimizer.pt")
    saved, exact = load_params(folder), load_params(full.policy_path(1))
    for name, value in saved.items():
        assert master[name].dtype == torch.float32
        assert torch.equal(master[name], exact[name])  # same run in float32
        assert torch.equal(master[name].to(torch.bfloat16), value)
    rounding = max((exact[n] - saved[n].float()).abs().max().item() for n in saved)
    assert rounding > 1e-4  # bf16 really rounds these weights

    row, row_full = checkpoint_rows(half)[1], checkpoint_rows(full)[1]
    assert row["weights_dtype"] == "bfloat16" and row_full["weights_dtype"] == "float32"
    assert row["bytes_on_disk"] == folder_bytes(folder)
    assert row["optimizer_bytes"] == (folder / "optimizer.pt").stat().st_size

    # Iteration 1 on the same rows: the bf16-saved run resumes from the master weights and
    # AdamW state, so it ends exactly where the float32-saved run ends.
    rows = write_rollout_iteration(full, 1)
    half.store.write_partitions(
        {t: [dict(r, run_id=half.run_id) for r in rows[t]] for t in rows},
        run_id=half.run_id,
        iteration=1,
    )
    train_iteration(half, 1)
    train_iteration(full, 1)
    end_half = torch.load(half.policy_path(2) / "optimizer.pt")["master_weights"]
    end_full = load_params(full.policy_path(2))
    worst = max((end_half[n] - end_full[n]).abs().max().item() for n in end_full)
    assert worst < 1e-6, worst  # resuming from the bf16 folder would be off by ~`rounding`


def test_without_optimizer_state_a_bf16_checkpoint_resumes_from_its_saved_weights(
    tmp_path: Path, tiny_models, caplog
) -> None:
    run = make_run(
        tiny_config(
            "grpo-thinking",
            tmp_path,
            tiny_models,
            **{"train.save_dtype": "bfloat16", "train.save_optimizer": False},
        )
    )
    write_rollout_iteration(run, 0)
    train_iteration(run, 0)
    assert not (run.policy_path(1) / "optimizer.pt").exists()
    assert safetensors_dtypes(run.policy_path(1)) == {torch.bfloat16}
    write_rollout_iteration(run, 1)
    assert train_iteration(run, 1).n_steps == 1


# ------------------------------------------------------------------------------ pruning


def test_only_the_newest_version_keeps_optimizer_state_and_keep_checkpoints_prunes(
    tmp_path: Path, tiny_models
) -> None:
    """Three iterations through the stage runner (kepo train's path), evaluating only the last
    version (eval.every 100), with keep_checkpoints 1 and version 1 listed in keep_versions."""
    run = make_run(
        tiny_config(
            "grpo-thinking",
            tmp_path,
            tiny_models,
            iterations=3,
            **{
                "eval.every": 100,
                "train.keep_checkpoints": 1,
                "train.keep_versions": [1],
                "train.save_dtype": "bfloat16",
            },
        )
    )
    write_rollout_iteration(run, 0)
    execute(run, PlannedStage(0, "train"))
    write_rollout_iteration(run, 1)
    execute(run, PlannedStage(1, "train"))

    rows = checkpoint_rows(run)
    # version 1's optimizer state went when version 2 was recorded; its folder stays (kept)
    assert rows[1]["optimizer_path"] is None and rows[1]["pruned_at"] is None
    assert not (run.policy_path(1) / "optimizer.pt").exists()
    assert rows[1]["bytes_on_disk"] == folder_bytes(run.policy_path(1)) > 0
    assert rows[2]["optimizer_path"] is not None
    assert (run.policy_path(2) / "optimizer.pt").is_file()

    # iteration 2 resumes from version 2, the newest: its optimizer state is still there
    write_rollout_iteration(run, 2)
    result = execute(run, PlannedStage(2, "train"))
    state = torch.load(result.optimizer_path, weights_only=True)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {3.0}

    rows = checkpoint_rows(run)
    v2 = rows[2]
    assert v2["pruned_at"] is not None and v2["bytes_on_disk"] == 0
    assert v2["optimizer_path"] is None and v2["path"]  # the row stays for audits
    assert not run.resolve(v2["path"]).exists()
    assert rows[1]["pruned_at"] is None and run.policy_path(1).is_dir()  # keep_versions
    assert rows[3]["pruned_at"] is None and (run.policy_path(3) / "optimizer.pt").is_file()
    # version 3 is still to be evaluated, and it is the newest: kept whatever N is
    assert sorted(p.name for p in run.checkpoint_dir(1).parent.iterdir()) == [
        "policy-0001",
        "policy-0003",
    ]
    # a pruned version's training stage still counts as done on resume
    assert missing_outputs(run, 1, "train") is None and is_done(run, 1, "train")

    with pytest.raises(
        CheckpointPruned, match=r"policy version 2 was pruned.*keep_versions: \[2\]"
    ):
        run.policy_path(2)
    result = CliRunner().invoke(
        app, ["eval", "--db", str(run.store.path), "--run", run.run_id, "--checkpoint", "2"]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    message = " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert "policy version 2 was pruned by train.keep_checkpoints" in message
    assert "kept versions: [1, 3]" in message

    # the disk-use query over these real checkpoints, through the CLI
    out = CliRunner().invoke(
        app, ["sql", "--db", str(run.store.path), "--query", "checkpoint_disk", "--json"]
    )
    assert out.exit_code == 0, out.output
    listed = [json.loads(line) for line in out.stdout.splitlines()]
    by_version = {r["version"]: r for r in listed}
    assert [r["version"] for r in listed] == [1, 2, 3, None]
    for v in (1, 3):
        assert by_version[v]["bytes_on_disk"] == folder_bytes(run.policy_path(v))
        assert by_version[v]["weights_dtype"] == "bfloat16" and not by_version[v]["pruned"]
    assert [by_version[v]["has_optimizer"] for v in (1, 2, 3)] == [False, False, True]
    assert by_version[2]["pruned"] and by_version[2]["bytes_on_disk"] == 0
    assert by_version[3]["optimizer_bytes"] == (run.policy_path(3) / "optimizer.pt").stat().st_size
    total = by_version[None]
    assert total["path"] == "run total"
    assert total["bytes_on_disk"] == folder_bytes(run.checkpoint_dir(1).parent)


def test_a_version_still_to_be_evaluated_is_not_pruned(tmp_path: Path, tiny_models) -> None:
    run = make_run(
        tiny_config(
            "grpo-thinking",
            tmp_path,
            tiny_models,
            iterations=2,
            **{"eval.every": 1, "train.keep_checkpoints": 1},
        )
    )
    write_rollout_iteration(run, 0)
    execute(run, PlannedStage(0, "train"))
    write_rollout_iteration(run, 1)
    execute(run, PlannedStage(1, "train"))  # version 1 was never evaluated: it stays
    rows = checkpoint_rows(run)
    assert rows[1]["pruned_at"] is None and run.policy_path(1).is_dir()
    assert rows[1]["optimizer_path"] is None  # its optimizer state is not needed by anyone
    execute(run, PlannedStage(1, "evaluate"))  # once evaluated, it is pruned
    assert checkpoint_rows(run)[1]["pruned_at"] is not None
    assert not run.checkpoint_dir(1).exists()
    assert is_done(run, 1, "evaluate")  # its evaluation is still trusted


def test_prune_leaves_folders_outside_the_run_and_finishes_an_interrupted_prune(
    tmp_path: Path, tiny_models
) -> None:
    run = make_run(
        tiny_config(
            "grpo-thinking",
            tmp_path,
            tiny_models,
            iterations=3,
            **{"eval.every": 100, "train.keep_checkpoints": 1},
        )
    )
    write_rollout_iteration(run, 0)
    train_iteration(run, 0)
    write_rollout_iteration(run, 1)
    train_iteration(run, 1)
    # a row pointing outside the workdir (a folder the run does not own) is never deleted
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    row = checkpoint_rows(run)[1]
    run.store.overwrite_partition(
        "checkpoints", [dict(row, path=str(outside), optimizer_path=None)], run.run_id, iteration=1
    )
    # a kill after the rows were marked but before the files went: a pruned row, files left
    # (simulated by marking version 2 pruned by hand and keeping its folder)
    leftover = run.policy_path(2)
    write_rollout_iteration(run, 2)
    train_iteration(run, 2)
    row2 = checkpoint_rows(run)[2]
    run.store.overwrite_partition(
        "checkpoints",
        [dict(row2, pruned_at=row2["created_at"], bytes_on_disk=0)],
        run.run_id,
        iteration=2,
    )
    result = prune_checkpoints(run)
    assert result.pruned == [] and outside.is_dir() and (outside / "config.json").is_file()
    assert not leftover.exists()  # finished
    assert (run.policy_path(3) / "optimizer.pt").is_file()


def test_an_old_database_gets_the_new_checkpoint_columns(tmp_path: Path) -> None:
    db = tmp_path / "kepo.duckdb"
    con = duckdb.connect(str(db))
    con.execute(
        "CREATE TABLE checkpoints (run_id VARCHAR NOT NULL, iteration INTEGER NOT NULL, "
        "path VARCHAR NOT NULL, optimizer_path VARCHAR, created_at TIMESTAMP NOT NULL, "
        "n_params BIGINT NOT NULL, PRIMARY KEY (run_id, iteration))"
    )
    con.execute(
        "INSERT INTO checkpoints VALUES ('old', 1, 'checkpoints/old/policy-0001', NULL, now(), 5)"
    )
    con.close()
    store = Store(db)
    store.initialize()
    (row,) = store.read("checkpoints").to_pylist()
    assert row["pruned_at"] is None and row["bytes_on_disk"] is None
    assert row["weights_dtype"] is None and row["optimizer_bytes"] is None
    listed = store.query(named_query("checkpoint_disk")).to_pylist()
    assert [(r["version"], r["pruned"], r["bytes_on_disk"]) for r in listed] == [
        (1, False, None),
        (None, None, None),
    ]


# ------------------------------------------------------------------------------ resume

_PLAN_SCRIPT = """
import os, signal, sys
import torch
from kepo.config import load_config
from kepo.pipeline import execute, is_done, run_plan
from kepo.run import Run

torch.set_num_threads(1)
kill_after = int(sys.argv[2]) if len(sys.argv) > 2 else None
if kill_after is not None:
    record = Run.record_checkpoint

    def record_then_die(self, version, *args, **kwargs):
        record(self, version, *args, **kwargs)
        if version == kill_after:  # recorded, but the stage never reaches `succeeded`
            os.kill(os.getpid(), signal.SIGKILL)

    Run.record_checkpoint = record_then_die
run = Run.create(load_config(sys.argv[1]))
for planned in run_plan(run):
    if not is_done(run, planned.iteration, planned.stage):
        execute(run, planned)
"""


def _run_plan(config: Path, kill_after: int | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-c", _PLAN_SCRIPT, str(config)]
    if kill_after is not None:
        args.append(str(kill_after))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_pruning_run_resumes_after_a_kill_and_ends_like_an_uninterrupted_run(
    tmp_path: Path, tiny_models, curated_bundled
) -> None:
    settings = {
        "iterations": 3,
        "train.keep_checkpoints": 1,
        "train.save_dtype": "bfloat16",
        "algorithm.name": "grpo",
        "rollout.exploration.enabled": False,
    }
    killed = write_config(tmp_path / "killed", curated_bundled, tiny_models, **settings)
    whole = write_config(tmp_path / "whole", curated_bundled, tiny_models, **settings)

    first = _run_plan(killed, kill_after=2)  # dies in iteration 1's training stage
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    run = Run.open(tmp_path / "killed" / "work" / "kepo.duckdb", "flow-run")
    assert run.store.stage_status("flow-run", 1, "train") == "running"
    assert checkpoint_rows(run)[1]["optimizer_path"] is not None  # not pruned before success

    second = _run_plan(killed)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _run_plan(whole).returncode == 0

    stages = {(r["iteration"], r["stage"]): r for r in run.store.read("stages").to_pylist()}
    assert all(r["status"] == "succeeded" for r in stages.values())
    assert stages[(1, "train")]["attempt"] == 2
    evaluated = run.store.query(
        "SELECT DISTINCT iteration FROM eval_metrics WHERE run_id = 'flow-run' ORDER BY 1"
    ).column("iteration")
    assert evaluated.to_pylist() == [0, 1, 2, 3]  # every evaluation the plan needs ran
    rows = checkpoint_rows(run)
    assert [rows[v]["pruned_at"] is not None for v in (1, 2, 3)] == [True, True, False]
    assert [rows[v]["optimizer_path"] is not None for v in (1, 2, 3)] == [False, False, True]
    assert sorted(p.name for p in run.checkpoint_dir(3).parent.iterdir()) == ["policy-0003"]

    other = Run.open(tmp_path / "whole" / "work" / "kepo.duckdb", "flow-run")
    assert load_params(run.policy_path(3)).keys() == load_params(other.policy_path(3)).keys()
    for name, value in load_params(other.policy_path(3)).items():
        assert torch.equal(load_params(run.policy_path(3))[name], value), name
    accuracy = "SELECT iteration, modality, accuracy FROM eval_metrics ORDER BY ALL"
    assert run.store.query(accuracy).to_pylist() == other.store.query(accuracy).to_pylist()
    assert all(is_done(run, p.iteration, p.stage) for p in map(_planned, stages))


def _planned(key: tuple[int, str]) -> PlannedStage:
    return PlannedStage(*key)
