"""Learning-rate schedules: pure functions of the step, a learned schedule, and their adapters.

A schedule maps a step index (0 for the first update, like ``LRScheduler.last_epoch``) to a
multiplicative *factor* of a base learning rate. The hand-designed schedules are frozen
dataclasses whose ``__call__`` is a pure function of the step; their factor arguments may be
tensors, in which case the result is a tensor differentiable in them. :class:`LearnedSchedule` is
an ``nn.Module`` (a positive piecewise-linear curve over the training fraction) whose parameters
are meta-trained through unrolls. :class:`ScheduleLR` drives a ``torch.optim`` optimizer's
learning rate with any schedule; :func:`metaoptimizer.rules.transforms.scale_by_schedule` scales a
functional rule's updates.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from metaoptimizer._validation import check_positive, check_unit_interval

Factor = float | Tensor
Schedule = Callable[[int], Factor]
CYCLIC_MODES = ("triangular", "triangular2", "exp_range")
WARMUPS = ("linear", "exponential")


def check_step(step: Any) -> int:
    """Return ``step`` as an int, or raise a clear error unless it is an integer >= 0."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer, got {type(step).__name__} {step!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0 (0 is the first update), got {step}")
    return int(step)


def _as_number(name: str, value: Any) -> float:
    """``value`` (a number, or a one-element floating tensor) as a float, or a clear TypeError."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{name} must be a number or a one-element floating tensor, got shape {tuple(value.shape)}")
        return float(value.detach())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a number or a one-element floating tensor, got {type(value).__name__}")


def _check_factor(name: str, value: Any, *, low: float, high: float = math.inf, open_low: bool = False) -> None:
    """Raise unless ``value`` (a number, or a one-element floating tensor) lies in its interval.

    The interval is ``[low, high]``, or ``(low, high]`` with ``open_low``. Tensors are accepted so
    that factors can be meta-parameters; their current value is checked once, at construction.
    """
    number = _as_number(name, value)
    too_low = number <= low if open_low else number < low
    if math.isnan(number) or too_low or number > high:
        interval = f"{'(' if open_low else '['}{low}, {high}]"
        raise ValueError(f"{name} must lie in {interval}, got {number!r}")


def _cosine(progress: float) -> float:
    """Half-cosine from 1 (progress 0) to 0 (progress 1)."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LinearWarmup:
    """Rises linearly from ``start_factor`` at step 0 to 1 at ``warmup_steps``, then stays at 1."""

    warmup_steps: int
    start_factor: Factor = 0.0

    def __post_init__(self) -> None:
        check_positive("warmup_steps", self.warmup_steps, integer=True)
        _check_factor("start_factor", self.start_factor, low=0.0, high=1.0)

    def __call__(self, step: int) -> Factor:
        progress = min(check_step(step), self.warmup_steps) / self.warmup_steps
        return self.start_factor + (1.0 - self.start_factor) * progress


@dataclass(frozen=True)
class ExponentialWarmup:
    """Rises geometrically from ``start_factor`` at step 0 to 1 at ``warmup_steps``, then stays at 1."""

    warmup_steps: int
    start_factor: Factor = 0.01

    def __post_init__(self) -> None:
        check_positive("warmup_steps", self.warmup_steps, integer=True)
        _check_factor("start_factor", self.start_factor, low=0.0, high=1.0, open_low=True)

    def __call__(self, step: int) -> Factor:
        progress = min(check_step(step), self.warmup_steps) / self.warmup_steps
        return self.start_factor ** (1.0 - progress)


@dataclass(frozen=True)
class CosineDecay:
    """Half-cosine from 1 at step 0 to ``min_factor`` at ``total_steps``, then ``min_factor``."""

    total_steps: int
    min_factor: Factor = 0.0

    def __post_init__(self) -> None:
        check_positive("total_steps", self.total_steps, integer=True)
        _check_factor("min_factor", self.min_factor, low=0.0, high=1.0)

    def __call__(self, step: int) -> Factor:
        progress = min(check_step(step), self.total_steps) / self.total_steps
        return self.min_factor + (1.0 - self.min_factor) * _cosine(progress)


