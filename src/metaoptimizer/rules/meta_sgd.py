"""Online Meta-SGD: per-coordinate learning rates learned while the model trains.

Every coordinate has its own rate ``alpha`` (``state.per_param_lr``, initialised to ``base_lr``);
the update is ``-alpha * g``. ``alpha`` is itself trained by gradient descent on the training loss
with rate ``alpha_lr``: the loss at ``theta_t = theta_{t-1} - alpha * g_{t-1}`` has the derivative
``d L(theta_t) / d alpha = -g_t * g_{t-1}`` (elementwise), the per-coordinate form of
hypergradient descent (Baydin et al. 2018) and the online counterpart of Meta-SGD's learned
``alpha`` (Li et al. 2017). After each change ``alpha`` is clamped to ``clamp`` (default
[1e-8, 10]), so it stays a positive rate.

``inner_steps`` holds ``alpha`` fixed for that many parameter updates and then applies the summed
meta-gradient of the window's losses: with ``S`` the sum of the gradients applied with the current
``alpha``, the loss of each step contributes ``-g_t * S`` (the first-order meta-gradient, Hessian
terms dropped). ``inner_steps=1`` is the one-step rule above.

State slots: ``update_sum`` (``S``) and ``alpha_grad`` (the window's summed meta-gradient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from metaoptimizer._validation import check_positive
from metaoptimizer.rules.base import Params
from metaoptimizer.rules.hand import HandRule
from metaoptimizer.rules.state import OptimizerState


class MetaSGDRule(HandRule):
    """Per-coordinate learned learning rates, adapted online by their meta-gradient."""

    name = "meta_sgd"
    slot_names = ("alpha", "update_sum", "alpha_grad")

    def __init__(
        self,
        base_lr: float = 1e-3,
        alpha_lr: float = 1e-2,
        clamp: tuple[float, float] = (1e-8, 10.0),
        inner_steps: int = 1,
    ) -> None:
        super().__init__()
        check_positive("base_lr", base_lr)
        check_positive("alpha_lr", alpha_lr, allow_zero=True)
        check_positive("inner_steps", inner_steps, integer=True)
        if (
            not isinstance(clamp, (tuple, list))
            or len(clamp) != 2
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in clamp)
            or not 0 < clamp[0] <= base_lr <= clamp[1]
        ):
            raise ValueError(
                f"clamp must be a (low, high) pair of finite numbers with 0 < low <= base_lr <= high, "
                f"got clamp={clamp!r} with base_lr={base_lr!r}"
            )
        self.base_lr, self.alpha_lr = float(base_lr), float(alpha_lr)
        self.clamp = (float(clamp[0]), float(clamp[1]))
        self.inner_steps = inner_steps

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        return self.reset_per_param_lr(super().init(params, num_steps=num_steps))

    def reset_per_param_lr(self, state: OptimizerState) -> OptimizerState:
        """``state`` with every rate back at ``base_lr`` and its meta-gradient window cleared;
        the step count is kept."""
        if "update_sum" not in state.slots:
            raise ValueError("state has no 'update_sum' slot; build the state with MetaSGDRule.init(params)")
        shapes = state.slots["update_sum"]
        zeros = {n: torch.zeros_like(s) for n, s in shapes.items()}
        alpha = {n: torch.full_like(s, self.base_lr) for n, s in shapes.items()}
        return state.replace(slots={**state.slots, "alpha": alpha, "update_sum": zeros, "alpha_grad": dict(zeros)})

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        step, state = self.begin_update(grads, state, params, loss)
        grads = self._gradients(grads, state, params, 0.0)
        window_ends = step % self.inner_steps == 0
        low, high = self.clamp
        alpha, update_sum, alpha_grad, updates = {}, {}, {}, {}
        for name, g in grads.items():
            meta_grad = state.slots["alpha_grad"][name] - g * state.slots["update_sum"][name]
            if window_ends:
                alpha[name] = (state.slots["alpha"][name] - self.alpha_lr * meta_grad).clamp(low, high)
                alpha_grad[name], update_sum[name] = torch.zeros_like(g), g
            else:
                alpha[name] = state.slots["alpha"][name]
                alpha_grad[name], update_sum[name] = meta_grad, state.slots["update_sum"][name] + g
            updates[name] = -alpha[name] * g
        new_state = state.replace(
            step_count=step,
            slots={
                **state.slots,
                "alpha": {**state.slots["alpha"], **alpha},
                "update_sum": {**state.slots["update_sum"], **update_sum},
                "alpha_grad": {**state.slots["alpha_grad"], **alpha_grad},
            },
        )
        return updates, new_state
