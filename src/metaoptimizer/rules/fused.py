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
graph is being recorded (deployment, first-order or evolution-strategies evaluation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Layers = Sequence[tuple[Tensor, Tensor]]


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


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``fn`` compiled once per process with dynamic shapes (shared by every rule instance)."""
    return torch.compile(fn, dynamic=True)
