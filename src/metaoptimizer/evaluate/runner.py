"""Run update rules on tasks for a fixed budget and record their curves; run whole suites.

A run is the deployment loop: gradients from ``torch.autograd.grad`` on the task's loss, the
rule's ``update`` under ``torch.no_grad``, additive updates. Every run records the training loss
at every step and, every ``eval_every`` steps, the task's metrics (loss, accuracy) on a fixed set
of validation batches, at the rule's evaluation point (its parameters, or the averaged iterate of
a schedule-free optimizer, see :mod:`metaoptimizer.evaluate.torch_rule`). A run that produces a NaN/Inf loss is *diverged*: it stops there, its
training loss is ``+inf`` from that step on, and later evaluations score it as useless
(loss ``+inf``, accuracy 0, other metrics NaN). Nothing in a run raises because of divergence.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from metaoptimizer.config import check_positive
from metaoptimizer.evaluate import metrics
from metaoptimizer.evaluate.baselines import TUNERS, Baseline, TuningResult, make_baselines, tune_lr
from metaoptimizer.evaluate.cache import BaselineCache
from metaoptimizer.evaluate.suites import Suite, SuiteEntry
from metaoptimizer.meta.unroll import inner_step
from metaoptimizer.progress import Progress, ProgressCallback
from metaoptimizer.rules.base import UpdateRule
from metaoptimizer.tasks import make_family
from metaoptimizer.tasks.base import Batch, Task, TaskFamily

#: Builds a fresh (or shared, stateless) update rule; learned rules' factories return the loaded rule.
RuleFactory = Callable[[], UpdateRule]
#: ``(family name, keyword arguments) -> TaskFamily``; the default is ``metaoptimizer.tasks.make_family``.
FamilyFactory = Callable[..., TaskFamily]


@dataclass
class Curve:
    """One run's record.

    ``train_loss[k - 1]`` is the minibatch loss at step ``k`` (before update ``k``), ``+inf`` from
    ``diverged_at`` on. ``eval_steps`` are the numbers of updates applied at each evaluation and
    ``eval_metrics[name]`` the metric there (mean over the validation batches).
    """

    train_loss: np.ndarray
    eval_steps: np.ndarray
    eval_metrics: dict[str, np.ndarray]
    diverged_at: int | None
    seconds: float

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    def final(self, metric: str) -> float:
        """The metric at the last evaluation (NaN when the task does not report it)."""
        values = self.eval_metrics.get(metric)
        return float(values[-1]) if values is not None else math.nan


def _eval_schedule(steps: int, eval_every: int | None) -> list[int]:
    """Evaluate before training, every ``eval_every`` updates, and after the last update."""
    points = set(range(0, steps, eval_every)) if eval_every else {0}
    return sorted(points | {steps})


def _diverged_metrics(names: Sequence[str]) -> dict[str, float]:
    scores = {"loss": math.inf, "accuracy": 0.0}
    return {name: scores.get(name, math.nan) for name in names}


def _evaluate(task: Task, params: Mapping[str, torch.Tensor], batches: Sequence[Batch]) -> dict[str, float]:
    """Mean of the task's metrics over ``batches``; a non-finite loss reads as a diverged model."""
    per_batch = [task.metrics(params, batch) for batch in batches]
    result = {name: float(np.mean([m[name] for m in per_batch])) for name in per_batch[0]}
    return result if math.isfinite(result["loss"]) else _diverged_metrics(list(result))


