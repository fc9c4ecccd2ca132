"""Where the shard tasks of a stage run: threads of the flow's process, or Ray workers.

`rollout.task_runner: inprocess` (the default) keeps Prefect's thread pool. `ray` runs every shard
task as a Ray task through prefect-ray's `RayTaskRunner`: on the cluster at `rollout.ray_address`,
or on a local one started for the shard flow (no dashboard). Each shard task asks Ray for
`rollout.shard_resources` (e.g. `{num_gpus: 1}`; Ray then sets `CUDA_VISIBLE_DEVICES` for it), and
carries a runtime environment that lets a worker reach the flow's Prefect API and import this
code (`worker_env`).

A shard task that raises is retried by Prefect; a shard whose worker process dies is retried by
Ray (`max_retries`). Both reruns overwrite the shard's folder, and the commit task loads each
shard folder once, so a retry never duplicates rows.

`fail_once` is a fault-injection point for tests and rehearsals: with
`KEPO_FAIL_SHARD_ONCE=<index>:raise` (or `:exit`), shard `<index>` fails on its first attempt only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from kepo.config import RolloutConfig

FAIL_ONCE_ENV = "KEPO_FAIL_SHARD_ONCE"
RAY_EXTRA_HINT = "install the optional extra: pip install -e '.[ray]' (prefect-ray)"


def _require_prefect_ray() -> Any:
    try:
        from prefect_ray.task_runners import RayTaskRunner
    except ImportError as err:
        raise RuntimeError(
            f"rollout.task_runner is 'ray' but prefect-ray is not installed; {RAY_EXTRA_HINT}, "
            "or set rollout.task_runner: inprocess"
        ) from err
    return RayTaskRunner


def task_runner_for(config: RolloutConfig, n_shards: int | None = None) -> TaskRunner:
    """The Prefect task runner the shard tasks of a stage run under (`n_shards` parallel
    threads in-process; default `rollout.shards`)."""
    if config.task_runner == "inprocess":
        return ThreadPoolTaskRunner(max_workers=max(1, n_shards or config.shards))
    ray_task_runner = _require_prefect_ray()
    init_kwargs: dict[str, Any] = {}
    if config.ray_address is None:
        init_kwargs["include_dashboard"] = False
    return ray_task_runner(address=config.ray_address, init_kwargs=init_kwargs)


def prefect_api_url() -> str | None:
    """The API URL this process's Prefect client talks to (also the temporary local API's)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return get_current_settings().api.url
    with get_client(sync_client=True) as client:
        return str(client.api_url) if client.api_url else None


def worker_env() -> dict[str, str]:
    """Environment variables a Ray worker needs to run a shard task of this flow.

    The flow's Prefect API (else every worker would start its own temporary API on one SQLite
    file), telemetry off, this code on PYTHONPATH (a remote cluster needs kepo installed or on
    the same path), and every KEPO_* variable of the flow's process.
    """
    package_root = str(Path(__file__).resolve().parents[1])
    paths = [package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
    }
    url = prefect_api_url()
    if url:
        env["PREFECT_API_URL"] = url
    env.update({k: v for k, v in os.environ.items() if k.startswith("KEPO_")})
    return env


def ray_remote_options(config: RolloutConfig) -> dict[str, Any]:
    """Options of the Ray task behind each shard task: resources, retries, runtime env."""
    return {
        **config.shard_resources,
        "max_retries": config.shard_retries,
        "runtime_env": {"env_vars": worker_env()},
    }


@contextlib.contextmanager
def shard_placement(config: RolloutConfig) -> Iterator[None]:
    """Submit shard tasks inside this block so that each asks for its Ray resources."""
    if config.task_runner != "ray":
        yield
        return
    _require_prefect_ray()
    from prefect_ray.context import remote_options

    with remote_options(**ray_remote_options(config)):
        yield


def fail_once(shard_index: int, out_dir: Path) -> None:
    """Fail shard `shard_index` on its first attempt when KEPO_FAIL_SHARD_ONCE asks for it."""
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    index, _, how = spec.partition(":")
    if int(index) != shard_index:
        return
    marker = out_dir.parent / f"{out_dir.name}.failed-once"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(how or "raise")
    if how == "exit":
        os._exit(17)
    raise RuntimeError(f"{FAIL_ONCE_ENV}: shard {shard_index} fails on its first attempt")
