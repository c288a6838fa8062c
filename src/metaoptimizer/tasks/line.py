"""The noisy line of optax's meta-learning example: fit ``y = slope * x + noise`` with ``x * theta``.

A one-parameter task whose best learning rate changes as training goes (large while theta is far
from the slope, small once the noise dominates), so it shows a learned learning rate at work; see
``metaopt lr-example``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from metaoptimizer.config import check_positive
from metaoptimizer.rules.base import Params
from metaoptimizer.tasks.base import Batch, Task, TaskFamily

__all__ = ["NoisyLineFamily", "NoisyLineTask"]


class NoisyLineTask(Task):
    """Fit ``y = slope * x + N(0, noise_std^2)``, ``x ~ U(0, x_max)``, with the model ``x * theta``.

    Batches hold ``samples_per_batch`` points; the loss is ``0.5 * mean((x * theta - y)^2)``
    (optax's ``l2_loss``). Training and validation batches are independent draws of the same line.
    """

    name = "noisy_line"

    def __init__(
        self,
        slope: float = 10.0,
        noise_std: float = 1.0,
        x_max: float = 10.0,
        samples_per_batch: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        check_positive("noise_std", noise_std, allow_zero=True)
        check_positive("x_max", x_max)
        check_positive("samples_per_batch", samples_per_batch, integer=True)
        self.slope = float(slope)
        self.noise_std = float(noise_std)
        self.x_max = float(x_max)
        self.samples_per_batch = samples_per_batch
        self.device = device

    def init_params(self, seed: int) -> Params:
        return {"theta": torch.randn((), generator=torch.Generator().manual_seed(seed)).to(self.device)}

    def loss(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        x, y = batch
        return 0.5 * (x * params["theta"] - y).square().mean()

    def _batches(self, seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            x = self.x_max * torch.rand(self.samples_per_batch, generator=generator)
            y = self.slope * x + self.noise_std * torch.randn(self.samples_per_batch, generator=generator)
            yield x.to(self.device), y.to(self.device)

    def train_batches(self, seed: int) -> Iterator[Batch]:
        return self._batches(2 * seed)

    def valid_batches(self, seed: int) -> Iterator[Batch]:
        return self._batches(2 * seed + 1)


class NoisyLineFamily(TaskFamily):
    """Every seed gives the same line (:class:`NoisyLineTask`); seeds change the data and theta's start."""

    name = "noisy_line"

    def __init__(self, **task_options: Any) -> None:
        self.task_options = task_options
        NoisyLineTask(**task_options)  # validate now, not at the first sample

    def sample(self, seed: int) -> NoisyLineTask:
        return NoisyLineTask(**self.task_options)
