"""Who holds a stage: lease owners as host:pid:start-time, and whether that process still runs.

The store keeps the owner in `stages.lease_owner` (`Store.begin_stage`); the stage runner
(`kepo.pipeline.run_stage`) takes the lease with `lease_owner()` and lets a rerun take over a
lease whose holder is dead (`holder_alive`). A launched training's ranks are handed the
parent's owner string (`kepo.ranks`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), or '' where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def lease_owner() -> str:
    """This process as a lease holder: host:pid:start-time (start time guards against pid reuse)."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def holder_alive(owner: str) -> bool:
    """Whether the process named by a lease still runs (another host's: assumed alive)."""
    host, _, rest = owner.partition(":")
    pid_text, _, started = rest.partition(":")
    if host != socket.gethostname():
        return True
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return not started or _start_time(pid) == started
