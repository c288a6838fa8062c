"""What every command shares: the ``--out`` option, usage errors, the thread count and progress display."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from metaoptimizer.progress import Progress, ProgressCallback

#: Intra-op threads unless ``--threads`` says otherwise. This library's workloads are many small
#: tensor operations: on a shared machine extra threads only contend for busy cores (torch's
#: default made a smoke evaluation several times slower), and even on a quiet 16-core machine
#: they gained nothing on an evaluation and 1.5x on meta-training (``benchmarks/bench_threads.py``,
#: BENCHMARKS.md "Thread count"). Large models on a quiet machine are the case for more.
DEFAULT_THREADS = 1
#: Seconds between two plain progress lines when the output is not a terminal (a log file).
LINE_INTERVAL_S = 10.0


def out_option(help: str) -> Any:
    """The output-folder option, spelt ``--out`` (``-o``) by every command; ``--out-dir`` is the
    deprecated spelling of some commands, still accepted."""
    return typer.Option("--out", "-o", "--out-dir", help=f"{help} (--out-dir: deprecated spelling)")


@contextmanager
def usage_errors(param_hint: str | None = None) -> Iterator[None]:
    """Report bad input found while a command sets up (a ValueError, a missing file, an unreadable
    checkpoint: a ``CheckpointError`` is a ValueError) as a usage error naming the problem, not as
    a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error), param_hint=param_hint) from error


class LineProgress:
    """Progress as plain lines (for log files): the first and last report of each job, and one
    line at most every ``interval`` seconds in between."""

    def __init__(self, stream: TextIO, interval: float = LINE_INTERVAL_S, clock: Any = time.monotonic) -> None:
        self.stream, self.interval, self.clock = stream, interval, clock
        self.started = clock()
        self.last_line = -float("inf")

    def __call__(self, report: Progress) -> None:
        now = self.clock()
        if report.done in (1, report.total) or now - self.last_line >= self.interval:
            status = f"  {report.status}" if report.status else ""
            print(f"[{now - self.started:6.0f} s] {report.label}: {report.done}/{report.total}{status}",
                  file=self.stream, flush=True)
            self.last_line = now


class BarProgress:
    """Progress as rich bars on a terminal: a new bar whenever a job starts counting again."""

    def __init__(self, bars: RichProgress) -> None:
        self.bars, self.task, self.done = bars, None, 0

    def __call__(self, report: Progress) -> None:
        if self.task is None or report.done <= self.done:
            self.task = self.bars.add_task(report.label, total=report.total, status="")
        self.done = report.done
        self.bars.update(self.task, description=report.label, completed=report.done, total=report.total,
                         status=report.status)


@contextmanager
def progress_display(enabled: bool = True, stream: TextIO | None = None) -> Iterator[ProgressCallback | None]:
    """A progress callback for the library, shown on ``stream`` (stderr by default): live bars on
    a terminal, plain lines otherwise; None when not ``enabled``."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        yield None
        return
    console = Console(file=stream)
    if not console.is_terminal:
        yield LineProgress(stream)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with RichProgress(*columns, console=console) as bars:
        yield BarProgress(bars)
