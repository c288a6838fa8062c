"""Applying a meta-gradient: global-norm clipping and skipping of non-finite steps."""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from metaoptimizer.config import MetaOptTrainResult

if TYPE_CHECKING:
    from metaoptimizer.meta.estimators import Estimate


def global_norm(grads: list[Tensor | None]) -> float:
    """Euclidean norm over all gradient tensors (NaN/Inf propagate)."""
    present = [g for g in grads if g is not None]
    if not present:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present])))


def apply_meta_gradient(
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    grads: list[Tensor | None],
    clipping: float | None,
    finite: bool = True,
) -> tuple[float, bool]:
    """Clip ``grads`` to global norm ``clipping`` and step ``optimizer`` on ``params``.

    Returns ``(norm before clipping, skipped)``. Nothing is applied when ``finite`` is False or the
    norm is NaN/Inf: a non-finite meta-gradient must never reach the meta-parameters.
    """
    norm = global_norm(grads)
    if not finite or not math.isfinite(norm):
        return norm, True
    scale = clipping / (norm + 1e-12) if clipping is not None and norm > clipping else 1.0
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g * scale
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, False


def apply_estimate(
    optimizer: torch.optim.Optimizer, params: list[Tensor], estimate: Estimate, clipping: float | None,
    steps: int, skipped_total: int,
) -> MetaOptTrainResult:
    """Apply ``estimate`` (see :func:`apply_meta_gradient`) after ``steps`` applied and
    ``skipped_total`` skipped meta-steps; the result carries the new counts. Every meta-trainer's
    step ends here (``MetaTrainer.step``, ``MetaOptimizer.meta_train_step``)."""
    norm, skipped = apply_meta_gradient(optimizer, params, estimate.grads, clipping, estimate.finite)
    return MetaOptTrainResult(
        meta_loss=estimate.meta_loss,
        meta_grad_norm=norm,
        skipped=skipped,
        steps=steps + (not skipped),
        skipped_total=skipped_total + skipped,
        inner_steps=estimate.inner_steps,
    )
