"""Inner runs in progress: what a meta-trainer advances and an estimator unrolls.

A :class:`TaskRun` is one inner training run (a task, its parameters and rule state at some step,
its replayable batch streams, its budget) plus whatever its estimator carries across truncations
(:attr:`TaskRun.estimator_state`, e.g. PES particles). Estimators
(:mod:`metaoptimizer.meta.estimators`) advance runs by one truncation with :func:`advance`; the
meta-trainer (:mod:`metaoptimizer.meta.trainer`) starts, replaces, saves and restores them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from metaoptimizer.meta._vectorized import needs_valid_batch
from metaoptimizer.rules.base import Params, UpdateRule
from metaoptimizer.rules.state import OptimizerState
from metaoptimizer.tasks.base import Batch, Task

__all__ = ["EstimatorState", "ReplayableBatches", "TaskRun", "advance", "run_generator"]


class ReplayableBatches:
    """A task's batch stream that counts what it has handed out, so it can be rebuilt exactly."""

    def __init__(self, make: Callable[[int], Iterator[Batch]], seed: int, drawn: int = 0) -> None:
        self.seed = seed
        self.drawn = drawn
        self._iterator = make(seed)
        for _ in itertools.islice(self._iterator, drawn):
            pass

    def __iter__(self) -> ReplayableBatches:
        return self

    def __next__(self) -> Batch:
        self.drawn += 1
        return next(self._iterator)

    def take(self, count: int) -> list[Batch]:
        return [next(self) for _ in range(count)]


class EstimatorState(Protocol):
    """What an estimator keeps in a run between truncations; saved in checkpoints as
    :meth:`to_dict` (tensors, numbers, and dicts and lists of them) and rebuilt by the estimator's
    ``restore_run_state``."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class TaskRun:
    """One inner training run in progress: a task, its current parameters and rule state.

    ``num_steps`` is the run's budget, given to the rule at ``init``. ``generator`` is the slot's
    random generator (task draws, run lengths, ES noise); a run made without one gets a generator
    seeded by its task index on first use (:func:`run_generator`). ``estimator_state`` holds what
    an estimator carries across truncations (:class:`EstimatorState`, e.g. PES particles; None
    when it carries nothing). ``diverged`` marks a run that produced non-finite values and must be
    replaced. ``offset`` shortens the run: it ends after ``num_steps - offset`` steps while its
    rule state still counts toward a budget of ``num_steps`` (a random initial iteration offset,
    which staggers the slots' first runs so that they do not all restart together).
    """

    task: Task
    task_index: int
    params: Params
    state: OptimizerState
    train_batches: ReplayableBatches
    valid_batches: ReplayableBatches
    steps_done: int
    num_steps: int
    slot: int = 0
    generator: torch.Generator | None = None
    estimator_state: EstimatorState | None = None
    diverged: bool = False
    offset: int = 0

    @classmethod
    def start(
        cls, task: Task, task_index: int, seed: int, params: Params, rule: UpdateRule, num_steps: int, **extra: Any
    ) -> TaskRun:
        """A run at step 0 from ``params``, with fresh rule state and batch streams seeded by ``seed``."""
        return cls(
            task=task,
            task_index=task_index,
            params=params,
            state=rule.init(params, num_steps=num_steps),
            train_batches=ReplayableBatches(task.train_batches, seed),
            valid_batches=ReplayableBatches(task.valid_batches, seed),
            steps_done=0,
            num_steps=num_steps,
            **extra,
        )

    @property
    def finished(self) -> bool:
        return self.remaining() <= 0 or self.diverged

    def remaining(self) -> int:
        """Inner steps until the run ends (its budget less its offset)."""
        return self.num_steps - self.offset - self.steps_done

    def steps_left(self, unroll_steps: int) -> int:
        """Inner steps of the next truncation: ``unroll_steps``, or fewer to stop at the end."""
        return min(unroll_steps, self.remaining())

    def draw_batches(self, steps: int, meta_objective: str) -> tuple[list[Batch], Batch | None]:
        """The ``steps + 1`` training batches of a truncation (and a validation batch when needed)."""
        valid = next(self.valid_batches) if needs_valid_batch(meta_objective) else None
        return self.train_batches.take(steps + 1), valid


def run_generator(run: TaskRun) -> torch.Generator:
    """``run.generator``, created (seeded by the task index) for runs built without one."""
    if run.generator is None:
        run.generator = torch.Generator().manual_seed(run.task_index)
    return run.generator


def advance(run: TaskRun, params: Params, state: OptimizerState, steps: int, finite: bool) -> None:
    """Move ``run`` to the end of a truncation of ``steps`` steps (graph cut)."""
    run.params = {name: p.detach() for name, p in params.items()}
    run.state = state.detach()
    run.steps_done += steps
    run.diverged = run.diverged or not finite
