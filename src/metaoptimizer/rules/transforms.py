"""Transforms as rules: small members for :func:`~metaoptimizer.rules.combine.chain`.

Each takes the updates of the member before it (or the gradients, when first) and returns new
ones: ``scale_by_schedule`` multiplies by a schedule's factor at the run's clock,
``add_decayed_weights`` adds decoupled weight decay, ``clip_by_global_norm`` clips, ``scale``
multiplies by a constant. They keep no per-parameter state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from metaoptimizer import schedules
from metaoptimizer._validation import check_positive
from metaoptimizer.rules.base import UpdateRule
from metaoptimizer.rules.state import OptimizerState

__all__ = ["AddDecayedWeights", "ClipByGlobalNorm", "Scale", "ScaleBySchedule", "add_decayed_weights",
           "clip_by_global_norm", "scale", "scale_by_schedule"]

#: Schedules a spec can name: the dataclass schedules and the learned one.
SCHEDULES = {
    cls.__name__: cls
    for cls in (schedules.LinearWarmup, schedules.ExponentialWarmup, schedules.CosineDecay, schedules.CosineRestarts,
                schedules.Cyclic, schedules.Sequential, schedules.LearnedSchedule)
}


def schedule_to_spec(schedule: Any) -> dict[str, Any]:
    """``{"schedule": class name, "arguments": {...}}`` for a schedule of :data:`SCHEDULES`."""
    if isinstance(schedule, schedules.LearnedSchedule):
        return schedule.to_spec()
    if type(schedule).__name__ not in SCHEDULES or not dataclasses.is_dataclass(schedule):
        raise ValueError(f"cannot describe schedule {schedule!r}; describable schedules: {sorted(SCHEDULES)}")
    arguments = {f.name: getattr(schedule, f.name) for f in dataclasses.fields(schedule)}
    if isinstance(schedule, schedules.Sequential):
        arguments["schedules"] = tuple(schedule_to_spec(s) for s in schedule.schedules)
    return {"schedule": type(schedule).__name__, "arguments": arguments}


def schedule_from_spec(spec: Mapping[str, Any]) -> Any:
    """Inverse of :func:`schedule_to_spec` (a learned schedule gets fresh knots)."""
    if not isinstance(spec, Mapping) or spec.get("schedule") not in SCHEDULES:
        raise ValueError(f"not a schedule spec: {spec!r}; describable schedules: {sorted(SCHEDULES)}")
    arguments = dict(spec["arguments"])
    if spec["schedule"] == "Sequential":
        arguments["schedules"] = tuple(schedule_from_spec(s) for s in arguments["schedules"])
    return SCHEDULES[spec["schedule"]](**arguments)


class ScaleBySchedule(UpdateRule):
    """Multiply updates by ``schedule(i)`` at the 0-based index ``i`` of the update on the run's clock.

    A :class:`~metaoptimizer.schedules.LearnedSchedule` is a curve over the training fraction, so
    this member is then budget-aware: the curve is stretched over ``state.num_steps`` (default:
    the schedule's own ``total_steps``), and its knots are meta-parameters of the chain.
    """

    name = "scale_by_schedule"

    def __init__(self, schedule: Any) -> None:
        super().__init__()
        if not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> factor, got {type(schedule).__name__}")
        self.schedule = schedule
        self.learned = isinstance(schedule, schedules.LearnedSchedule)
        if self.learned:
            self.budget_aware = True
            self.default_num_steps = schedule.total_steps

    @classmethod
    def from_hyperparameters(cls, hyperparameters: Mapping[str, Any]) -> ScaleBySchedule:
        return cls(schedule_from_spec(hyperparameters["schedule"]))

    def hyperparameters(self) -> dict[str, object]:
        return {"schedule": schedule_to_spec(self.schedule)}

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        return OptimizerState(num_steps=self.resolve_num_steps(num_steps))

    def factor(self, state: OptimizerState) -> Tensor | float:
        """The factor for the coming update of ``state``."""
        index = state.schedule_step()
        return self.schedule(index, state.num_steps) if self.learned else self.schedule(index)

    def update(self, grads, state, params, *, loss=None):
        step, state = self.begin_update(grads, state, params, loss)
        factor = self.factor(state)
        scaled = {name: u * (factor.to(u.dtype) if isinstance(factor, Tensor) else factor) for name, u in grads.items()}
        return scaled, state.replace(step_count=step)


class AddDecayedWeights(UpdateRule):
    """Decoupled weight decay: ``update - weight_decay * p`` (the per-update shrink factor, as
    ``lr * weight_decay`` in AdamW). ``mask`` names the parameters to decay (None: all)."""

    name = "add_decayed_weights"

    def __init__(self, weight_decay: float, mask: tuple[str, ...] | None = None) -> None:
        super().__init__()
        check_positive("weight_decay", weight_decay, allow_zero=True)
        self.weight_decay = float(weight_decay)
        self.mask = None if mask is None else tuple(mask)

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        return OptimizerState(num_steps=num_steps)

    def update(self, grads, state, params, *, loss=None):
        step, state = self.begin_update(grads, state, params, loss)
        decayed = {
            name: u - self.weight_decay * params[name] if self.mask is None or name in self.mask else u
            for name, u in grads.items()
        }
        return decayed, state.replace(step_count=step)


class ClipByGlobalNorm(UpdateRule):
    """Scale all updates together so that their global norm is at most ``max_norm``."""

    name = "clip_by_global_norm"

    def __init__(self, max_norm: float) -> None:
        super().__init__()
        check_positive("max_norm", max_norm)
        self.max_norm = float(max_norm)

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        return OptimizerState(num_steps=num_steps)

    def update(self, grads, state, params, *, loss=None):
        step, state = self.begin_update(grads, state, params, loss)
        if not grads:
            return {}, state.replace(step_count=step)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(u.float()) for u in grads.values()]))
        factor = (self.max_norm / norm.clamp_min(1e-12)).clamp(max=1.0)
        return {name: u * factor.to(u.dtype) for name, u in grads.items()}, state.replace(step_count=step)


class Scale(UpdateRule):
    """Multiply updates by a constant ``factor`` (``-lr`` turns a direction into a descent step)."""

    name = "scale"

    def __init__(self, factor: float) -> None:
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor != factor:
            raise ValueError(f"factor must be a number, got {factor!r}")
        self.factor = float(factor)

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        return OptimizerState(num_steps=num_steps)

    def update(self, grads, state, params, *, loss=None):
        step, state = self.begin_update(grads, state, params, loss)
        return {name: u * self.factor for name, u in grads.items()}, state.replace(step_count=step)


def scale_by_schedule(schedule: Any) -> ScaleBySchedule:
    return ScaleBySchedule(schedule)


def add_decayed_weights(weight_decay: float, mask: tuple[str, ...] | None = None) -> AddDecayedWeights:
    return AddDecayedWeights(weight_decay, mask)


def clip_by_global_norm(max_norm: float) -> ClipByGlobalNorm:
    return ClipByGlobalNorm(max_norm)


def scale(factor: float) -> Scale:
    return Scale(factor)