@dataclass(frozen=True)
class CosineRestarts:
    """Cosine decay with warm restarts (SGDR, Loshchilov & Hutter 2017).

    The first cycle lasts ``period`` steps and each next one ``period_mult`` times longer; within a
    cycle the factor falls from its peak to ``min_factor``. The peak of cycle ``i`` (from 0) is
    ``restart_decay ** i``, so ``restart_decay < 1`` makes each restart lower.
    """

    period: int
    period_mult: int = 1
    min_factor: Factor = 0.0
    restart_decay: Factor = 1.0

    def __post_init__(self) -> None:
        check_positive("period", self.period, integer=True)
        check_positive("period_mult", self.period_mult, integer=True)
        _check_factor("min_factor", self.min_factor, low=0.0, high=1.0)
        _check_factor("restart_decay", self.restart_decay, low=0.0, high=1.0, open_low=True)

    def cycle(self, step: int) -> tuple[int, int, int]:
        """(cycle index, steps into the cycle, cycle length) of ``step``."""
        step = check_step(step)
        if self.period_mult == 1:
            index, offset = divmod(step, self.period)
            return index, offset, self.period
        index, offset, length = 0, step, self.period
        while offset >= length:
            offset -= length
            length *= self.period_mult
            index += 1
        return index, offset, length

    def __call__(self, step: int) -> Factor:
        index, offset, length = self.cycle(step)
        peak = self.restart_decay**index
        return self.min_factor + (1.0 - self.min_factor) * peak * _cosine(offset / length)


@dataclass(frozen=True)
class Cyclic:
    """Cyclical factor between ``min_factor`` and ``max_factor`` (Smith 2017), as ``CyclicLR``.

    Each cycle rises for ``step_size_up`` steps and falls for ``step_size_down`` (default: the same).
    ``mode``: ``'triangular'`` keeps the amplitude, ``'triangular2'`` halves it every cycle,
    ``'exp_range'`` multiplies it by ``gamma ** step``.
    """

    step_size_up: int
    step_size_down: int | None = None
    min_factor: Factor = 0.1
    max_factor: Factor = 1.0
    mode: str = "triangular"
    gamma: Factor = 1.0

    def __post_init__(self) -> None:
        check_positive("step_size_up", self.step_size_up, integer=True)
        if self.step_size_down is not None:
            check_positive("step_size_down", self.step_size_down, integer=True)
        _check_factor("min_factor", self.min_factor, low=0.0)
        _check_factor("max_factor", self.max_factor, low=_as_number("min_factor", self.min_factor))
        _check_factor("gamma", self.gamma, low=0.0, high=1.0, open_low=True)
        if self.mode not in CYCLIC_MODES:
            raise ValueError(f"mode={self.mode!r} is not supported; accepted values: {CYCLIC_MODES}")

    def __call__(self, step: int) -> Factor:
        step = check_step(step)
        down = self.step_size_up if self.step_size_down is None else self.step_size_down
        total = self.step_size_up + down
        cycle, offset = divmod(step, total)
        if offset <= self.step_size_up:
            height = offset / self.step_size_up
        else:
            height = (total - offset) / down
        if self.mode == "triangular":
            amplitude: Factor = 1.0
        elif self.mode == "triangular2":
            amplitude = 0.5**cycle
        else:
            amplitude = self.gamma**step
        return self.min_factor + (self.max_factor - self.min_factor) * height * amplitude


