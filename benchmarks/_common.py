"""Helpers shared by the benchmark scripts: threads, alternation, medians, tables, JSON lines,
and peak-memory readings.

Every benchmark runs its sides in ONE process run, alternating (A, B, A, B, ...) after one
untimed warm-up call each, so that a slow phase of a shared machine hits every side alike; the
medians are reported. `torch.set_num_threads(1)` by default: on a 2-core machine shared with
other processes, two threads per process oversubscribe the cores and timings swing by several
times (one training step measured at 7 s with 2 threads against 0.8 s with 1).

Memory: `tracemalloc` does not see torch's allocations, so peak memory is read from the kernel.
`reset_peak_rss()` writes 5 to /proc/self/clear_refs, which resets the process's VmHWM (peak
resident set) to its current RSS; `peak_rss_mb()` reads VmHWM afterwards. The difference
"peak during a call - RSS before it" is the memory the call added at its worst moment. Run each
side in a fresh subprocess (`run_json_subprocess`) so one side's freed-but-cached heap does
not hide the other's growth, with `MALLOC_MMAP_THRESHOLD_` fixed (`MEMORY_ENV`): glibc then
serves every block of 128 KiB or more with its own mmap and unmaps it on free, so the RSS follows
the live tensors instead of keeping freed blocks cached (its default threshold adapts upwards
after the first large free, which would hide a later step's peak).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
THREADS_NOTE = (
    "torch.set_num_threads({n}); more threads on a shared 2-core machine oversubscribe the "
    "cores and make timings meaningless"
)


def set_threads(n: int) -> str:
    """Set torch's intra-op threads; returns the note every benchmark prints."""
    import torch

    torch.set_num_threads(n)
    return THREADS_NOTE.format(n=n)


def alternate(
    sides: Mapping[str, Callable[[], float | None]], *, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Call the sides in turn (A, B, ..., A, B, ...): `warmup` untimed rounds, then `repeats`
    timed ones. A side returns its own measured seconds, or None to be timed around the call."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for round_idx in range(warmup + repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            measured = fn()
            elapsed = time.perf_counter() - start if measured is None else measured
            if round_idx >= warmup:
                times[name].append(elapsed)
    return times


def medians(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def rounded(values: Any, digits: int = 4) -> Any:
    """Round floats inside nested dicts/lists for a compact JSON line."""
    if isinstance(values, float):
        return round(values, digits)
    if isinstance(values, Mapping):
        return {k: rounded(v, digits) for k, v in values.items()}
    if isinstance(values, list | tuple):
        return [rounded(v, digits) for v in values]
    return values


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table (first column left-aligned, the others right-aligned)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(
        str(h).ljust(w) if i == 0 else str(h).rjust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for row in cells:
        print(
            "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def emit_json(prefix: str, payload: Mapping[str, Any]) -> None:
    """The one machine-readable line of a benchmark: `<prefix> {json}`."""
    print(f"{prefix} " + json.dumps(rounded(dict(payload)), sort_keys=False))


def parse_json_line(output: str, prefix: str) -> dict[str, Any]:
    """The payload of the last `<prefix> {json}` line in `output`."""
    for line in reversed(output.splitlines()):
        if line.startswith(prefix + " {"):
            return json.loads(line[len(prefix) + 1 :])
    raise ValueError(f"no line starting with {prefix!r} in the output:\n{output[-2000:]}")


# ------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1))


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    return _status_kb("VmRSS") / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak resident set size (VmHWM) since the process start or the last reset, MiB."""
    return _status_kb("VmHWM") / 1024


def run_json_subprocess(
    argv: Sequence[str],
    prefix: str,
    *,
    timeout_s: float = 600,
    env: Mapping[str, str] | None = None,
) -> dict:
    """Run `python argv...` in a fresh process (repo root as cwd, `env` added to the
    environment) and parse its JSON line."""
    proc = subprocess.run(
        [sys.executable, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"subprocess {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return parse_json_line(proc.stdout, prefix)


# ------------------------------------------------------------------------------ models
def tiny_pair(out_dir: Path, workdir: Path | None = None) -> tuple[Path, Path, str]:
    """(student, teacher, description): the warmed-up demo models of a `kepo demo` workdir
    when `workdir` has them, else freshly built (random-weight) tiny models in `out_dir`."""
    if workdir is not None:
        student, teacher = workdir / "models" / "student", workdir / "models" / "teacher"
        if (student / "config.json").is_file() and (teacher / "config.json").is_file():
            return student, teacher, f"warmed-up demo models from {workdir}"
        raise FileNotFoundError(
            f"{workdir} has no models/student and models/teacher; run `kepo demo --workdir "
            f"{workdir}` first or leave out --workdir to use freshly built tiny models"
        )
    from kepo.tiny import build_tiny_pair

    student, teacher = build_tiny_pair(out_dir, seed=0)
    return student, teacher, "freshly built tiny models (random weights)"
