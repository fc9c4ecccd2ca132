"""The pipeline on vLLM: `kepo run` with the student and the teacher on real vLLM engines.

configs/vllm/tiny-kepo.yaml (rollout.backend: vllm, the teacher on vLLM too, offline teacher
top-k) shrunk to the session's tiny models and curated set, run for two iterations by the CLI in
a subprocess; then `kepo audit`, the Table 1 query and `kepo report` on its database. Runs in
the environment that has vLLM (the CPU build in CI) and skips itself elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def _kepo(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "kepo.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_kepo_run_on_vllm_then_audit_table1_and_report(tmp_path, tiny_models, curated_bundled):
    from kepo.store import Store

    student, teacher = tiny_models
    config = {
        "base": str(REPO / "configs" / "vllm" / "tiny-kepo.yaml"),
        "run_id": "vllm-pipeline",
        "workdir": str(tmp_path / "work"),
        "seed": 3,
        "iterations": 2,
        "data": {  # the session's curated set (same settings, so it is reused as is)
            "out_dir": str(curated_bundled),
            "train_size": 12,
            "test_per_modality": 2,
            "bundled": {
                "synthetic_per_modality": 10,
                "real_variants_per_image": 1,
                "image_size": 32,
            },
        },
        "models": {"student": str(student), "teacher": str(teacher), "torch_threads": 1},
        "rollout": {
            "prompts_per_iteration": 4,
            "group_size": 2,
            "sampling": {"max_new_tokens": 8},
            "exploration": {"budget": 1, "inject_k": 1, "hint_sampling": {"max_new_tokens": 8}},
        },
        "algorithm": {"distill": {"top_k": 4, "gate": {"tau": 0.0}}},
        "train": {"learning_rate": 1e-3, "micro_batch_size": 4, "grad_accum_steps": 2},
        "eval": {"max_items_per_modality": 1, "batch_size": 8, "sampling": {"max_new_tokens": 8}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engines in the stage's process (CI time)
    }
    result = _kepo("run", str(path), env=env)
    # keep_alive: `kepo run` runs all stages in one process, so one student engine and one
    # teacher engine serve both iterations and every evaluation; the student gets policy
    # versions 1 and 2 loaded in place (vLLM's own log lines say so).
    log = result.stdout + result.stderr
    assert log.count("Initializing a V1 LLM engine") == 2, log[-3000:]
    assert log.count("Reloading and processing weights took") == 2, log[-3000:]

    db = tmp_path / "work" / "kepo.duckdb"
    store = Store(db)
    stages = store.query("SELECT iteration, stage, status FROM stages ORDER BY 1, 2").to_pylist()
    assert {(s["iteration"], s["stage"]) for s in stages} >= {
        (0, "rollout"),
        (0, "train"),
        (1, "rollout"),
        (1, "train"),
        (2, "evaluate"),
    }
    assert all(s["status"] == "succeeded" for s in stages), stages
    counts = store.query(
        "SELECT iteration, count(*) AS n, sum(gate_open::INT) AS gated FROM rollouts "
        "WHERE trained GROUP BY 1 ORDER BY 1"
    ).to_pylist()
    assert [c["iteration"] for c in counts] == [0, 1] and all(c["n"] == 8 for c in counts)
    topk = store.query(
        "SELECT iteration, count(*) AS n, min(k) AS k FROM teacher_topk GROUP BY 1 ORDER BY 1"
    ).to_pylist()
    assert [(t["iteration"], t["n"], t["k"]) for t in topk] == [
        (c["iteration"], c["gated"], 4) for c in counts
    ]
    assert store.query("SELECT count(*) AS n FROM hints").to_pylist()[0]["n"] > 0

    prompt_id = store.query(
        "SELECT prompt_id FROM prompts WHERE iteration = 1 ORDER BY triggered DESC, prompt_id "
        "LIMIT 1"
    ).to_pylist()[0]["prompt_id"]
    audit = _kepo(
        "audit", "--db", str(db), "--run", "vllm-pipeline", "--iteration", "1",
        "--prompt", prompt_id, "--json", env=env,
    )  # fmt: skip
    story = json.loads(audit.stdout)
    assert story["prompt_id"] == prompt_id

    table1 = _kepo("sql", "--db", str(db), "--query", "table1", "--json", env=env)
    rows = json.loads(table1.stdout)
    rows = rows if isinstance(rows, list) else [rows]
    assert any(r["run_id"] == "vllm-pipeline" for r in rows), rows

    report = tmp_path / "report.html"
    _kepo("report", "--db", str(db), "--out", str(report), env=env)
    assert "vllm-pipeline" in report.read_text()


def test_vllm_vs_hf_benchmark_runs(tmp_path):
    """benchmarks/vllm_vs_hf.py at a minimal size: both sides generate the same token count."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "vllm_vs_hf.py"),
            *("--prompts", "2", "--samples", "2", "--tokens", "4", "--repeats", "1"),
            *("--kv-cache-mb", "64"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("vllm_vs_hf {"))
    payload = json.loads(line.split(" ", 1)[1])
    assert set(payload["tokens_per_s"]) == {"hf", "vllm"}
    assert all(rate > 0 for rate in payload["tokens_per_s"].values())
