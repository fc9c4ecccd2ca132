"""Smoke tests of the benchmark scripts: each runs at a minimal size in a subprocess (as a user
runs it) and its one JSON line must carry figures that make sense. The figures themselves are
not asserted: timings belong in the scripts' output, not in tests."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HAS_TRL = importlib.util.find_spec("trl") is not None
needs_trl = pytest.mark.skipif(
    not HAS_TRL, reason="needs the `bench` extra (pip install -e .[bench])"
)


def run_script(name: str, *args: str, timeout: int = 300) -> tuple[dict, str]:
    """Run benchmarks/<name>.py; returns its JSON payload (prefix = name) and its stdout."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(f"{name} {{")]
    assert len(lines) == 1, f"expected one `{name} {{...}}` line:\n{proc.stdout[-2000:]}"
    return json.loads(lines[0][len(name) + 1 :]), proc.stdout


def test_common_helpers_alternate_and_parse() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from _common import alternate, parse_json_line, peak_rss_mb, reset_peak_rss, rss_mb
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    order: list[str] = []
    times = alternate(
        {"a": lambda: order.append("a") or 1.0, "b": lambda: order.append("b")},
        repeats=2,
        warmup=1,
    )
    assert order == ["a", "b"] * 3  # strictly alternating, warm-up round included
    assert times["a"] == [1.0, 1.0] and len(times["b"]) == 2
    assert parse_json_line('x\nbench {"v": 1}\nbench {"v": 2}\n', "bench") == {"v": 2}
    if reset_peak_rss():
        before = rss_mb()
        block = bytearray(64 * 2**20)  # touched: 64 MiB resident
        block[::4096] = b"\1" * len(block[::4096])
        assert peak_rss_mb() - before > 50
        del block


@needs_trl
@pytest.mark.slow
def test_train_step_vs_trl_smoke() -> None:
    out, text = run_script(
        "train_step_vs_trl",
        "--prompts", "4", "--group", "2", "--tokens", "6", "--image-side", "64",
        "--gate-open", "0.5", "--repeats", "1",
    )  # fmt: skip
    assert set(out["median_s"]) == {"kepo_grpo", "kepo_kepo", "trl_grpo"}
    assert all(v > 0 for v in out["median_s"].values())
    assert out["gated_open_rows"] == 4
    assert set(out["peak_rss_growth_mb"]) == {"kepo_grpo", "kepo_kepo", "trl_grpo"}
    ratio = out["ratio_ours_over_trl"]
    assert ratio["grpo_time"] == pytest.approx(
        out["median_s"]["kepo_grpo"] / out["median_s"]["trl_grpo"], rel=1e-2
    )
    assert "set_num_threads(1)" in text
    # Same work: the first step's loss and pre-clip gradient norm agree (same weights, batch).
    work = out["same_work"]
    assert work["equal"] is True, work
    assert work["tolerance"] == {"loss_abs": "1e-05", "grad_norm_rel": "0.0001"}
    assert work["grad_norm"]["kepo_grpo"] > 0
    assert work["grad_norm"]["kepo_grpo"] == pytest.approx(work["grad_norm"]["trl_grpo"], rel=1e-3)
    assert "EQUAL within" in text


@needs_trl
def test_hf_generate_smoke_with_trl() -> None:
    out, _ = run_script(
        "hf_generate", "--prompts", "1", "--samples", "2", "--tokens", "4", "--repeats", "1"
    )
    assert set(out["tokens_per_s"]) == {"batched", "per_sample_loop", "trl_generate"}
    assert out["ratio_batched_over_trl"] == pytest.approx(
        out["tokens_per_s"]["batched"] / out["tokens_per_s"]["trl_generate"], rel=2e-2
    )


def test_store_io_smoke() -> None:
    out, _ = run_script("store_io", "--small", "--repeats", "1", "--replicate", "1", "3")
    iteration = out["iteration"]
    assert set(iteration["stages"]) == {"rollout(0)", "train(0)", "evaluate(1)"}
    assert 0 < iteration["store_share"] < 1
    for stage in iteration["stages"].values():
        assert 0 < stage["store_s"] < stage["wall_s"]
    one, three = out["io"]["x1"], out["io"]["x3"]
    assert one["rows_per_table"]["prompts"] == 2  # --small: 2 prompts x G = 2
    assert one["rows_per_table"]["rollouts"] >= 4
    assert three["rows"] == 3 * one["rows"]
    assert set(one["rows_per_s"]) == {"kepo_store", "raw_parquet"}


def test_teacher_scoring_smoke() -> None:
    out, _ = run_script(
        "teacher_scoring",
        "--prompts", "2", "--group", "4", "--tokens", "5", "--image-side", "64",
        "--micro-batch", "4", "--p-accuracy", "0.5", "--repeats", "1",
    )  # fmt: skip
    assert out["rows"] == 8
    assert out["all_rows"]["completion_tokens"] == 8 * 5
    gates = out["gates"]
    # p_format = 1: every row has total reward >= 1, so both total gates keep every row
    for label in ("total >= 0", "total >= 1", "accuracy >= 0"):
        assert gates[label]["open_rows"] == 8
        assert gates[label]["teacher_tokens"] == out["all_rows"]["teacher_tokens"]
    acc = gates["accuracy >= 1"]
    assert acc["completion_tokens"] == acc["open_rows"] * 5
    assert acc["teacher_tokens"] <= out["all_rows"]["teacher_tokens"]


def test_gpu_iteration_rehearsal_runs_tiny_on_cpu() -> None:
    payload, stdout = run_script("gpu_iteration", "--tiny")
    stages = payload["stages"]
    assert list(stages) == [
        "build_teacher_folder",
        "load_teacher_device_map",
        "build_student",
        "rollout",
        "exploration",
        "scoring",
        "train_step",
        "evaluate",
    ]
    assert all(row["seconds"] > 0 for row in stages.values())
    assert stages["rollout"]["generated_tokens"] == 2 * 2 * 6
    # The teacher was really split by its device_map (half its layers offloaded to disk).
    placement = payload["teacher_placement"]
    assert placement["disk"] > 0 and sum(placement.values()) == payload["teacher_params"]
    assert "train_step" in stdout
