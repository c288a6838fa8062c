"""Evaluation suites as plain data: which task families, which tasks, how many steps, which seeds.

The built-in suites follow the issue's protocol, with the meta-training family and horizon
defaulting to the digits MLP family and 200 steps (``MetaTrainer``'s default horizon):

* ``heldout``: held-out task seeds of the meta-training family (suite a);
* ``architectures``: three architectures never seen in meta-training (suite b): a deeper, wider
  ReLU MLP (3 x 128), a CNN, and a GRU character language model;
* ``long_horizon``: the meta-training family for ``horizon_factor`` (5) times the steps (suite c);
* ``smoke``: two tiny digits tasks for tests and quick checks;
* ``general``: the tasks of :mod:`metaoptimizer.tasks.general` (none meta-trained on by any
  shipped learned optimizer) at horizons of 300, 1000 and 3000 steps, against the optimizers users
  pick instead (the ``general`` baseline set).

Held-out tasks use ``split='heldout'`` indices, whose task seeds never occur in meta-training.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from metaoptimizer.config import check_positive
from metaoptimizer.evaluate.baselines import BASELINE_SETS
from metaoptimizer.tasks.base import HELDOUT, SPLITS
from metaoptimizer.tasks.general import GENERAL_TASKS, resolve_data_dir

DEFAULT_FAMILY = "digits_mlp"
DEFAULT_STEPS = 200
DEFAULT_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class SuiteEntry:
    """Tasks ``task_indices`` of ``split`` from ``make_family(family, **kwargs)``, each run for
    ``steps`` updates with every seed in ``seeds``; validation metrics every ``eval_every``
    steps (default: a tenth of the budget) on ``eval_batches`` validation batches."""

    label: str
    family: str
    task_indices: tuple[int, ...]
    steps: int
    seeds: tuple[int, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    split: str = HELDOUT
    eval_every: int | None = None
    eval_batches: int = 8
    group: str = ""

    def __post_init__(self) -> None:
        if not self.group:  # reports summarise per group; by default each entry is its own group
            object.__setattr__(self, "group", self.label)
        check_positive("steps", self.steps, integer=True)
        check_positive("eval_batches", self.eval_batches, integer=True)
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} is not supported; accepted values: {SPLITS}")
        for what, values in (("task_indices", self.task_indices), ("seeds", self.seeds)):
            if not isinstance(values, tuple) or not values:
                raise ValueError(f"{what} must be a non-empty tuple of integers >= 0, got {values!r}")
            for value in values:
                check_positive(what, value, integer=True, allow_zero=True)
        if self.eval_every is None:
            object.__setattr__(self, "eval_every", max(1, self.steps // 10))
        check_positive("eval_every", self.eval_every, integer=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "family": self.family,
            "kwargs": dict(self.kwargs),
            "split": self.split,
            "task_indices": list(self.task_indices),
            "steps": self.steps,
            "seeds": list(self.seeds),
            "eval_every": self.eval_every,
            "eval_batches": self.eval_batches,
            "group": self.group,
        }


@dataclass(frozen=True)
class Suite:
    """A named list of suite entries, compared against the baseline set ``baselines`` (a key of
    :data:`metaoptimizer.evaluate.baselines.BASELINE_SETS`)."""

    name: str
    description: str
    entries: tuple[SuiteEntry, ...]
    baselines: str = "default"

    def __post_init__(self) -> None:
        if self.baselines not in BASELINE_SETS:
            raise ValueError(f"baselines={self.baselines!r} is not a baseline set; accepted: {sorted(BASELINE_SETS)}")
        if not self.entries:
            raise ValueError(f"suite {self.name!r} needs at least one entry")
        labels = [e.label for e in self.entries]
        if len(set(labels)) != len(labels):
            raise ValueError(f"suite {self.name!r} has repeated entry labels {labels}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "baselines": self.baselines,
                "entries": [e.to_dict() for e in self.entries]}

    def groups(self) -> list[str]:
        """The entries' groups, in order of first appearance."""
        return list(dict.fromkeys(e.group for e in self.entries))


def _indices(num_tasks: int) -> tuple[int, ...]:
    check_positive("num_tasks", num_tasks, integer=True)
    return tuple(range(num_tasks))


def heldout_suite(
    *,
    family: str = DEFAULT_FAMILY,
    family_kwargs: Mapping[str, Any] | None = None,
    num_tasks: int = 10,
    steps: int = DEFAULT_STEPS,
    seeds: tuple[int, ...] = DEFAULT_SEEDS,
) -> Suite:
    """Suite (a): ``num_tasks`` held-out tasks of the meta-training family at its horizon."""
    entry = SuiteEntry(family, family, _indices(num_tasks), steps, tuple(seeds), dict(family_kwargs or {}))
    return Suite("heldout", f"held-out task seeds of {family}, {steps} steps", (entry,))


