"""Random quadratics f(θ) = ||Wθ − y||² (Andrychowicz et al. 2016, "Learning to learn by
gradient descent by gradient descent", section 3.1): W and y are standard Gaussian, drawn from
the task seed. A batch is the pair (W, y), so the loss has the same ``loss(params, batch)`` form
as every other task; with ``noise_std > 0`` training batches carry Gaussian observation noise on y.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from metaoptimizer.config import check_positive
from metaoptimizer.tasks.base import Batch, Params, Task, TaskFamily


def _generator(seed: int) -> torch.Generator:
    check_positive("seed", seed, integer=True, allow_zero=True)
    return torch.Generator().manual_seed(seed)


def quadratic_loss(theta: Tensor, w: Tensor, y: Tensor) -> Tensor:
    """||Wθ − y||² for ``theta (d,)``, ``w (m, d)``, ``y (m,)``."""
    return (w @ theta - y).square().sum()


class QuadraticTask(Task):
    """One quadratic ``||Wθ − y||²`` in ``dim`` dimensions; params are ``{"theta": (dim,)}``."""

    def __init__(
        self, seed: int, dim: int = 10, noise_std: float = 0.0, device: torch.device | str | None = None
    ) -> None:
        check_positive("dim", dim, integer=True)
        check_positive("noise_std", noise_std, allow_zero=True)
        generator = _generator(seed)
        self.name = f"quadratic[d={dim},seed={seed}]"
        self.dim = dim
        self.noise_std = float(noise_std)
        self.device = device
        self.w = torch.randn(dim, dim, generator=generator).to(device)
        self.y = torch.randn(dim, generator=generator).to(device)

    def init_params(self, seed: int) -> Params:
        return {"theta": torch.randn(self.dim, generator=_generator(seed)).to(self.device)}

    def loss(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        w, y = batch
        return quadratic_loss(params["theta"], w, y)

    def loss_signature(self) -> tuple | None:
        """The dimension (a subclass that overrides ``loss`` is not covered)."""
        return (type(self), self.dim) if type(self).loss is QuadraticTask.loss else None

    def train_batches(self, seed: int) -> Iterator[Batch]:
        if self.noise_std == 0.0:
            return itertools.repeat((self.w, self.y))
        return self._noisy_batches(_generator(seed))

    def _noisy_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        while True:
            noise = torch.randn(self.dim, generator=generator).to(self.device)
            yield self.w, self.y + self.noise_std * noise

    def valid_batches(self, seed: int) -> Iterator[Batch]:
        """The noiseless problem, every time (``seed`` is accepted for the contract and unused)."""
        return itertools.repeat((self.w, self.y))


class QuadraticFamily(TaskFamily):
    """Quadratics whose W and y come from the task seed."""

    name = "quadratic"

    def __init__(self, dim: int = 10, noise_std: float = 0.0, device: torch.device | str | None = None) -> None:
        check_positive("dim", dim, integer=True)
        check_positive("noise_std", noise_std, allow_zero=True)
        self.dim = dim
        self.noise_std = noise_std
        self.device = device

    def sample(self, seed: int) -> QuadraticTask:
        return QuadraticTask(seed, dim=self.dim, noise_std=self.noise_std, device=self.device)
