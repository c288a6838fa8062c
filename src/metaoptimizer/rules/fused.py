"""Fused per-parameter step: the tiny MLP written as pointwise arithmetic, and its compilation.

A per-coordinate MLP with a handful of hidden units is a poor fit for matrix products: each
product reads and writes a (numel, hidden) temporary. Written instead as sums of
``feature * weight`` over the hidden units (every weight a 0-dim tensor), the whole step is
pointwise arithmetic that ``torch.compile`` fuses into one loop over the coordinates, which keeps
the hidden units in registers. :func:`mlp_pointwise` computes the same numbers as the matrix
form :func:`~metaoptimizer.rules.mlp.mlp_matmul` (to rounding) and is also the eager fallback.

:func:`compiled` compiles with dynamic shapes, so tensors of different sizes share one graph (one
more for single-row tensors, which the compiler specialises) instead of recompiling per shape.
``torch.compile`` cannot differentiate twice, so rules use compiled steps only when no autograd
graph is being recorded (deployment, first-order or evolution-strategies evaluation). A compiled
step falls back to its eager function, for good and with one warning, when compilation fails (no
C++ compiler, an unsupported platform); the seconds its first call took (mostly compilation, which
inductor caches on disk for later processes) are logged once and kept in :data:`COMPILE_SECONDS`.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Layers = Sequence[tuple[Tensor, Tensor]]

LOG = logging.getLogger(__name__)
#: Seconds the first call of each compiled step took in this process (compilation included), by name.
COMPILE_SECONDS: dict[str, float] = {}


def _weighted_sum(start: Tensor, inputs: Sequence[Tensor], weight: Tensor, unit: int) -> Tensor:
    """``start + sum_i inputs[i] * weight[i, unit]``, one pointwise term at a time."""
    total = start
    for i, x in enumerate(inputs):
        total = total + x * weight[i, unit]
    return total


def mlp_pointwise(features: Sequence[Tensor], layers: Layers, skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Direction and log-magnitude of the per-coordinate MLP, unrolled over its hidden units.

    ``features`` are equally shaped tensors, ``layers`` the (weight ``(in, out)``, bias ``(out,)``)
    pairs with ReLU between them and two outputs last, ``skip`` (optional) a linear map from the
    features to the direction.
    """
    units = features
    for index, (weight, bias) in enumerate(layers):
        inputs = [torch.relu(u) for u in units] if index else units
        units = [_weighted_sum(bias[j], inputs, weight, j) for j in range(weight.shape[1])]
    direction = units[0] if skip is None else _weighted_sum(units[0], features, skip[:, None], 0)
    return direction, units[1]


class CompiledStep:
    """``fn`` through ``torch.compile`` (dynamic shapes), or ``fn`` itself once compilation has failed.

    A failure is recognised by the eager function succeeding on the same arguments, so an error
    in the inputs still raises (from the eager call) instead of being taken for a compiler problem.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.name = f"{fn.__module__}.{fn.__qualname__}"
        self.failed: BaseException | None = None
        try:
            self.compiled = torch.compile(fn, dynamic=True)
        except RuntimeError as error:  # torch.compile unsupported on this platform or Python
            self.failed = error
            warnings.warn(f"torch.compile is unavailable ({error}); {self.name} runs eagerly", RuntimeWarning, stacklevel=2)

    def __call__(self, *args):
        if self.failed is not None:
            return self.fn(*args)
        start = time.perf_counter()
        try:
            result = self.compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure; the eager call re-raises input errors
            result = self.fn(*args)
            self.failed = error
            warnings.warn(
                f"torch.compile failed for {self.name} ({type(error).__name__}: {str(error)[:200]}); "
                "running the eager step from now on", RuntimeWarning, stacklevel=2,
            )
            return result
        if self.name not in COMPILE_SECONDS:
            COMPILE_SECONDS[self.name] = time.perf_counter() - start
            LOG.info("compiled %s: first call %.1f s", self.name, COMPILE_SECONDS[self.name])
        return result


@functools.cache
def compiled(fn: Callable) -> CompiledStep:
    """``fn`` compiled once per process with dynamic shapes (shared by every rule instance)."""
    return CompiledStep(fn)
