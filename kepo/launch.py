"""Training as a launched stage: `train.launcher: accelerate`.

With `train.launcher: inprocess` (the default) the training stage runs `train_iteration` in the
stage's own process. With `accelerate`, the stage's process (the one holding the stage's lease
and writing its `stages` row through `kepo.pipeline.run_stage`) spawns

    python -m accelerate.commands.launch --config_file <workdir>/launch/<run>-iteration-K.yaml \
        -m kepo.train_stage --db F --run R --iteration K

with `train.num_processes` processes, forwards their output lines to its log and waits. The
Accelerate config file is written per launch from `train.strategy`: `ddp` (MULTI_GPU, which on a
CPU-only machine with models.device cpu runs as MULTI_CPU over gloo), `fsdp` (Accelerate's FSDP2
plugin: `fsdp_config`, one shard per decoder layer) or `deepspeed_zero3` (Accelerate's DeepSpeed
plugin: `deepspeed_config` with zero_stage 3). No sharding is written here.

The ranks learn that they run under a launched stage from `KEPO_STAGE_LEASE` (the parent's lease
owner): they do not take the lease (`check_parent_lease` verifies the parent holds it), and each
rank writes the error it dies with to `KEPO_RANK_ERROR_DIR/rank-N.txt`. A failed launch fails the
stage with `LaunchError`: the first failing rank's error in one line plus the tail of the log
(a rank killed without a Python error is named from torch.distributed's failure summary).

DuckDB admits one writing process: the ranks' main process writes `train_steps` and the
`checkpoints` row; the parent holds no connection while the ranks run (`kepo.store.Store` opens
one per call) and reads the result back from the store afterwards (`result_from_store`).

Sharded strategies. Measured on the CPU (accelerate 1.16, torch 2.13): an Accelerate FSDP
launch with `Accelerator(cpu=True)` silently runs as DDP (distributed_type MULTI_CPU, the model
wrapped in DistributedDataParallel, parameters not sharded), so `check_launch` refuses fsdp and
deepspeed_zero3 on the CPU, and `kepo.train.make_accelerator` refuses any Accelerator that does
not run the configured strategy. On GPUs fsdp is accepted: the trainer gathers the full weights
and AdamW state on every rank for its checkpoint and loads a resumed AdamW state into the shards
(`kepo.sharded`); tests/test_train_sharded.py proves that with torch FSDP2 on two CPU ranks and
with the trainer under Accelerate's FSDP2 `prepare` forced on the CPU, not on GPUs. Only the
student is sharded: an online teacher is still a full copy per process. deepspeed_zero3 stays
refused: DeepSpeed keeps the optimizer inside its engine, out of reach of those helpers, and it
is not installed in the tested environment.

`KEPO_FAIL_RANK=<rank>:raise|exit` is a test hook (fault injection, like
`KEPO_FAIL_SHARD_ONCE` of flows/runners.py): that rank raises, or leaves with `os._exit(3)`,
in the middle of its first optimizer step, after its forward pass.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import importlib.util
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from kepo.config import RunConfig
from kepo.leases import lease_owner
from kepo.ranks import (
    PARENT_LEASE_ENV,
    RANK_ERROR_DIR_ENV,
    LaunchError,
)
from kepo.run import Run

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 30
TAIL_CHARS = 2500
SUMMARY_LINES = 200  # lines kept to find the launcher's failure summary
DEEPSPEED_HINT = "pip install deepspeed (on a CUDA machine; it builds its ops against CUDA)"


# ------------------------------------------------------------------------------ checks
def check_launch(cfg: RunConfig) -> None:
    """Refuse, in one line naming the setting, a training launch that cannot run here.

    ddp runs anywhere; fsdp on GPUs. On the CPU Accelerate runs an fsdp or deepspeed_zero3
    launch as plain DDP (measured), and deepspeed_zero3 is not supported yet (the trainer
    gathers sharded checkpoints and AdamW state for FSDP only).
    """
    from kepo.models import resolve_device

    train = cfg.train
    if train.launcher != "accelerate" or train.strategy == "ddp":
        return
    if resolve_device(cfg.models.device).type == "cpu":
        raise LaunchError(
            f"train.strategy={train.strategy} needs GPUs: on the CPU Accelerate runs an "
            f"{train.strategy} launch as plain DDP (measured: distributed_type MULTI_CPU, model "
            "wrapped in DistributedDataParallel, nothing sharded); set train.strategy: ddp"
        )
    if train.strategy == "fsdp":
        return
    missing = ""
    if importlib.util.find_spec("deepspeed") is None:
        missing = f"; it also needs DeepSpeed, which is not installed ({DEEPSPEED_HINT})"
    raise LaunchError(
        f"train.strategy={train.strategy} is not supported yet: the trainer gathers the sharded "
        "weights and AdamW state for its checkpoint under FSDP only (DeepSpeed keeps the "
        f"optimizer inside its engine){missing}; set train.strategy: fsdp or ddp (a full copy "
        "per process), and algorithm.distill.mode: offline to keep the teacher out of training"
    )


def in_launched_world() -> bool:
    """Whether this process is already one rank of a torch.distributed launch."""
    return "WORLD_SIZE" in os.environ


# ------------------------------------------------------------------------------ the config file
def accelerate_config(cfg: RunConfig, port: int) -> dict[str, Any]:
    """The Accelerate config file of one launch (`accelerate launch --config_file`)."""
    train = cfg.train
    base: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": train.num_processes,
        "main_process_port": port,
        "mixed_precision": train.mixed_precision,
        "dynamo_config": {"dynamo_backend": "NO"},
        "use_cpu": False,  # the ranks' Accelerator(cpu=...) follows models.device
        "rdzv_backend": "static",
        "same_network": True,
    }
    if train.strategy == "ddp":
        return {**base, "distributed_type": "MULTI_GPU"}
    if train.strategy == "fsdp":
        return {
            **base,
            "distributed_type": "FSDP",
            "fsdp_config": {
                "fsdp_version": 2,
                "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "fsdp_reshard_after_forward": True,
                "fsdp_state_dict_type": "FULL_STATE_DICT",
                "fsdp_cpu_ram_efficient_loading": False,
                "fsdp_offload_params": False,
                "fsdp_activation_checkpointing": train.gradient_checkpointing,
            },
        }
    return {
        **base,
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {
            "zero_stage": 3,
            "gradient_accumulation_steps": train.grad_accum_steps,
            "gradient_clipping": train.max_grad_norm if train.max_grad_norm is not None else 0.0,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "zero3_init_flag": False,
            "zero3_save_16bit_model": True,
        },
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_launch_config(run: Run, iteration: int) -> Path:
    """Write this launch's Accelerate config into `<workdir>/launch/`; returns its path."""
    folder = run.workdir / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run.run_id}-iteration-{iteration:04d}.yaml"
    path.write_text(yaml.safe_dump(accelerate_config(run.config, free_port()), sort_keys=False))
    return path