@dataclass(frozen=True)
class Sequential:
    """Runs ``schedules[0]`` until ``boundaries[0]``, then ``schedules[1]`` restarted at step 0, etc.

    ``len(boundaries) == len(schedules) - 1`` and boundaries strictly increase (optax's
    ``join_schedules``, torch's ``SequentialLR``).
    """

    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedules", tuple(self.schedules))
        object.__setattr__(self, "boundaries", tuple(self.boundaries))
        if not self.schedules or not all(callable(s) for s in self.schedules):
            raise TypeError("schedules must be a non-empty sequence of callables step -> factor")
        if len(self.boundaries) != len(self.schedules) - 1:
            raise ValueError(
                f"{len(self.schedules)} schedules need {len(self.schedules) - 1} boundaries, got {len(self.boundaries)}"
            )
        for b in self.boundaries:
            check_positive("boundary", b, integer=True)
        if list(self.boundaries) != sorted(set(self.boundaries)):
            raise ValueError(f"boundaries must strictly increase, got {list(self.boundaries)}")

    def __call__(self, step: int) -> Factor:
        step = check_step(step)
        index = bisect.bisect_right(self.boundaries, step)
        start = self.boundaries[index - 1] if index else 0
        return self.schedules[index](step - start)


def warmup_cosine(
    warmup_steps: int,
    total_steps: int,
    *,
    start_factor: Factor = 0.0,
    min_factor: Factor = 0.0,
    warmup: str = "linear",
) -> Sequential:
    """Warmup over ``warmup_steps`` (``'linear'`` or ``'exponential'``) then cosine decay to
    ``min_factor`` at ``total_steps`` (counted from step 0, warmup included)."""
    check_positive("warmup_steps", warmup_steps, integer=True)
    check_positive("total_steps", total_steps, integer=True)
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be shorter than training (total_steps={total_steps})"
        )
    if warmup not in WARMUPS:
        raise ValueError(f"warmup={warmup!r} is not supported; accepted values: {WARMUPS}")
    warm = LinearWarmup if warmup == "linear" else ExponentialWarmup
    return Sequential(
        (warm(warmup_steps, start_factor), CosineDecay(total_steps - warmup_steps, min_factor)),
        (warmup_steps,),
    )


