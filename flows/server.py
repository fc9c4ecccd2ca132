"""A temporary local Prefect API that dies with the process that started it.

Without `PREFECT_API_URL`, Prefect starts its own temporary API server as a child process and
stops it at interpreter exit, which never comes when the parent is killed (SIGKILL, OOM): the
server would keep running. `temporary_api()` starts the same server (uvicorn on Prefect's app
factory) with the kernel told to terminate it when its parent dies (Linux `PR_SET_PDEATHSIG`;
elsewhere it is stopped at exit, as Prefect does), and points this process at it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PR_SET_PDEATHSIG = 1
# Set to the temporary API's URL while `temporary_api()` runs (read by flows.helpers).
TEMPORARY_API_ENV = "KEPO_TEMPORARY_PREFECT_API"


def _die_with_parent(parent: int) -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start the API server; returns the process and its API URL once it answers."""
    import prefect
    from prefect.settings import get_current_settings

    port = _free_port()
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    parent = os.getpid()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(Path(prefect.__file__).parent.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ],
        env=env,
        preexec_fn=(lambda: _die_with_parent(parent)) if sys.platform == "linux" else None,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the temporary Prefect API exited with code {proc.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/health", timeout=2) as response,
        ):
            if response.status == 200:
                return proc, url
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"the temporary Prefect API did not answer within {timeout_s:g} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def temporary_api() -> Iterator[str | None]:
    """Use `PREFECT_API_URL` when set; otherwise a temporary API for the duration (see above)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    proc, url = start_server()
    atexit.register(stop_server, proc)
    previous = os.environ.get(TEMPORARY_API_ENV)
    os.environ[TEMPORARY_API_ENV] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_logs()
    finally:
        if previous is None:
            os.environ.pop(TEMPORARY_API_ENV, None)
        else:
            os.environ[TEMPORARY_API_ENV] = previous
        stop_server(proc)


def _drain_logs() -> None:
    """Send the flow's queued log records while the API still answers."""
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
