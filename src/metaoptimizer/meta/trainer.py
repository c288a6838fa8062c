"""Meta-training: truncated BPTT over a task family, with clipping and non-finite step skipping."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from metaoptimizer.config import META_OBJECTIVES, MetaOptTrainResult, OptimizerState, check_positive
from metaoptimizer.meta.unroll import detach_params, unroll
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


@dataclass
class TaskRun:
    """One inner training run in progress: a task, its current parameters and rule state."""

    task: Task
    task_index: int
    params: Params
    state: OptimizerState
    train_batches: ReplayableBatches
    valid_batches: ReplayableBatches
    steps_done: int
    horizon: int

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.horizon


@dataclass
class Estimate:
    """A meta-gradient estimate: one entry per rule parameter (None where unused)."""

    grads: list[Tensor | None]
    meta_loss: float
    finite: bool
    inner_steps: int


class GradientEstimator(Protocol):
    """Turns unrolls of the runs into a meta-gradient, advancing each run."""

    def estimate(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> Estimate: ...


@dataclass
class TruncatedBPTT:
    """Backpropagation through each truncation of ``unroll_steps``; the graph is cut between them."""

    meta_objective: str = "train_loss"
    second_order: bool = False

    def estimate(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> Estimate:
        meta_params = [p for p in rule.parameters() if p.requires_grad]
        total: Tensor | None = None
        losses, finite, inner = [], True, 0
        for run in runs:
            steps = min(unroll_steps, run.horizon - run.steps_done)
            result = unroll(
                rule,
                run.task,
                detach_params(run.params),
                run.state.detach(),
                run.train_batches,
                steps,
                second_order=self.second_order,
                meta_objective=self.meta_objective,
                valid_batches=run.valid_batches,
            )
            run.params = {n: p.detach() for n, p in result.params.items()}
            run.state = result.state.detach()
            run.steps_done += steps
            inner += steps
            losses.append(float(result.meta_loss.detach()))
            finite = finite and result.finite
            if result.finite:
                total = result.meta_loss if total is None else total + result.meta_loss
        if total is None or not finite:
            return Estimate([None] * len(meta_params), _mean(losses), False, inner)
        grads = torch.autograd.grad(total / len(runs), meta_params, allow_unused=True)
        return Estimate(list(grads), _mean(losses), True, inner)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def global_norm(grads: list[Tensor | None]) -> float:
    """Euclidean norm over all gradient tensors (NaN/Inf propagate)."""
    present = [g for g in grads if g is not None]
    if not present:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present])))


class MetaTrainer:
    """Meta-trains ``rule`` on tasks sampled from ``family``'s training split.

    Each meta-step advances ``tasks_per_step`` inner runs by one truncation of ``unroll_steps``
    inner steps; a run that reaches ``horizon`` steps is replaced by a freshly sampled task.
    The meta-gradient (from ``estimator``, truncated BPTT by default) is clipped to
    ``gradient_clipping`` in global norm and applied with Adam(``meta_lr``). A step whose loss or
    meta-gradient is not finite is skipped (nothing applied) and counted in ``skipped_steps``.
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
    ) -> None:
        check_positive("meta_lr", meta_lr)
        check_positive("unroll_steps", unroll_steps, integer=True)
        check_positive("horizon", horizon, integer=True)
        check_positive("tasks_per_step", tasks_per_step, integer=True)
        if gradient_clipping is not None:
            check_positive("gradient_clipping", gradient_clipping)
        if meta_objective not in META_OBJECTIVES:
            raise ValueError(f"meta_objective={meta_objective!r} is not supported; accepted values: {META_OBJECTIVES}")
        self.rule = rule
        self.family = family
        self.unroll_steps = unroll_steps
        self.horizon = horizon
        self.gradient_clipping = gradient_clipping
        self.seed = seed
        self.estimator = estimator or TruncatedBPTT(meta_objective, second_order)
        self.meta_optimizer = torch.optim.Adam([p for p in rule.parameters() if p.requires_grad], lr=meta_lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.skipped_steps = 0
        self.inner_steps = 0
        self.runs = [self._new_run() for _ in range(tasks_per_step)]

    def _new_run(self, task_index: int | None = None, run_state: dict[str, Any] | None = None) -> TaskRun:
        if task_index is None:
            task_index = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        task = self.family.sample(split_seed(TRAIN, task_index))
        seed = split_seed(TRAIN, task_index)
        if run_state is None:
            params = task.init_params(seed)
            return TaskRun(
                task=task,
                task_index=task_index,
                params=params,
                state=self.rule.init(params),
                train_batches=ReplayableBatches(task.train_batches, seed),
                valid_batches=ReplayableBatches(task.valid_batches, seed),
                steps_done=0,
                horizon=self.horizon,
            )
        return TaskRun(
            task=task,
            task_index=task_index,
            params=run_state["params"],
            state=OptimizerState.from_dict(run_state["state"]),
            train_batches=ReplayableBatches(task.train_batches, seed, run_state["train_drawn"]),
            valid_batches=ReplayableBatches(task.valid_batches, seed, run_state["valid_drawn"]),
            steps_done=run_state["steps_done"],
            horizon=run_state["horizon"],
        )

    def step(self) -> MetaOptTrainResult:
        """One meta-step: estimate, clip, apply (or skip when non-finite), replace finished runs."""
        estimate = self.estimator.estimate(self.rule, self.runs, self.unroll_steps)
        self.inner_steps += estimate.inner_steps
        norm = global_norm(estimate.grads)
        skipped = not (estimate.finite and math.isfinite(norm) and math.isfinite(estimate.meta_loss))
        if skipped:
            self.skipped_steps += 1
            # A run that produced non-finite values cannot continue from its current parameters.
            self.runs = [self._new_run() for _ in self.runs]
        else:
            scale = 1.0
            if self.gradient_clipping is not None and norm > self.gradient_clipping:
                scale = self.gradient_clipping / (norm + 1e-12)
            params = [p for p in self.rule.parameters() if p.requires_grad]
            for p, g in zip(params, estimate.grads, strict=True):
                p.grad = None if g is None else g * scale
            self.meta_optimizer.step()
            self.meta_optimizer.zero_grad(set_to_none=True)
            self.steps += 1
            self.runs = [self._new_run() if run.finished else run for run in self.runs]
        return MetaOptTrainResult(
            meta_loss=estimate.meta_loss,
            meta_grad_norm=norm,
            skipped=skipped,
            steps=self.steps,
            skipped_total=self.skipped_steps,
            inner_steps=estimate.inner_steps,
        )

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
        """Everything needed to continue exactly: rule, meta-optimizer, counters, RNG and inner runs."""
        return {
            "rule": self.rule.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "inner_steps": self.inner_steps,
            "runs": [
                {
                    "task_index": run.task_index,
                    "params": run.params,
                    "state": run.state.to_dict(),
                    "train_drawn": run.train_batches.drawn,
                    "valid_drawn": run.valid_batches.drawn,
                    "steps_done": run.steps_done,
                    "horizon": run.horizon,
                }
                for run in self.runs
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state["rule"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.generator.set_state(state["generator"])
        self.steps = state["steps"]
        self.skipped_steps = state["skipped_steps"]
        self.inner_steps = state["inner_steps"]
        self.runs = [self._new_run(run["task_index"], run) for run in state["runs"]]
