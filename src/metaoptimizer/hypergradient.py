"""Hypergradient descent (Baydin et al. 2018, "Online learning rate adaptation with hypergradient
descent"): the learning rate follows the derivative of the loss with respect to itself.

If step ``t-1`` moved the parameters by ``-lr * d_{t-1}``, then the derivative of the loss at the
new point with respect to that lr is ``h_t = -g_t . d_{t-1}`` (``g_t`` the new gradient), which
costs one dot product. Before its own update each step sets ``lr <- lr - hypergrad_lr * h_t``,
summed over the parameters of a group (one lr per parameter group). With ``hypergrad_lr=0``
these optimizers take exactly the steps of ``torch.optim.SGD`` / ``torch.optim.Adam``.

Each group records the last hypergradient in ``group['hypergradient']`` (``None`` before the
second step); the learning rate lives in ``group['lr']``, so ``state_dict`` round trips resume
the same trajectory.

Why these are ``torch.optim`` classes and not :class:`~metaoptimizer.rules.rates.HypergradientRule`
through :class:`~metaoptimizer.optim.LearnedOptimizer`: they adapt *one* rate per param group,
summing the hypergradient over the group, and keep it in ``group['lr']`` where LR schedulers,
loggers and ``state_dict`` see it; and they adapt it for SGD, momentum and Adam directions. The
rule adapts a rate per coordinate for plain SGD directions, and the rule contract does not carry
param groups (the adapter calls a rule once per cohort of parameters, not per group), so a
group-level rate cannot be expressed as a rule without changing the contract.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from metaoptimizer.config import check_positive
from metaoptimizer.rules.base import check_unit_interval


class _HypergradientOptimizer(Optimizer):
    """Shared step: adapt each group's lr by its hypergradient, then take the group's update.

    Subclasses implement ``_direction(grad, state, group) -> d``, the per-parameter direction of
    the update ``p <- p - lr * d`` (it may update the parameter's state, and must not depend on lr).
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        check_positive("lr", defaults["lr"], allow_zero=True)
        check_positive("hypergrad_lr", defaults["hypergrad_lr"], allow_zero=True)
        check_positive("weight_decay", defaults["weight_decay"], allow_zero=True)
        super().__init__(params, {**defaults, "hypergradient": None})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update of every parameter that has a gradient; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = []
            for p in params:
                if p.grad.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients")
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                grads.append(grad)
            previous = [(g, self.state[p]["direction"]) for p, g in zip(params, grads, strict=True) if "direction" in self.state[p]]
            if previous:
                hypergradient = -sum(float(torch.sum(g * d)) for g, d in previous)
                group["hypergradient"] = hypergradient
                group["lr"] = group["lr"] - group["hypergrad_lr"] * hypergradient
            for p, grad in zip(params, grads, strict=True):
                state = self.state[p]
                direction = self._direction(grad, state, group)
                state["direction"] = direction
                p.add_(direction, alpha=-group["lr"])
        return loss


class HypergradientSGD(_HypergradientOptimizer):
    """SGD-HD, and SGDN-HD with ``momentum > 0``: ``torch.optim.SGD``'s update with an adapted lr.

    ``hypergrad_lr`` is the paper's beta (its experiments use 1e-3 for SGD); the momentum buffer
    follows ``torch.optim.SGD`` (``nesterov``, ``dampening``, L2 ``weight_decay``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        hypergrad_lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        check_unit_interval("momentum", momentum)
        check_unit_interval("dampening", dampening)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        defaults = dict(
            lr=lr,
            hypergrad_lr=hypergrad_lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    def _direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        momentum = group["momentum"]
        if momentum == 0:
            return grad.clone()
        if "momentum_buffer" not in state:
            buffer = grad.clone()
        else:
            buffer = state["momentum_buffer"].mul_(momentum).add_(grad, alpha=1.0 - group["dampening"])
        state["momentum_buffer"] = buffer
        return grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer.clone()


class HypergradientAdam(_HypergradientOptimizer):
    """Adam-HD: ``torch.optim.Adam``'s update (bias-corrected, eps outside the root) with an adapted lr.

    The direction is ``m_hat / (sqrt(v_hat) + eps)``. ``hypergrad_lr`` is the paper's beta (its
    experiments use 1e-7 for Adam); the hypergradient sums over every coordinate of the group, so
    a good beta shrinks as models grow.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        hypergrad_lr: float = 1e-7,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_unit_interval("betas[0]", betas[0])
        check_unit_interval("betas[1]", betas[1])
        check_positive("eps", eps)
        defaults = dict(lr=lr, hypergrad_lr=hypergrad_lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        beta1, beta2 = group["betas"]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        exp_avg = state["exp_avg"].lerp_(grad, 1.0 - beta1)
        exp_avg_sq = state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias1 = 1.0 - beta1 ** state["step"]
        bias2 = 1.0 - beta2 ** state["step"]
        denom = (exp_avg_sq.sqrt() / bias2**0.5).add_(group["eps"])
        return exp_avg / bias1 / denom
