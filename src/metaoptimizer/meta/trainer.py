"""Meta-training: inner runs over a task family, a gradient estimator, clipping and step skipping.

:class:`MetaTrainer` keeps ``tasks_per_step`` *slots*, each holding one inner training run
(:class:`TaskRun`) and its own random generator, which draws the slot's tasks, horizons and ES
noise. Estimators return one meta-gradient row per run (:class:`RunEstimates`); the trainer
averages the rows of all slots in slot order. Because every slot's randomness is its own and the
average runs over the same rows in the same order, splitting the slots over processes
(:mod:`metaoptimizer.meta.distributed`) gives the single-process result.
"""

from __future__ import annotations

import copy
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from metaoptimizer.config import META_OBJECTIVES, MetaOptTrainResult, OptimizerState, check_positive
from metaoptimizer.meta.distributed import Communicator, SingleProcess
from metaoptimizer.meta.step import apply_estimate
from metaoptimizer.meta.unroll import detach_params, unroll
from metaoptimizer.meta.vectorized import (
    UnrollJob,
    flatten_meta,
    index_tree,
    meta_parameters,
    needs_valid_batch,
    run_jobs,
)
from metaoptimizer.rules.base import Params, UpdateRule
from metaoptimizer.tasks.base import TRAIN, Batch, Task, TaskFamily, split_seed


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


@dataclass
class TaskRun:
    """One inner training run in progress: a task, its current parameters and rule state.

    ``generator`` is the slot's random generator (task draws, horizons, ES noise); a run made
    without one gets a generator seeded by its task index on first use (:func:`run_generator`).
    ``estimator_state`` holds what an estimator carries across truncations (PES particles); it
    must contain only checkpoint-safe values (tensors, numbers, dicts and lists of them).
    ``diverged`` marks a run that produced non-finite values and must be replaced.
    """

    task: Task
    task_index: int
    params: Params
    state: OptimizerState
    train_batches: ReplayableBatches
    valid_batches: ReplayableBatches
    steps_done: int
    horizon: int
    slot: int = 0
    generator: torch.Generator | None = None
    estimator_state: dict[str, Any] = field(default_factory=dict)
    diverged: bool = False

    @classmethod
    def start(
        cls, task: Task, task_index: int, seed: int, params: Params, rule: UpdateRule, horizon: int, **extra: Any
    ) -> TaskRun:
        """A run at step 0 from ``params``, with fresh rule state and batch streams seeded by ``seed``."""
        return cls(
            task=task,
            task_index=task_index,
            params=params,
            state=rule.init(params, num_steps=horizon),
            train_batches=ReplayableBatches(task.train_batches, seed),
            valid_batches=ReplayableBatches(task.valid_batches, seed),
            steps_done=0,
            horizon=horizon,
            **extra,
        )

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.horizon or self.diverged

    def steps_left(self, unroll_steps: int) -> int:
        """Inner steps of the next truncation: ``unroll_steps``, or fewer to stop at the horizon."""
        return min(unroll_steps, self.horizon - self.steps_done)

    def draw_batches(self, steps: int, meta_objective: str) -> tuple[list[Batch], Batch | None]:
        """The ``steps + 1`` training batches of a truncation (and a validation batch when needed)."""
        valid = next(self.valid_batches) if needs_valid_batch(meta_objective) else None
        return self.train_batches.take(steps + 1), valid


def run_generator(run: TaskRun) -> torch.Generator:
    """``run.generator``, created (seeded by the task index) for runs built without one."""
    if run.generator is None:
        run.generator = torch.Generator().manual_seed(run.task_index)
    return run.generator


@dataclass
class Estimate:
    """A meta-gradient estimate: one entry per rule parameter (None where unused)."""

    grads: list[Tensor | None]
    meta_loss: float
    finite: bool
    inner_steps: int