def _evaluation_point(rule: UpdateRule, params: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Where to evaluate a rule's model: ``params``, unless the rule evaluates another point than
    it trains at (schedule-free averaging) and says so with ``evaluation_params(params)``."""
    evaluation_params = getattr(rule, "evaluation_params", None)
    return params if evaluation_params is None else evaluation_params(params)


def _to_device(batch: Batch, device: torch.device | str | None) -> Batch:
    return batch if device is None else tuple(t.to(device) for t in batch)


def run_rule(
    rule: UpdateRule,
    task: Task,
    *,
    steps: int,
    seed: int,
    eval_every: int | None = None,
    eval_batches: int = 1,
    device: torch.device | str | None = None,
) -> Curve:
    """Train ``task`` from ``init_params(seed)`` with ``rule`` for ``steps`` updates.

    ``seed`` also seeds the training and validation batch streams, so two rules run with the same
    seed see the same initialisation, the same batches and the same validation set (paired runs).
    """
    check_positive("steps", steps, integer=True)
    check_positive("seed", seed, integer=True, allow_zero=True)
    check_positive("eval_batches", eval_batches, integer=True)
    if eval_every is not None:
        check_positive("eval_every", eval_every, integer=True)
    started = time.perf_counter()
    if device is not None:
        rule = rule.to(device)
    params = {name: p.detach().to(device) for name, p in task.init_params(seed).items()}
    names = list(params)
    batches: Iterator[Batch] = task.train_batches(seed)
    valid = [_to_device(b, device) for b in itertools.islice(task.valid_batches(seed), eval_batches)]
    schedule = set(_eval_schedule(steps, eval_every))
    train_loss = np.full(steps, np.inf)
    evaluations: dict[int, dict[str, float]] = {}
    diverged_at = None
    with torch.no_grad():
        state = rule.init(params, num_steps=steps)
    for step in range(1, steps + 1):
        if step - 1 in schedule:
            evaluations[step - 1] = _evaluate(task, _evaluation_point(rule, params), valid)
        leaves = [params[name].requires_grad_(True) for name in names]
        with torch.enable_grad():
            loss = task.loss(params, _to_device(next(batches), device))
            grads = torch.autograd.grad(loss, leaves, materialize_grads=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            diverged_at = step
            break
        train_loss[step - 1] = value
        with torch.no_grad():
            detached = {name: p.detach() for name, p in params.items()}
            params, state = inner_step(rule.update, detached, state, dict(zip(names, grads, strict=True)), loss)
    if diverged_at is None:
        evaluations[steps] = _evaluate(task, _evaluation_point(rule, params), valid)
    metric_names = list(next(iter(evaluations.values())))
    eval_steps = np.array(sorted(schedule), dtype=np.int64)
    eval_metrics = {
        name: np.array([evaluations.get(s, _diverged_metrics(metric_names))[name] for s in eval_steps])
        for name in metric_names
    }
    return Curve(train_loss, eval_steps, eval_metrics, diverged_at, time.perf_counter() - started)


def run_seeds(
    factory: RuleFactory,
    task: Task,
    *,
    steps: int,
    seeds: Sequence[int],
    eval_every: int | None = None,
    eval_batches: int = 1,
    device: torch.device | str | None = None,
    on_run: Callable[[], None] | None = None,
) -> list[Curve]:
    """One :func:`run_rule` per seed with a rule from ``factory``; ``on_run`` is called after each."""
    if len(seeds) == 0:
        raise ValueError("seeds must name at least one seed")
    curves = []
    for seed in seeds:
        curves.append(
            run_rule(factory(), task, steps=steps, seed=seed, eval_every=eval_every, eval_batches=eval_batches,
                     device=device)
        )
        if on_run is not None:
            on_run()
    return curves


@dataclass(frozen=True)
class Comparison:
    """One optimizer against the tuned reference baseline on one task.

    Loss ratios are ``optimizer / reference`` (below 1 is better), the accuracy ratio likewise
    (above 1 is better; NaN when the task reports no accuracy). Final values are the seed-mean
    smoothed training loss at the last step and the seed-mean validation metrics at the last
    evaluation.
    """

    speedup: metrics.Speedup
    final_train_loss: float
    final_valid_loss: float
    final_accuracy: float
    train_loss_ratio: float
    valid_loss_ratio: float
    accuracy_ratio: float
    diverged_seeds: int


def _final_eval(curves: Sequence[Curve], metric: str) -> float:
    return float(np.mean([c.final(metric) for c in curves]))


def compare(curves: Sequence[Curve], reference: TuningResult, window: int) -> Comparison:
    """Compare an optimizer's per-seed ``curves`` with the tuned ``reference`` baseline."""
    mean_curve = metrics.seed_mean([c.train_loss for c in curves], window)
    best = reference.runs[reference.best_lr]
    reference_train = float(reference.mean_curves[reference.best_lr][-1])
    values = {metric: _final_eval(curves, metric) for metric in ("loss", "accuracy")}
    reference_values = {metric: _final_eval(best, metric) for metric in ("loss", "accuracy")}
    return Comparison(
        speedup=metrics.speedup(reference.envelope(), mean_curve),
        final_train_loss=float(mean_curve[-1]),
        final_valid_loss=values["loss"],
        final_accuracy=values["accuracy"],
        train_loss_ratio=metrics.ratio(mean_curve[-1], reference_train),
        valid_loss_ratio=metrics.ratio(values["loss"], reference_values["loss"]),
        accuracy_ratio=metrics.ratio(values["accuracy"], reference_values["accuracy"]),
        diverged_seeds=sum(c.diverged for c in curves),
    )


@dataclass
class TaskResult:
    """Everything measured on one task of a suite: the evaluated optimizers' curves, every
    baseline's tuning runs, and each optimizer's (and non-reference baseline's) comparison."""

    entry: SuiteEntry
    index: int
    task_name: str
    window: int
    optimizers: dict[str, list[Curve]]
    baselines: dict[str, TuningResult]
    comparisons: dict[str, Comparison]

    def runs(self, name: str) -> list[Curve]:
        """The per-seed runs of optimizer ``name``, or of baseline ``name`` at its tuned learning rate."""
        if name in self.optimizers:
            return self.optimizers[name]
        tuning = self.baselines[name]
        return tuning.runs[tuning.best_lr]

    def names(self) -> list[str]:
        """Every optimizer's and baseline's name."""
        return [*self.optimizers, *self.baselines]

    def final_loss(self, name: str, metric: str) -> float:
        """``name``'s final loss: ``'train'`` (seed-mean smoothed training loss at the last step)
        or ``'valid'`` (seed-mean validation loss at the last evaluation)."""
        runs = self.runs(name)
        if metric == "train":
            return float(metrics.seed_mean([c.train_loss for c in runs], self.window)[-1])
        if metric == "valid":
            return _final_eval(runs, "loss")
        raise ValueError(f"metric={metric!r} is not supported; accepted values: ('train', 'valid')")

    def seconds_per_step(self, name: str) -> float:
        """Mean wall time of ``name``'s runs per step (gradients, updates and evaluations)."""
        return float(np.mean([c.seconds for c in self.runs(name)])) / self.entry.steps

    def time_ratio(self, name: str, reference: str) -> float:
        """``name``'s seconds per step over the mean of ``reference``'s runs at every learning rate."""
        tuning = self.baselines[reference]
        seconds = np.mean([c.seconds for lr in tuning.lrs for c in tuning.runs[lr]]) / self.entry.steps
        return metrics.ratio(self.seconds_per_step(name), seconds)


@dataclass
class SuiteResult:
    """A suite's per-task results and the median / IQM of every comparison over its tasks."""

    suite: Suite
    reference: str
    window_fraction: float
    tuner: str
    tasks: list[TaskResult] = field(default_factory=list)
    seconds: float = 0.0

    def compared(self) -> list[str]:
        """Names of everything compared with the reference: optimizers first, then baselines."""
        names: dict[str, None] = {}
        for task in self.tasks:
            names.update(dict.fromkeys(task.comparisons))
        return list(names)

    def groups(self) -> list[str]:
        """The suite's entry groups (each entry is its own group unless the suite groups them)."""
        return self.suite.groups()

    def tasks_of(self, group: str | None = None) -> list[TaskResult]:
        """The tasks of ``group``, or all of them."""
        return [t for t in self.tasks if group is None or t.entry.group == group]

    def summary(self, group: str | None = None) -> dict[str, dict[str, metrics.Summary]]:
        """Median and IQM over tasks (of ``group``, or of the whole suite) of every comparison
        figure per compared name, and of its wall time per step relative to the reference."""
        tasks = self.tasks_of(group)
        table = {}
        for name in self.compared():
            rows = [task.comparisons[name] for task in tasks if name in task.comparisons]
            table[name] = {
                "speedup": metrics.summarize([r.speedup.value for r in rows]),
                "train_loss_ratio": metrics.summarize([r.train_loss_ratio for r in rows]),
                "valid_loss_ratio": metrics.summarize([r.valid_loss_ratio for r in rows]),
                "accuracy_ratio": metrics.summarize([r.accuracy_ratio for r in rows]),
                "time_ratio": metrics.summarize(
                    [t.time_ratio(name, self.reference) for t in tasks if name in t.comparisons]),
            }
        return table

    def beat_fractions(self, metric: str, group: str | None = None) -> dict[str, dict[str, float]]:
        """``table[a][b]``: the fraction of tasks (of ``group``, or all) on which ``a``'s final
        ``metric`` loss (``'train'`` or ``'valid'``, see :meth:`TaskResult.final_loss`) is strictly
        below ``b``'s, for every optimizer ``a`` and baseline ``b``; a tie (both diverged) is no win."""
        tasks = self.tasks_of(group)
        names = list(dict.fromkeys(name for t in tasks for name in t.names()))
        baselines = list(dict.fromkeys(name for t in tasks for name in t.baselines))
        table = {}
        for a in names:
            table[a] = {}
            for b in baselines:
                pairs = [(t.final_loss(a, metric), t.final_loss(b, metric)) for t in tasks
                         if a in t.names() and b in t.baselines]
                table[a][b] = sum(x < y for x, y in pairs) / len(pairs) if pairs and a != b else math.nan
        return table

    def headline(self, name: str) -> dict[str, Any]:
        """The figures a benchmark quotes for ``name``: speedup median and IQM, per-task speedups,
        the number of tasks whose target it reached, and the median final train-loss ratio."""
        figures = self.summary()[name]
        rows = [task.comparisons[name] for task in self.tasks if name in task.comparisons]
        return {
            "median": figures["speedup"].median, "iqm": figures["speedup"].iqm,
            "per_task": [round(r.speedup.value, 3) for r in rows], "reached": sum(r.speedup.reached for r in rows),
            "tasks": len(rows), "final_train_loss_ratio_median": figures["train_loss_ratio"].median,
        }

    def headline_line(self, name: str) -> str:
        """:meth:`headline` as one printable line."""
        h = self.headline(name)
        return (f"{name}: speedup median {h['median']:.3f}  IQM {h['iqm']:.3f}  target reached on {h['reached']}/"
                f"{h['tasks']} tasks  final train loss / reference's (median) "
                f"{h['final_train_loss_ratio_median']:.3f}  per task {h['per_task']}")


def _cache_key(
    task: Task, baseline: Baseline, entry: SuiteEntry, tuner: str, trials: int, window: int,
    device: torch.device | str | None,
) -> dict[str, Any]:
    """Everything that determines ``baseline``'s tuning runs on ``task`` (see :class:`BaselineCache`)."""
    return {
        "task": task.name, "baseline": baseline.name, "lrs": list(baseline.lrs), "tuner": tuner,
        "trials": trials if tuner == "optuna" else None, "steps": entry.steps, "seeds": list(entry.seeds),
        "eval_every": entry.eval_every, "eval_batches": entry.eval_batches, "window": window,
        "device": str(device or "cpu"),
    }


class _RunCounter:
    """Counts a suite's runs and reports each to ``progress`` (if any) under the current task's label."""

    def __init__(self, progress: ProgressCallback | None, total: int, label: str) -> None:
        self.progress, self.total, self.label, self.done = progress, total, label, 0

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self.progress is not None:
            self.progress(Progress(self.label, self.done, self.total))


def run_suite(
    suite: Suite,
    optimizers: Mapping[str, RuleFactory],
    *,
    baselines: Sequence[Baseline] | None = None,
    reference: str = "adam",
    tuner: str = "grid",
    trials: int = 12,
    window_fraction: float = metrics.DEFAULT_WINDOW_FRACTION,
    family_factory: FamilyFactory | None = None,
    device: torch.device | str | None = None,
    progress: ProgressCallback | None = None,
    cache: BaselineCache | str | os.PathLike | None = None,
) -> SuiteResult:
    """Run ``optimizers`` and the learning-rate-tuned ``baselines`` on every task of ``suite``.

    ``baselines`` default to the suite's baseline set. Baselines are tuned on each evaluated task itself, with the suite's seeds (the protocol of
    learned_optimization; it gives the baseline the advantage). ``reference`` names the baseline
    that sets the target (tuned Adam by default); every optimizer and every other baseline (at
    its tuned learning rate) is compared with it. The smoothing window is ``window_fraction`` of
    each entry's step budget (at least one step). ``tuner`` is ``'grid'`` (each baseline's grid)
    or ``'optuna'`` (``trials`` TPE trials in the grid's range). ``progress`` hears of every run.
    ``cache`` (a :class:`BaselineCache` or its folder) reuses baselines tuned by earlier calls.
    """
    if cache is not None and not isinstance(cache, BaselineCache):
        cache = BaselineCache(cache)
    baselines = list(make_baselines(suite.baselines) if baselines is None else baselines)
    names = [b.name for b in baselines]
    if reference not in names:
        raise ValueError(f"reference={reference!r} is not among the baselines {names}")
    if not optimizers and len(names) == 1:
        raise ValueError(f"nothing to compare with {reference!r}: pass optimizers or more baselines")
    clash = sorted(set(optimizers) & set(names))
    if clash:
        raise ValueError(f"optimizer names {clash} clash with baseline names; rename them")
    metrics.smoothing_window(1, window_fraction)  # rejects a bad fraction before any run
    build_family = family_factory or make_family
    if tuner not in TUNERS:
        raise ValueError(f"tuner={tuner!r} is not supported; accepted values: {TUNERS}")
    started = time.perf_counter()
    result = SuiteResult(suite=suite, reference=reference, window_fraction=window_fraction, tuner=tuner)
    tuning_runs = lambda b: len(b.lrs) if tuner == "grid" else trials  # noqa: E731  (configurations per seed)
    configs_per_task = len(optimizers) + sum(tuning_runs(b) for b in baselines)
    total = sum(len(e.task_indices) * len(e.seeds) * configs_per_task for e in suite.entries)
    runs = _RunCounter(progress, total, f"suite {suite.name}")
    for entry in suite.entries:
        family = build_family(entry.family, **entry.kwargs)
        window = metrics.smoothing_window(entry.steps, window_fraction)
        for index in entry.task_indices:
            task = family.task(index, entry.split)
            runs.label = f"{suite.name}: {entry.label} #{index}"

            def run(factory: RuleFactory, task: Task = task, entry: SuiteEntry = entry) -> list[Curve]:
                return run_seeds(
                    factory, task, steps=entry.steps, seeds=entry.seeds, eval_every=entry.eval_every,
                    eval_batches=entry.eval_batches, device=device, on_run=runs.advance,
                )

            tuned = {}
            for b in baselines:
                key = _cache_key(task, b, entry, tuner, trials, window, device)
                cached = cache.lookup(key) if cache is not None else None
                if cached is not None:
                    runs.advance(len(entry.seeds) * tuning_runs(b))  # runs it did not have to make
                    tuned[b.name] = cached
                    continue
                tuned[b.name] = tune_lr(b, run, window=window, method=tuner, trials=trials)
                if cache is not None:
                    cache.store(key, tuned[b.name])
            curves = {name: run(factory) for name, factory in optimizers.items()}
            ref = tuned[reference]
            comparisons = {name: compare(c, ref, window) for name, c in curves.items()}
            comparisons.update(
                {name: compare(t.runs[t.best_lr], ref, window) for name, t in tuned.items() if name != reference}
            )
            result.tasks.append(TaskResult(entry, index, task.name, window, curves, tuned, comparisons))
    result.seconds = time.perf_counter() - started
    return result