def architectures_suite(
    *,
    num_tasks: int = 5,
    steps: int = DEFAULT_STEPS,
    seeds: tuple[int, ...] = DEFAULT_SEEDS,
    data_dir: str | os.PathLike | None = None,
) -> Suite:
    """Suite (b): three architectures never meta-trained on; the GRU reads tiny Shakespeare from
    ``data_dir`` when given, else a synthetic Markov text."""
    indices, seeds = _indices(num_tasks), tuple(seeds)
    text = {} if data_dir is None else {"root": str(data_dir)}
    entries = (
        SuiteEntry("mlp_relu_3x128", "digits_mlp", indices, steps, seeds,
                   {"widths": 128, "depths": 3, "activations": "relu"}),
        SuiteEntry("cnn", "digits_cnn", indices, steps, seeds),
        SuiteEntry("gru_char_lm", "char_rnn", indices, steps, seeds, {"cells": "gru", **text}),
    )
    return Suite("architectures", f"unseen architectures (deep ReLU MLP, CNN, GRU LM), {steps} steps", entries)


def long_horizon_suite(
    *,
    family: str = DEFAULT_FAMILY,
    family_kwargs: Mapping[str, Any] | None = None,
    num_tasks: int = 5,
    steps: int = DEFAULT_STEPS,
    horizon_factor: int = 5,
    seeds: tuple[int, ...] = DEFAULT_SEEDS,
) -> Suite:
    """Suite (c): held-out tasks of the meta-training family for ``horizon_factor * steps`` steps."""
    check_positive("horizon_factor", horizon_factor, integer=True)
    total = horizon_factor * steps
    entry = SuiteEntry(family, family, _indices(num_tasks), total, tuple(seeds), dict(family_kwargs or {}))
    return Suite("long_horizon", f"held-out tasks of {family}, {horizon_factor}x horizon ({total} steps)", (entry,))


def smoke_suite(*, num_tasks: int = 2, steps: int = 30, seeds: tuple[int, ...] = (0,)) -> Suite:
    """Tiny digits MLP tasks (one hidden layer of 16, 200 examples) to check the machinery quickly."""
    kwargs = {"widths": 16, "depths": 1, "n_examples": 200}
    entry = SuiteEntry("digits_mlp_tiny", "digits_mlp", _indices(num_tasks), steps, tuple(seeds), kwargs,
                       eval_batches=2)
    return Suite("smoke", f"tiny digits MLPs, {steps} steps", (entry,))


GENERAL_HORIZONS = (300, 1000, 3000)


def general_suite(
    *,
    horizons: tuple[int, ...] = GENERAL_HORIZONS,
    seeds: tuple[int, ...] = DEFAULT_SEEDS,
    tasks: tuple[str, ...] | None = None,
    data_dir: str | os.PathLike | None = None,
) -> Suite:
    """Every task of :data:`metaoptimizer.tasks.general.GENERAL_TASKS` (or those named in
    ``tasks``) at every horizon, one group per horizon, against the ``general`` baselines.

    ``data_dir`` (or ``$METAOPT_DATA_DIR``) holds MNIST, Omniglot and tiny Shakespeare; without
    it the tasks fall back to scikit-learn's digits and a synthetic text (see the tasks module).
    """
    chosen = tuple(GENERAL_TASKS) if tasks is None else tuple(tasks)
    unknown = [t for t in chosen if t not in GENERAL_TASKS]
    if unknown or not chosen:
        raise ValueError(f"tasks {unknown or chosen!r} are not general tasks; accepted: {', '.join(GENERAL_TASKS)}")
    if not isinstance(horizons, tuple) or not horizons:
        raise ValueError(f"horizons must be a non-empty tuple of step budgets, got {horizons!r}")
    root = resolve_data_dir(data_dir)
    kwargs = {} if root is None else {"root": str(root)}
    entries = tuple(
        SuiteEntry(f"{task}@{steps}", "general", (0,), steps, tuple(seeds), {"task": task, **kwargs},
                   group=f"{steps} steps")
        for steps in horizons for task in chosen
    )
    data = f"data from {root}" if root is not None else "fallback data (digits, synthetic text)"
    return Suite("general", f"{len(chosen)} general tasks x horizons {list(horizons)}, {data}", entries,
                 baselines="general")


SUITES: dict[str, Callable[..., Suite]] = {
    "heldout": heldout_suite,
    "architectures": architectures_suite,
    "long_horizon": long_horizon_suite,
    "smoke": smoke_suite,
    "general": general_suite,
}


def make_suite(name: str, **overrides: Any) -> Suite:
    """The built-in suite ``name`` with keyword ``overrides`` (e.g. ``num_tasks``, ``steps``, ``seeds``)."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; accepted names: {', '.join(map(repr, SUITES))}")
    accepted = list(inspect.signature(SUITES[name]).parameters)
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"suite {name!r} does not take {unknown}; accepted overrides: {accepted}")
    return SUITES[name](**overrides)
