"""Hand-designed baselines with a learning rate tuned on a log grid (or by Optuna's TPE sampler).

A :class:`Baseline` is a name, ``lr -> UpdateRule`` and a learning-rate grid. :func:`tune_lr`
runs every grid point through a caller-given ``run`` function (one curve per seed) and keeps all
of the runs: the best learning rate is the one whose seed-mean smoothed training loss reaches the
lowest value within the budget, and the lower envelope over all of them is the tuned baseline
that sets steps-to-target targets (see :mod:`metaoptimizer.evaluate.metrics`).

The ``general`` suite compares against what users run instead (:func:`general_baselines`):
Adam at its default learning rate, tuned Adam, AdamW with warmup-cosine tuned, Prodigy and
schedule-free AdamW at their defaults. An untuned optimizer is a baseline with a one-point grid.

Where to tune: :func:`metaoptimizer.evaluate.runner.run_suite` tunes on each evaluated task
itself, with the same seeds that are evaluated. This is the protocol of learned_optimization
(learning rate tuned per task for Adam) and it favours the baseline: a learned optimizer gets no
per-task tuning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from torch import Tensor

from metaoptimizer._validation import check_positive
from metaoptimizer.evaluate import metrics
from metaoptimizer.rules.base import Params, UpdateRule
from metaoptimizer.rules.combine import chain
from metaoptimizer.rules.hand import Adam, AdamW, Momentum, RMSProp
from metaoptimizer.rules.state import OptimizerState
from metaoptimizer.schedules import warmup_cosine

if TYPE_CHECKING:
    from metaoptimizer.evaluate.runner import Curve

TUNERS = ("grid", "optuna")


def log_grid(low: float, high: float, per_decade: int = 2) -> tuple[float, ...]:
    """Log-spaced values from ``low`` to ``high`` inclusive, ``per_decade`` points per factor of 10."""
    check_positive("low", low)
    check_positive("high", high)
    check_positive("per_decade", per_decade, integer=True)
    if high < low:
        raise ValueError(f"high must be >= low, got low={low!r}, high={high!r}")
    count = round(math.log10(high / low) * per_decade) + 1
    return tuple(float(v) for v in np.geomspace(low, high, count))


@dataclass(frozen=True)
class Baseline:
    """A hand-designed rule family indexed by its learning rate, with the grid to tune it on."""

    name: str
    make_rule: Callable[[float], UpdateRule]
    lrs: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.lrs:
            raise ValueError(f"baseline {self.name!r} needs at least one learning rate")
        for lr in self.lrs:
            check_positive(f"{self.name} learning rate", lr)


def default_baselines() -> list[Baseline]:
    """Adam, SGD with heavy-ball momentum 0.9 and RMSProp, each on a 2-per-decade log grid.

    Adam and RMSProp: 1e-4 ... 1e-0.5 (about 0.32); momentum: 1e-3 ... 1e0.5 (about 3.2), since its
    steps scale with the gradient's size. Every grid spans 3.5 decades (8 points).
    """
    adaptive = log_grid(1e-4, 10**-0.5)
    return [
        Baseline("adam", lambda lr: Adam(lr=lr), adaptive),
        Baseline("momentum", lambda lr: Momentum(lr=lr, momentum=0.9), log_grid(1e-3, 10**0.5)),
        Baseline("rmsprop", lambda lr: RMSProp(lr=lr), adaptive),
    ]


class ScaleByWarmupCosine(UpdateRule):
    """Chain member: updates times a linear warmup over ``warmup_fraction`` of the run's budget
    (``state.num_steps``) then a cosine decay to 0 at its end
    (:func:`metaoptimizer.schedules.warmup_cosine`), the schedule a user sets knowing the number of
    steps: ``chain(AdamW(lr), ScaleByWarmupCosine())`` is AdamW with that schedule on its lr."""

    name = "scale_by_warmup_cosine"
    budget_aware = True

    def __init__(self, warmup_fraction: float = 0.05) -> None:
        super().__init__()
        if not 0.0 < warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must lie in (0, 1), got {warmup_fraction!r}")
        self.warmup_fraction = warmup_fraction

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        num_steps = self.resolve_num_steps(num_steps)
        if num_steps < 2:
            raise ValueError(f"a warmup-cosine schedule needs a budget of at least 2 steps, got num_steps={num_steps}")
        return OptimizerState(num_steps=num_steps)

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        step, state = self.begin_update(grads, state, params, loss)
        total = state.num_steps
        factor = warmup_cosine(max(1, round(self.warmup_fraction * total)), total)(state.schedule_step())
        return {name: u * factor for name, u in grads.items()}, state.replace(step_count=step)


def general_baselines() -> list[Baseline]:
    """What users run instead of a learned optimizer: ``adam`` (tuned, the reference),
    ``adam-default`` (lr 1e-3, the untuned user), ``adamw-warmup-cosine`` (weight decay 0.01,
    warmup over 5% of the budget then cosine to 0, lr tuned on Adam's grid), and, at their own
    defaults, ``prodigy`` (learning-rate-free, ``prodigyopt``) and ``schedule-free-adamw``
    (``schedulefree``, evaluated at its averaged iterate). The last two need the optional
    dependency ``metaoptimizer[baselines]``."""
    try:
        from prodigyopt import Prodigy
        from schedulefree import AdamWScheduleFree
    except ImportError as err:
        raise ImportError("the general baselines need Prodigy and schedule-free AdamW: "
                          "pip install 'metaoptimizer[baselines]'") from err
    from metaoptimizer.evaluate.torch_rule import TorchOptimizerRule

    adaptive = log_grid(1e-4, 10**-0.5)
    return [
        Baseline("adam", lambda lr: Adam(lr=lr), adaptive),
        Baseline("adam-default", lambda lr: Adam(lr=lr), (1e-3,)),
        Baseline("adamw-warmup-cosine", lambda lr: chain(AdamW(lr=lr), ScaleByWarmupCosine()), adaptive),
        Baseline("prodigy", lambda lr: TorchOptimizerRule(Prodigy, lr=lr), (1.0,)),
        Baseline("schedule-free-adamw", lambda lr: TorchOptimizerRule(AdamWScheduleFree, lr=lr), (0.0025,)),
    ]


#: Named baseline sets; a suite names the one it is compared against.
BASELINE_SETS = {"default": default_baselines, "general": general_baselines}


def make_baselines(name: str) -> list[Baseline]:
    """The baseline set called ``name`` (a key of :data:`BASELINE_SETS`)."""
    if name not in BASELINE_SETS:
        raise ValueError(f"unknown baseline set {name!r}; accepted names: {', '.join(map(repr, BASELINE_SETS))}")
    return BASELINE_SETS[name]()


@dataclass
class TuningResult:
    """Every learning rate tried for one baseline on one task, in the order tried.

    ``runs[lr]`` are its per-seed curves, ``mean_curves[lr]`` their seed-mean smoothed training
    loss, ``best_lr`` the learning rate whose mean curve reaches the lowest loss.
    """

    name: str
    window: int
    runs: dict[float, list[Curve]] = field(default_factory=dict)
    mean_curves: dict[float, np.ndarray] = field(default_factory=dict)

    def add(self, lr: float, curves: list[Curve]) -> float:
        """Record the runs of ``lr``; returns its objective (the best smoothed seed-mean loss)."""
        self.runs[lr] = curves
        self.mean_curves[lr] = metrics.seed_mean([c.train_loss for c in curves], self.window)
        return self.objective(lr)

    def objective(self, lr: float) -> float:
        return float(self.mean_curves[lr].min())

    @property
    def lrs(self) -> list[float]:
        return sorted(self.runs)

    @property
    def best_lr(self) -> float:
        if not self.runs:
            raise ValueError(f"no learning rate of {self.name!r} has been run yet")
        return min(self.lrs, key=self.objective)

    def envelope(self) -> np.ndarray:
        """Lower envelope of the seed-mean curves over every learning rate tried."""
        return metrics.lower_envelope([self.mean_curves[lr] for lr in self.lrs])


RunFn = Callable[[Callable[[], UpdateRule]], list["Curve"]]


def tune_lr(
    baseline: Baseline,
    run: RunFn,
    *,
    window: int,
    method: str = "grid",
    trials: int = 12,
    seed: int = 0,
) -> TuningResult:
    """Tune ``baseline``'s learning rate; ``run(factory)`` returns one curve per seed.

    ``method='grid'`` tries every learning rate of ``baseline.lrs``. ``method='optuna'`` runs
    ``trials`` trials of Optuna's TPE sampler (seeded by ``seed``), log-uniform over the grid's
    range; it needs the optional dependency ``metaoptimizer[tune]``.
    """
    if method not in TUNERS:
        raise ValueError(f"method={method!r} is not supported; accepted values: {TUNERS}")
    check_positive("window", window, integer=True)
    result = TuningResult(baseline.name, window)
    if method == "grid":
        for lr in baseline.lrs:
            result.add(lr, run(lambda lr=lr: baseline.make_rule(lr)))
        return result
    check_positive("trials", trials, integer=True)
    try:
        import optuna
    except ImportError as err:  # pragma: no cover - optuna is a dev dependency, so tests always have it
        raise ImportError("method='optuna' needs Optuna: pip install 'metaoptimizer[tune]'") from err
    low, high = min(baseline.lrs), max(baseline.lrs)
    if low == high:
        raise ValueError(f"method='optuna' needs a range of learning rates; {baseline.name!r} has only {low!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", low, high, log=True)
        return result.add(lr, run(lambda: baseline.make_rule(lr)))

    study.optimize(objective, n_trials=trials)
    return result
