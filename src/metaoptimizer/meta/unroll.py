"""Differentiable unrolls: apply an update rule K steps on a task and return a meta-loss.

:func:`inner_step` is the one inner update every loop runs (this unroll, the vectorized unroll of
:mod:`metaoptimizer.meta._vectorized` and the evaluation runner), and :func:`objective` the one
meta-loss both unrolls take.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from metaoptimizer.config import META_OBJECTIVES, OptimizerState
from metaoptimizer.rules.base import Params, UpdateRule, apply_updates
from metaoptimizer.tasks.base import Batch, Task


@dataclass
class UnrollResult:
    """Outcome of one unroll.

    ``meta_loss`` is differentiable w.r.t. the rule's meta-parameters; ``params``/``state`` are the
    inner parameters and rule state at the end (still attached to the graph: call
    :func:`detach_params` / ``state.detach()`` to cut it); ``losses`` are the inner training losses
    seen at each step, as floats; ``finite`` is False when any inner loss or the meta-loss was NaN/Inf.
    """

    meta_loss: Tensor
    params: Params
    state: OptimizerState
    losses: list[float] = field(default_factory=list)
    finite: bool = True


def detach_params(params: Mapping[str, Tensor]) -> Params:
    """Detached leaf copies that require grad, ready to start an unroll (cuts the graph)."""
    return {name: p.detach().requires_grad_(True) for name, p in params.items()}


def inner_gradients(loss: Tensor, params: Mapping[str, Tensor], second_order: bool) -> Params:
    """Gradient of ``loss`` w.r.t. ``params``.

    With ``second_order`` the gradient stays in the graph (full meta-gradient); without it the
    gradient is treated as a constant input to the rule, as Andrychowicz et al. do, which avoids
    Hessian-vector products while keeping the path through the parameters.
    """
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=second_order, retain_graph=True)
    return {n: g if second_order else g.detach() for n, g in zip(names, grads, strict=True)}


def log_loss(loss: Tensor) -> Tensor:
    """``log(loss)``, floored so that an exactly-solved task gives a finite value."""
    return torch.log(loss.clamp_min(1e-30))


#: ``rule.update`` or a stand-in with its signature (the vectorized unroll substitutes meta-parameters).
Update = Callable[..., tuple[Params, OptimizerState]]


def inner_step(
    update: Update, params: Params, state: OptimizerState, grads: Mapping[str, Tensor], loss: Tensor
) -> tuple[Params, OptimizerState]:
    """One inner update: the rule's updates from ``grads`` and the loss at ``params`` (a constant:
    rules read its value, the meta-gradient does not flow through it), applied to ``params``."""
    updates, state = update(dict(grads), state, params, loss=loss.detach())
    return apply_updates(params, updates), state


def objective(train_terms: Sequence[Tensor], valid_loss: Tensor | None, kind: str) -> Tensor:
    """The meta-loss ``kind`` (one of :data:`~metaoptimizer.config.META_OBJECTIVES`): the mean of the
    training losses after each update, or the validation loss at the end; ``log_`` kinds take
    ``log`` of each term first."""
    terms = [valid_loss] if kind.endswith("valid_loss") else list(train_terms)
    if kind.startswith("log_"):
        terms = [log_loss(term) for term in terms]
    return torch.stack(terms).mean()


def unroll(
    rule: UpdateRule,
    task: Task,
    params: Mapping[str, Tensor],
    state: OptimizerState,
    train_batches: Iterator[Batch],
    steps: int,
    *,
    second_order: bool = False,
    meta_objective: str = "train_loss",
    valid_batches: Iterator[Batch] | None = None,
) -> UnrollResult:
    """Run ``rule`` for ``steps`` inner steps from ``params``/``state`` and compute the meta-loss.

    ``meta_objective='train_loss'``: mean training loss at the parameters produced by each of the
    ``steps`` updates (each measured on the next training batch, as in Andrychowicz et al.).
    ``meta_objective='valid_loss'``: validation loss after the last update, on one batch of
    ``valid_batches``. The ``log_`` variants average ``log(loss)`` instead, which weighs
    progress from 0.1 to 0.01 like progress from 1 to 0.1 (and tasks of different loss scales
    alike). ``params`` must require grad (use :func:`detach_params`).
    """
    if meta_objective not in META_OBJECTIVES:
        raise ValueError(f"meta_objective={meta_objective!r} is not supported; accepted values: {META_OBJECTIVES}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    use_valid = meta_objective.endswith("valid_loss")
    if use_valid and valid_batches is None:
        raise ValueError(f"meta_objective={meta_objective!r} needs valid_batches")
    params = dict(params)
    loss = task.loss(params, next(train_batches))
    losses = [float(loss.detach())]
    train_terms: list[Tensor] = []
    finite = math.isfinite(losses[0])
    for _ in range(steps):
        if not finite:
            break
        params, state = inner_step(rule.update, params, state, inner_gradients(loss, params, second_order), loss)
        loss = task.loss(params, next(train_batches))
        losses.append(float(loss.detach()))
        finite = math.isfinite(losses[-1])
        train_terms.append(loss)
    if use_valid and finite:
        meta_loss = objective([], task.loss(params, next(valid_batches)), meta_objective)
    elif train_terms:  # a diverged run falls back on its training losses
        meta_loss = objective(train_terms, None, meta_objective.replace("valid", "train"))
    else:
        meta_loss = loss
    finite = finite and bool(torch.isfinite(meta_loss))
    return UnrollResult(meta_loss=meta_loss, params=params, state=state, losses=losses[:-1], finite=finite)
