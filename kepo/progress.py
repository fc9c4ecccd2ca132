"""Progress of long work: a rich bar on a terminal, periodic log lines everywhere else.

    with progress(total=300, desc="warm-up student", unit="steps") as advance:
        for step in range(300):
            ...
            advance(loss=0.41)  # one unit done; extra numbers are shown with the count

When stderr is a terminal, a transient rich bar shows the count, elapsed time and an estimate of
the time left. Otherwise (output to a file, a CI job, a Prefect worker) the same facts go to the
`kepo.progress` logger at INFO every `every_s` seconds and once at the end of work that took
that long, e.g.

    warm-up student: 120/300 steps (40%), 2m10s elapsed, about 3m15s left, loss 0.412

The estimate is the mean time per unit so far times the units left.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

Advance = Callable[..., None]


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(
    desc: str, done: int, total: int, unit: str, elapsed: float, fields: dict[str, float]
) -> str:
    """`desc: done/total unit (pct), elapsed, about ETA left[, name value ...]`."""
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    line = f"{desc}: {done}/{total} {unit}{pct}, {_duration(elapsed)} elapsed"
    if 0 < done < total:
        line += f", about {_duration(elapsed / done * (total - done))} left"
    for name, value in fields.items():
        line += f", {name} {value:.3f}"
    return line


@contextmanager
def progress(
    total: int,
    desc: str,
    *,
    unit: str = "items",
    every_s: float = 30.0,
    enabled: bool = True,
    terminal: bool | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Advance]:
    """Track `total` units of work; yields `advance(n=1, **fields)`.

    `terminal` None = whether stderr is a terminal; `enabled=False` shows nothing (e.g. on the
    non-main processes of a distributed run).
    """
    if not enabled:
        yield lambda n=1, **fields: None
        return
    if terminal is None:
        terminal = sys.stderr.isatty()
    if terminal:
        with _rich_bar(total, desc, unit) as advance:
            yield advance
        return
    start = clock()
    state = {"done": 0, "last": start}
    shown: dict[str, float] = {}

    def advance(n: int = 1, **fields: float) -> None:
        state["done"] += n
        shown.update(fields)
        now = clock()
        if now - state["last"] >= every_s and state["done"] < total:
            state["last"] = now
            log.info(progress_line(desc, int(state["done"]), total, unit, now - start, shown))

    yield advance
    elapsed = clock() - start
    if elapsed >= every_s:  # short work (many small generate calls) stays quiet
        log.info(progress_line(desc, int(state["done"]), total, unit, elapsed, shown))


@contextmanager
def _rich_bar(total: int, desc: str, unit: str) -> Iterator[Advance]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with bar:
        task = bar.add_task(desc, total=total, extra="")

        def advance(n: int = 1, **fields: float) -> None:
            extra = ", ".join(f"{name} {value:.3f}" for name, value in fields.items())
            bar.update(task, advance=n, **({"extra": extra} if fields else {}))

        yield advance
