"""Task augmentation by reparameterisation: the same problem seen through rescaled parameters.

A learned optimizer that only ever meets parameters of one scale learns one step size. As in
learned_optimization's ``ReparamWeights`` (and the Celo recipe), each augmented task draws scales
``s`` log-uniformly from ``scale_range``; the optimizer sees ``p' = p / s`` and the loss is the
original loss at ``p' * s``, so gradients are ``s`` times larger while parameters are ``s`` times
smaller (or the reverse). The scale is drawn per task at one of four levels:

* ``none``: all ones (the original task),
* ``global``: one scale for every parameter,
* ``tensor``: one scale per parameter tensor,
* ``parameter``: one scale per coordinate.

Each task seed picks its level from ``levels`` uniformly (repeat a level to weight it), so
``levels=("none", "global", "tensor", "parameter")`` mixes all four. The scales travel with every
batch (``(batch, scales)``): tasks of one architecture then compute the same function of
(params, batch) whatever their scales, and still run in one vmapped call.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from metaoptimizer._validation import check_positive
from metaoptimizer.tasks.base import Params, Task, TaskFamily
from metaoptimizer.tasks.sampling import as_choices, pick, task_rng

__all__ = ["LEVELS", "ReparamFamily", "ReparamTask", "draw_scales"]

LEVELS = ("none", "global", "tensor", "parameter")
#: The random stream of a task seed that draws its augmentation (apart from architecture and data).
AUGMENT_STREAM = 2


def draw_scales(
    rng: np.random.Generator, shapes: Mapping[str, torch.Size], level: str, scale_range: tuple[float, float]
) -> Params:
    """Scales shaped like each parameter: log-uniform in ``scale_range``, shared per ``level``."""
    low, high = math.log(scale_range[0]), math.log(scale_range[1])

    def log_uniform(size: int) -> np.ndarray:
        return np.exp(rng.uniform(low, high, size))

    if level == "none":
        return {name: torch.ones(shape) for name, shape in shapes.items()}
    if level == "global":
        value = float(log_uniform(1)[0])
        return {name: torch.full(shape, value) for name, shape in shapes.items()}
    if level == "tensor":
        values = log_uniform(len(shapes))
        return {name: torch.full(shape, float(v)) for (name, shape), v in zip(shapes.items(), values, strict=True)}
    return {
        name: torch.from_numpy(log_uniform(math.prod(shape)).astype(np.float32)).reshape(shape)
        for name, shape in shapes.items()
    }


class ReparamTask(Task):
    """``task`` optimised in the coordinates ``p / scales`` (see the module docstring).

    Batches are ``(inner batch, scales)``; :meth:`loss` and :meth:`metrics` accept them.
    """

    def __init__(self, task: Task, scales: Mapping[str, Tensor], level: str) -> None:
        self.task = task
        self.scales = dict(scales)
        self.level = level
        self.name = f"{task.name}:reparam={level}"

    def loss_signature(self) -> Hashable | None:
        """The inner task's: the scales travel in the batches, so the loss function is shared."""
        inner = self.task.loss_signature()
        return None if inner is None else (type(self), inner)

    def init_params(self, seed: int) -> Params:
        return {name: p / self.scales[name].to(p) for name, p in self.task.init_params(seed).items()}

    def original(self, params: Mapping[str, Tensor], scales: Mapping[str, Tensor]) -> Params:
        """The inner task's parameters ``p' * s`` for the optimizer's ``params``."""
        return {name: p * scales[name] for name, p in params.items()}

    def loss(self, params: Mapping[str, Tensor], batch) -> Tensor:
        inner, scales = batch
        return self.task.loss(self.original(params, scales), inner)

    def metrics(self, params: Mapping[str, Tensor], batch) -> dict[str, float]:
        inner, scales = batch
        return self.task.metrics(self.original(params, scales), inner)

    def _with_scales(self, batches: Iterator) -> Iterator:
        for batch in batches:
            yield batch, self.scales

    def train_batches(self, seed: int) -> Iterator:
        return self._with_scales(self.task.train_batches(seed))

    def valid_batches(self, seed: int) -> Iterator:
        return self._with_scales(self.task.valid_batches(seed))


class ReparamFamily(TaskFamily):
    """``family``'s tasks, each reparameterised at a level drawn from ``levels`` with scales
    log-uniform in ``scale_range`` (default 1e-3..1e3, the Celo recipe's)."""

    def __init__(
        self,
        family: TaskFamily,
        levels: str | Sequence[str] = LEVELS,
        scale_range: Sequence[float] = (1e-3, 1e3),
    ) -> None:
        if not isinstance(family, TaskFamily):
            raise TypeError(f"family must be a TaskFamily, got {type(family).__name__}")
        self.levels = as_choices("levels", levels, LEVELS)
        if not isinstance(scale_range, (list, tuple)) or len(scale_range) != 2:
            raise ValueError(f"scale_range must be a pair (low, high), got {scale_range!r}")
        for value in scale_range:
            check_positive("scale_range bound", value)
        if not scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range needs low <= high, got {tuple(scale_range)}")
        self.family = family
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.name = f"{family.name}+reparam"

    def sample(self, seed: int) -> ReparamTask:
        task = self.family.sample(seed)
        params = task.init_params(seed)
        rng = task_rng(seed, AUGMENT_STREAM)
        level = pick(rng, self.levels)
        scales = draw_scales(rng, {name: p.shape for name, p in params.items()}, level, self.scale_range)
        return ReparamTask(task, {name: s.to(params[name]) for name, s in scales.items()}, level)