@dataclass
class RunEstimates:
    """Per-run meta-gradient estimates of one meta-step, one row per run.

    ``grads (runs, D)`` are flat over the rule's trainable parameters (order of
    :func:`~metaoptimizer.meta.vectorized.meta_parameters`); ``meta_losses (runs,)`` the meta-loss
    each run reports; ``inner_steps (runs,)`` the inner steps each ran. A row with a non-finite
    loss or gradient marks a step that must be skipped.
    """

    grads: Tensor
    meta_losses: Tensor
    inner_steps: Tensor

    def finite(self) -> Tensor:
        return torch.isfinite(self.meta_losses) & torch.isfinite(self.grads).all(dim=1)

    def mean(self, rule: UpdateRule) -> Estimate:
        """The average over rows (summed in row order), split into per-parameter tensors."""
        count = self.grads.shape[0]
        if count == 0:
            raise ValueError("cannot average an estimate with no runs")
        flat = self.grads.sum(dim=0) / count
        params = list(meta_parameters(rule).values())
        pieces = torch.split(flat, [p.numel() for p in params]) if params else []
        return Estimate(
            grads=[g.view(p.shape).to(p.dtype) for g, p in zip(pieces, params, strict=True)],
            meta_loss=float(self.meta_losses.sum() / count),
            finite=bool(self.finite().all()),
            inner_steps=int(self.inner_steps.sum()),
        )


