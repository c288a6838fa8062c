"""Seeded choices shared by the task families: independent random streams per task seed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from metaoptimizer.config import check_positive

# Stream ids: what a task seed decides (architecture, data) never shifts when another part changes.
ARCHITECTURE_STREAM = 0
DATA_STREAM = 1


def task_rng(seed: int, stream: int) -> np.random.Generator:
    """A generator for ``stream`` of task ``seed``, independent of the other streams."""
    check_positive("seed", seed, integer=True, allow_zero=True)
    return np.random.default_rng([stream, seed])


def as_choices(name: str, values: Any, accepted: Sequence | None = None, *, integer: bool = False) -> tuple:
    """``values`` (one value or a non-empty sequence) as a tuple of choices, each checked.

    With ``accepted`` every choice must be one of them; otherwise every choice must be a positive
    number (an integer when ``integer``).
    """
    choices = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    if not choices:
        raise ValueError(f"{name} needs at least one choice, got an empty sequence")
    for value in choices:
        if accepted is not None:
            if value not in accepted:
                raise ValueError(f"{name} choice {value!r} is not supported; accepted values: {tuple(accepted)}")
        else:
            check_positive(name, value, integer=integer)
    return choices


def check_fraction(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is a number strictly between 0 and 1."""
    check_positive(name, value)
    if value >= 1:
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}")


def pick(rng: np.random.Generator, choices: Sequence) -> Any:
    """One of ``choices``, uniformly."""
    return choices[int(rng.integers(len(choices)))]