def launch_command(run: Run, iteration: int, config_file: Path) -> list[str]:
    return [
        sys.executable,  # the launcher and the ranks run in this environment
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "-m",
        "kepo.train_stage",
        "--db",
        str(run.store.path),
        "--run",
        run.run_id,
        "--iteration",
        str(iteration),
    ]


def _child_env(owner: str, error_dir: Path) -> dict[str, str]:
    package_root = str(
        Path(__file__).resolve().parents[1]
    )  # `-m kepo.train_stage` imports this code
    paths = [package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
        PARENT_LEASE_ENV: owner,
        RANK_ERROR_DIR_ENV: str(error_dir),
    }


def _die_with_parent() -> Any:
    """What the launcher's process runs before exec: have Linux SIGTERM it when the stage's
    process dies, so no rank outlives the lease (a rerun takes a dead holder's lease over).
    Resolved here, before the fork, so the forked child only calls into libc."""
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return functools.partial(prctl, 1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# ------------------------------------------------------------------------------ the launch
def launch_training(run: Run, iteration: int) -> Any:
    """Run the training of `iteration` as `train.num_processes` launched processes; returns the
    TrainResult read back from the store. Called inside the stage (the caller holds the lease)."""
    cfg = run.config
    check_launch(cfg)
    t_start = time.perf_counter()
    config_file = write_launch_config(run, iteration)
    cmd = launch_command(run, iteration, config_file)
    log.info(
        "run %s: launching training of iteration %d on %d process%s (%s): %s",
        run.run_id,
        iteration,
        cfg.train.num_processes,
        "es" if cfg.train.num_processes > 1 else "",
        cfg.train.strategy,
        " ".join(cmd[1:]),
    )
    tail: collections.deque[str] = collections.deque(maxlen=SUMMARY_LINES)
    with tempfile.TemporaryDirectory(prefix="kepo-rank-errors-") as error_dir:
        proc = subprocess.Popen(
            cmd,
            env=_child_env(lease_owner(), Path(error_dir)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                log.info("[train] %s", line)
            returncode = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        if returncode != 0:
            raise LaunchError(failure_message(returncode, Path(error_dir), list(tail)))
    return result_from_store(run, iteration, time.perf_counter() - t_start)


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the launcher and its ranks (their own process group)."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def failure_message(returncode: int, error_dir: Path, tail: list[str]) -> str:
    """One line naming the failing rank and its error, then the tail of the log.

    The failing rank is the root cause torch.distributed's launcher names (the others are
    stopped after it, or fail on its closed connections); without that summary, the rank that
    wrote its error first.
    """
    text = "\n".join(tail)
    root = text.rpartition("Root Cause")[2]
    rank_match = re.search(r"rank\s*:\s*(\d+)", root)
    code_match = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    errors = {p.stem.removeprefix("rank-"): p for p in error_dir.glob("rank-*.txt")}
    if rank_match:
        rank = rank_match.group(1)
    elif errors:
        rank = min(errors, key=lambda r: errors[r].stat().st_mtime_ns)
    else:
        rank = None
    if rank is not None and rank in errors:
        head = f"training rank {rank} failed: {errors[rank].read_text().splitlines()[0]}"
    elif rank is not None:
        code = code_match.group(1) if code_match else "?"
        head = (
            f"training rank {rank} died with exit code {code} "
            "(no Python error: killed, out of memory, or os._exit)"
        )
    else:
        head = f"the training launch exited with code {returncode}"
    shown = "\n".join(tail[-LOG_TAIL_LINES:])[-TAIL_CHARS:]  # the stages row keeps 4000
    return head + "\n--- last lines of the launch log ---\n" + shown


# ------------------------------------------------------------------------------ the result
def result_from_store(run: Run, iteration: int, wall_time_s: float) -> Any:
    """The TrainResult of a launched stage, read from its `checkpoints` and `train_steps` rows."""
    from kepo.checkpoints import OPTIMIZER_FILE
    from kepo.train import TrainResult

    version = iteration + 1
    folder = run.recorded_checkpoint(version)
    if folder is None:
        raise LaunchError(
            f"run {run.run_id}: the training launch of iteration {iteration} exited cleanly but "
            f"recorded no checkpoint for version {version}; see its log"
        )
    steps = run.store.read(
        "train_steps", {"run_id": run.run_id, "iteration": iteration}, order_by=["step"]
    ).to_pylist()
    first_pass = [s for s in steps if s["pass_idx"] == 0]
    finite = [s["loss_total"] for s in steps if s["loss_total"] is not None and not s["skipped"]]
    optimizer = folder / OPTIMIZER_FILE
    return TrainResult(
        run_id=run.run_id,
        iteration=iteration,
        policy_version=version,
        checkpoint_dir=folder,
        optimizer_path=optimizer if optimizer.is_file() else None,
        n_steps=len(steps),
        n_skipped=sum(1 for s in steps if s["skipped"]),
        n_sequences=sum(s["n_sequences"] for s in first_pass),
        n_tokens=sum(s["n_tokens"] for s in first_pass),
        final_loss=finite[-1] if finite else None,
        wall_time_s=wall_time_s,
        steps=steps,
    )
