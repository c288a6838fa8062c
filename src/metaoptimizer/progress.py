"""How long-running library functions report where they stand, without knowing who listens.

A function that takes minutes (a suite of runs, a meta-training loop) accepts
``progress: ProgressCallback | None`` and calls it with a :class:`Progress` after each unit of
work. The library never prints: the command-line tool renders these reports (a live bar on a
terminal, plain lines in a log file), a notebook or a script can do whatever suits it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Progress", "ProgressCallback"]


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of the job ``label`` are finished; ``status`` says how it goes
    (e.g. the last meta-loss) and may be empty."""

    label: str
    done: int
    total: int
    status: str = ""


#: Called after each unit of work; must not raise.
ProgressCallback = Callable[[Progress], None]