class GradientEstimator(Protocol):
    """Turns unrolls of the runs into meta-gradients, advancing each run by one truncation."""

    def estimate_runs(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> RunEstimates: ...

    def estimate(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> Estimate: ...


class RowEstimator(ABC):
    """Base of estimators that compute per-run rows; :meth:`estimate` averages them."""

    @abstractmethod
    def estimate_runs(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> RunEstimates:
        """One meta-gradient row per run; advances every run by one truncation."""

    def estimate(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> Estimate:
        return self.estimate_runs(rule, runs, unroll_steps).mean(rule)


def advance(run: TaskRun, params: Params, state: OptimizerState, steps: int, finite: bool) -> None:
    """Move ``run`` to the end of a truncation of ``steps`` steps (graph cut)."""
    run.params = {name: p.detach() for name, p in params.items()}
    run.state = state.detach()
    run.steps_done += steps
    run.diverged = run.diverged or not finite


@dataclass
class TruncatedBPTT(RowEstimator):
    """Backpropagation through each truncation of ``unroll_steps``; the graph is cut between them.

    ``vectorize=True`` runs the runs' unrolls through :func:`~metaoptimizer.meta.vectorized.run_jobs`
    (``vmap`` over tasks of equal shapes, ``torch.func.grad`` for the meta-gradient); the default
    backpropagates through :func:`~metaoptimizer.meta.unroll.unroll` one run at a time.
    """

    meta_objective: str = "train_loss"
    second_order: bool = False
    vectorize: bool = False

    def estimate_runs(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> RunEstimates:
        if self.vectorize:
            return self._vectorized(rule, runs, unroll_steps)
        params = list(meta_parameters(rule).values())
        size = sum(p.numel() for p in params)
        rows, losses, inner = [], [], []
        for run in runs:
            steps = run.steps_left(unroll_steps)
            result = unroll(
                rule, run.task, detach_params(run.params), run.state.detach(), run.train_batches, steps,
                second_order=self.second_order, meta_objective=self.meta_objective, valid_batches=run.valid_batches,
            )
            row = torch.full((size,), math.nan, device=params[0].device if params else None)
            if result.finite:
                grads = torch.autograd.grad(result.meta_loss, params, allow_unused=True) if params else ()
                row = _flatten_grads(grads, params)
            advance(run, result.params, result.state, steps, result.finite)
            rows.append(row)
            losses.append(float(result.meta_loss.detach()))
            inner.append(steps)
        return _rows(rows, losses, inner)

    def _vectorized(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> RunEstimates:
        theta = flatten_meta(rule)
        jobs, steps = [], []
        for run in runs:
            steps.append(run.steps_left(unroll_steps))
            train, valid = run.draw_batches(steps[-1], self.meta_objective)
            jobs.append(UnrollJob(run.task, theta[None], run.params, run.state, train, valid))
        outcomes = run_jobs(
            rule, jobs, meta_objective=self.meta_objective, second_order=self.second_order, with_grad=True
        )
        rows, losses = [], []
        for run, outcome, count in zip(runs, outcomes, steps, strict=True):
            finite = bool(outcome.finite()[0])
            advance(run, index_tree(outcome.params, 0), index_tree(outcome.state, 0), count, finite)
            rows.append(outcome.grads[0].detach() if finite else torch.full_like(theta, math.nan))
            losses.append(float(outcome.meta_losses[0]))
        return _rows(rows, losses, steps)


def _flatten_grads(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> Tensor:
    """One flat vector of ``grads`` (zeros for unused parameters)."""
    if not params:
        return torch.zeros(0)
    pieces = [(torch.zeros_like(p) if g is None else g.detach()).reshape(-1) for g, p in zip(grads, params, strict=True)]
    return torch.cat(pieces)


def _rows(rows: list[Tensor], losses: list[float], inner: list[int]) -> RunEstimates:
    return RunEstimates(
        grads=torch.stack(rows) if rows else torch.zeros(0, 0),
        meta_losses=torch.tensor(losses, dtype=torch.float64),
        inner_steps=torch.tensor(inner, dtype=torch.int64),
    )


def gather_slot_rows(rows: RunEstimates, slots: list[int], num_slots: int, communicator: Communicator) -> RunEstimates:
    """The rows of all ``num_slots`` slots, on every process, from each process's rows for ``slots``.

    Each process writes its rows into a zero-filled ``(num_slots, D + 2)`` float64 buffer that is
    all-reduced; a sum of one value and zeros is exact, so every process gets the same rows
    bit for bit, whatever the number of processes.
    """
    if communicator.world_size == 1:
        return rows
    width = rows.grads.shape[1]
    packed = torch.zeros(num_slots, width + 2, dtype=torch.float64, device=rows.grads.device)
    index = torch.tensor(slots, device=rows.grads.device)
    packed[index, :width] = rows.grads.to(torch.float64)
    packed[index, width] = rows.meta_losses.to(packed)
    packed[index, width + 1] = rows.inner_steps.to(packed)
    total = communicator.all_reduce_sum(packed)
    return RunEstimates(
        grads=total[:, :width].to(rows.grads.dtype),
        meta_losses=total[:, width],
        inner_steps=total[:, width + 1].round().to(torch.int64),
    )


def meta_parameter_groups(rule: UpdateRule, meta_lr: float, scales: Mapping[str, float]) -> list[dict[str, Any]]:
    """Optimizer parameter groups of ``rule``'s meta-parameters: ``meta_lr`` times the scale of the
    longest prefix in ``scales`` that starts the parameter's name (1 when none does)."""
    named = meta_parameters(rule)
    for prefix, scale in scales.items():
        check_positive(f"meta_lr_scales[{prefix!r}]", scale)
        if not any(name.startswith(prefix) for name in named):
            raise ValueError(f"meta_lr_scales prefix {prefix!r} matches no meta-parameter; names: {list(named)}")
    by_length = sorted(scales.items(), key=lambda item: -len(item[0]))
    groups: dict[float, list[Tensor]] = {}
    for name, param in named.items():
        scale = next((s for prefix, s in by_length if name.startswith(prefix)), 1.0)
        groups.setdefault(scale, []).append(param)
    return [{"params": params, "lr": meta_lr * scale} for scale, params in groups.items()]


def slot_generator(seed: int, slot: int) -> torch.Generator:
    """The random generator of ``slot``: independent streams per (seed, slot)."""
    state = np.random.SeedSequence([seed, slot]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class MetaTrainer:
    """Meta-trains ``rule`` on tasks sampled from ``family``'s training split.

    Each meta-step advances ``tasks_per_step`` inner runs by one truncation of ``unroll_steps``
    inner steps; a run that reaches its horizon (``horizon`` steps, or with ``min_horizon`` a
    length drawn log-uniformly from [``min_horizon``, ``horizon``] per task, which staggers the
    runs' resets) is replaced by a freshly sampled task. The meta-gradient (from ``estimator``,
    truncated BPTT by default) is clipped to ``gradient_clipping`` in global norm and applied with
    Adam(``meta_lr``); ``meta_lr_scales`` maps name prefixes of meta-parameters to multipliers of
    ``meta_lr`` (the longest matching prefix wins), e.g. ``{"head": 0.1}`` to move an LSTM's output
    layer ten times slower than the rest. A step whose loss or meta-gradient is not finite is skipped (nothing
    applied, every run replaced) and counted in ``skipped_steps``.

    With a ``communicator`` of several processes, each process runs the slots
    ``rank, rank + world_size, ...`` and the meta-gradient rows of all slots are exchanged, so
    every process applies the same update (see :mod:`metaoptimizer.meta.distributed`).
    """

    def __init__(
        self,
        rule: UpdateRule,
        family: TaskFamily,
        *,
        meta_lr: float = 1e-3,
        unroll_steps: int = 20,
        horizon: int = 200,
        gradient_clipping: float | None = 1.0,
        tasks_per_step: int = 1,
        meta_objective: str = "train_loss",
        second_order: bool = False,
        seed: int = 0,
        estimator: GradientEstimator | None = None,
        min_horizon: int | None = None,
        communicator: Communicator | None = None,
        meta_lr_scales: Mapping[str, float] | None = None,
    ) -> None:
        check_positive("meta_lr", meta_lr)
        check_positive("unroll_steps", unroll_steps, integer=True)
        check_positive("horizon", horizon, integer=True)
        check_positive("tasks_per_step", tasks_per_step, integer=True)
        check_positive("seed", seed, integer=True, allow_zero=True)
        if gradient_clipping is not None:
            check_positive("gradient_clipping", gradient_clipping)
        if meta_objective not in META_OBJECTIVES:
            raise ValueError(f"meta_objective={meta_objective!r} is not supported; accepted values: {META_OBJECTIVES}")
        if min_horizon is not None:
            check_positive("min_horizon", min_horizon, integer=True)
            if min_horizon > horizon:
                raise ValueError(f"min_horizon ({min_horizon}) must be <= horizon ({horizon})")
        if not meta_parameters(rule):
            raise ValueError(f"rule {type(rule).__name__} has no trainable meta-parameters: there is nothing to meta-train")
        self.communicator = communicator or SingleProcess()
        if tasks_per_step < self.communicator.world_size:
            raise ValueError(
                f"tasks_per_step ({tasks_per_step}) must be >= the number of processes "
                f"({self.communicator.world_size}) so that every process runs at least one task"
            )
        self.rule = rule
        self.family = family
        self.unroll_steps = unroll_steps
        self.horizon = horizon
        self.min_horizon = min_horizon
        self.gradient_clipping = gradient_clipping
        self.tasks_per_step = tasks_per_step
        self.seed = seed
        self.estimator = estimator or TruncatedBPTT(meta_objective, second_order)
        self.meta_optimizer = torch.optim.Adam(meta_parameter_groups(rule, meta_lr, meta_lr_scales or {}))
        self.slots = list(range(self.communicator.rank, tasks_per_step, self.communicator.world_size))
        self.steps = 0
        self.skipped_steps = 0
        self.inner_steps = 0
        self.runs = [self._new_run(slot, slot_generator(seed, slot)) for slot in self.slots]

    def _sample_horizon(self, generator: torch.Generator) -> int:
        if self.min_horizon is None:
            return self.horizon
        low, high = math.log(self.min_horizon), math.log(self.horizon)
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        return min(self.horizon, max(self.min_horizon, round(math.exp(low + u * (high - low)))))

    def _new_run(self, slot: int, generator: torch.Generator) -> TaskRun:
        """A fresh task for ``slot``, drawn with the slot's generator."""
        task_index = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        seed = split_seed(TRAIN, task_index)
        task = self.family.sample(seed)
        return TaskRun.start(
            task, task_index, seed, task.init_params(seed), self.rule, self._sample_horizon(generator),
            slot=slot, generator=generator,
        )

    def _restore_run(self, saved: dict[str, Any]) -> TaskRun:
        task_index = saved["task_index"]
        seed = split_seed(TRAIN, task_index)
        task = self.family.sample(seed)
        generator = torch.Generator()
        generator.set_state(saved["generator"])
        return TaskRun(
            task=task,
            task_index=task_index,
            params=saved["params"],
            state=OptimizerState.from_dict(saved["state"]),
            train_batches=ReplayableBatches(task.train_batches, seed, saved["train_drawn"]),
            valid_batches=ReplayableBatches(task.valid_batches, seed, saved["valid_drawn"]),
            steps_done=saved["steps_done"],
            horizon=saved["horizon"],
            slot=saved["slot"],
            generator=generator,
            estimator_state=saved["estimator_state"],
            diverged=saved["diverged"],
        )

    def step(self) -> MetaOptTrainResult:
        """One meta-step: estimate, clip, apply (or skip when non-finite), replace finished runs."""
        local = self.estimator.estimate_runs(self.rule, self.runs, self.unroll_steps)
        rows = gather_slot_rows(local, self.slots, self.tasks_per_step, self.communicator)
        estimate = rows.mean(self.rule)
        self.inner_steps += estimate.inner_steps
        result = apply_estimate(
            self.meta_optimizer, list(meta_parameters(self.rule).values()), estimate, self.gradient_clipping,
            self.steps, self.skipped_steps,
        )
        self.steps, self.skipped_steps = result.steps, result.skipped_total
        # After a skipped step no run continues: their parameters may hold non-finite values.
        self.runs = [
            self._new_run(run.slot, run_generator(run)) if result.skipped or run.finished else run
            for run in self.runs
        ]
        return result

    def train(self, num_steps: int, callback: Callable[[MetaOptTrainResult], None] | None = None) -> list[MetaOptTrainResult]:
        """Run ``num_steps`` meta-steps, calling ``callback`` after each."""
        check_positive("num_steps", num_steps, integer=True)
        results = []
        for _ in range(num_steps):
            result = self.step()
            results.append(result)
            if callback is not None:
                callback(result)
        return results

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: rule, meta-optimizer, counters and every slot's run.

        With several processes this is a collective call: the runs of all processes are gathered,
        so every process returns the same, process-count-independent dict.
        """
        local = [
            {
                "slot": run.slot,
                "task_index": run.task_index,
                "params": run.params,
                "state": run.state.to_dict(),
                "train_drawn": run.train_batches.drawn,
                "valid_drawn": run.valid_batches.drawn,
                "steps_done": run.steps_done,
                "horizon": run.horizon,
                "generator": run_generator(run).get_state(),
                "estimator_state": run.estimator_state,
                "diverged": run.diverged,
            }
            for run in self.runs
        ]
        gathered = self.communicator.all_gather_object(local)
        return {
            "rule": self.rule.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "inner_steps": self.inner_steps,
            "runs": sorted((run for part in gathered for run in part), key=lambda run: run["slot"]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (from any number of processes) into this trainer's slots.

        The trainer keeps copies: it never shares tensors with ``state``.
        """
        state = copy.deepcopy(state)
        slots = [run["slot"] for run in state["runs"]]
        if slots != list(range(self.tasks_per_step)):
            raise ValueError(
                f"the state holds runs for slots {slots}, but this trainer has tasks_per_step={self.tasks_per_step}"
            )
        self.rule.load_state_dict(state["rule"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.steps = state["steps"]
        self.skipped_steps = state["skipped_steps"]
        self.inner_steps = state["inner_steps"]
        self.runs = [self._restore_run(state["runs"][slot]) for slot in self.slots]