class LearnedSchedule(nn.Module):
    """A positive piecewise-linear schedule of the training fraction, meta-trained through unrolls.

    The log-factor is linear between ``num_knots + 1`` equally spaced knots over the fraction
    ``step / total_steps`` in [0, 1] and constant after 1. Free knots (default) can express warmup
    and decay; ``monotone=True`` parametrises a non-increasing curve as a start value minus
    cumulative softplus decrements. ``total_steps`` is the horizon the curve is stretched over
    and may be changed to deploy the curve on a longer or shorter run.

    The curve starts constant at ``init_factor``, or, with ``warmup_fraction`` (free knots only),
    as linear warmup over that fraction of ``total_steps`` then cosine decay, floored at 1% and
    scaled by ``init_factor`` (:meth:`initialise_as`). Both are constructor arguments, so a spec
    (:meth:`to_spec`) rebuilds the same initial curve.
    """

    def __init__(
        self,
        total_steps: int,
        num_knots: int = 8,
        *,
        monotone: bool = False,
        init_factor: float = 1.0,
        warmup_fraction: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive("total_steps", total_steps, integer=True)
        check_positive("num_knots", num_knots, integer=True)
        check_positive("init_factor", init_factor)
        if not isinstance(monotone, bool):
            raise TypeError(f"monotone must be True or False, got {monotone!r}")
        if warmup_fraction is not None:
            check_unit_interval("warmup_fraction", warmup_fraction)
            if monotone:
                raise ValueError("warmup_fraction needs free knots (monotone=False): warmup is not a monotone curve")
        self.total_steps = total_steps
        self.num_knots = num_knots
        self.monotone = monotone
        self.init_factor = float(init_factor)
        self.warmup_fraction = None if warmup_fraction is None else float(warmup_fraction)
        kwargs = {"device": device, "dtype": dtype}
        if monotone:
            self.log_start = nn.Parameter(torch.tensor(math.log(init_factor), **kwargs))
            # softplus(-6) ~ 2.5e-3 per knot: starts close to constant, with a usable gradient.
            self.raw_decrements = nn.Parameter(torch.full((num_knots,), -6.0, **kwargs))
        else:
            self.log_knots = nn.Parameter(torch.full((num_knots + 1,), math.log(init_factor), **kwargs))
        if warmup_fraction is not None:
            warmup = round(warmup_fraction * total_steps)
            # total_steps + 1 keeps the warmup shorter than the run for any warmup_fraction < 1.
            self.initialise_as(warmup_cosine(warmup, total_steps + 1) if warmup else CosineDecay(total_steps),
                               scale=init_factor)

    def initialise_as(self, prior: Schedule, floor: float = 0.01, scale: float = 1.0) -> LearnedSchedule:
        """Set the free knots to ``scale`` times ``prior`` (a schedule over ``total_steps``) at the
        knots, floored at ``floor``; returns self. Used to start a learned schedule as, say,
        warmup + cosine."""
        if self.monotone:
            raise ValueError("initialise_as needs free knots (monotone=False)")
        knots = torch.linspace(0, self.total_steps, self.num_knots + 1)
        factors = torch.tensor([float(prior(round(float(k)))) * scale for k in knots]).clamp_min(floor)
        with torch.no_grad():
            self.log_knots.copy_(factors.log())
        return self

    def to_spec(self) -> dict[str, Any]:
        """Constructor arguments (weights are saved with the module's ``state_dict``)."""
        arguments = {"total_steps": self.total_steps, "num_knots": self.num_knots, "monotone": self.monotone,
                     "init_factor": self.init_factor, "warmup_fraction": self.warmup_fraction}
        return {"schedule": type(self).__name__, "arguments": arguments}

    def log_knot_values(self) -> Tensor:
        """Log-factors at the ``num_knots + 1`` knots."""
        if not self.monotone:
            return self.log_knots
        drops = torch.cumsum(F.softplus(self.raw_decrements), dim=0)
        return torch.cat([self.log_start.reshape(1), self.log_start - drops])

    def forward(self, step: int, total_steps: int | None = None) -> Tensor:
        """The factor at ``step`` of a run of ``total_steps`` (default: :attr:`total_steps`);
        a 0-d tensor, differentiable in the knots."""
        total = self.total_steps if total_steps is None else total_steps
        position = min(check_step(step) / total, 1.0) * self.num_knots
        left = min(int(position), self.num_knots - 1)
        weight = position - left
        values = self.log_knot_values()
        return torch.exp(values[left] + weight * (values[left + 1] - values[left]))

    def extra_repr(self) -> str:
        return f"total_steps={self.total_steps}, num_knots={self.num_knots}, monotone={self.monotone}"


def _check_schedule(schedule: Any) -> None:
    if not callable(schedule):
        raise TypeError(f"schedule must be a callable step -> factor, got {type(schedule).__name__}")


class ScheduleLR(LRScheduler):
    """``torch.optim`` scheduler that sets each group's lr to its initial lr times ``schedule(step)``.

    Works with any optimizer; ``state_dict`` holds the step counter, the base learning rates and,
    for a :class:`LearnedSchedule` (or any ``nn.Module`` schedule), the schedule's weights.
    """

    def __init__(self, optimizer: Optimizer, schedule: Schedule, last_epoch: int = -1) -> None:
        _check_schedule(schedule)
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        with torch.no_grad():
            factor = float(self.schedule(self.last_epoch))
        return [base_lr * factor for base_lr in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "schedule")}
        if isinstance(self.schedule, nn.Module):
            state["schedule_state"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        schedule_state = state.pop("schedule_state", None)
        if (schedule_state is not None) != isinstance(self.schedule, nn.Module):
            raise ValueError("the saved scheduler and this one disagree on whether the schedule has weights")
        if schedule_state is not None:
            self.schedule.load_state_dict(schedule_state)
        self.__dict__.update(state)
