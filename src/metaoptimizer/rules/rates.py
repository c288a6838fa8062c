"""Per-coordinate learning rates adapted online, while the model trains.

Every coordinate has its own rate ``alpha`` (the ``alpha`` slot, ``state.per_param_lr``),
initialised to ``base_lr``; the update is ``-alpha * g``, and after each change ``alpha`` is
clamped to ``clamp`` (default [1e-8, 10]). Two rules differ in how ``alpha`` changes:

* :class:`HypergradientRule` (the default, ``method='hypergradient'``) follows the derivative of
  the training loss with respect to ``alpha``. The loss at ``theta_t = theta_{t-1} - alpha *
  g_{t-1}`` has ``d L(theta_t) / d alpha = -g_t * g_{t-1}`` (elementwise), so
  ``alpha += alpha_lr * g_t * g_{t-1}``: per-coordinate hypergradient descent (Baydin et al. 2018).
  A rate grows while consecutive gradients agree and shrinks when they alternate.
* :class:`ShrinkingRatesRule` is the seed specification's "MetaSGD optimizer" as documented:
  ``delta = alpha * g``, ``theta -= delta``, ``alpha -= alpha_lr * g * delta``. Since
  ``g * delta = alpha * g^2 >= 0``, its rates only ever shrink (by the factor ``1 - alpha_lr * g^2``),
  a decay driven by squared gradients rather than a learned rate.

Neither is Meta-SGD (Li et al. 2017), which learns rates across tasks by episodic meta-training
(:class:`~metaoptimizer.meta.gradient_learner.GradientMetaLearner`); these adapt rates within one run.

``inner_steps`` holds ``alpha`` fixed for that many updates and then applies the window's summed
rate gradient: for the hypergradient rule, with ``S`` the sum of the gradients applied with the
current ``alpha``, each step contributes ``-g_t * S`` (first order, Hessian terms dropped); for
the shrinking rule each step contributes ``g_t * delta_t``. ``inner_steps=1`` is the one-step rule.

Defaults (``base_lr=0.3``, and ``alpha_lr=1`` for the hypergradient rule) were chosen with
``benchmarks/bench_online_rates.py`` over a grid, on a small MLP and a tiny GPT-like model
against Adam at lr 1e-3 (BENCHMARKS.md): after 300 steps the hypergradient rule ends below Adam's
loss on the MLP and 2-3% above it on the transformer, where no setting of the grid beat Adam
(``base_lr=1``, or ``alpha_lr=100``, diverged there). For transformers prefer Adam; elsewhere tune ``base_lr`` as
SGD's learning rate (the rate adaptation refines it, it does not replace it).
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

__all__ = ["HypergradientRule", "PerCoordinateRates", "ShrinkingRatesRule"]

#: Default initial rate of both rules (see the module docstring).
BASE_LR = 0.3


class PerCoordinateRates(HandRule):
    """Shared by the rate rules: arguments, the ``alpha`` slot, rate accessors and reset.

    Subclasses set ``slot_names`` (``"alpha"`` first) and implement ``update``. A torch param
    group's ``weight_decay`` is the adapter's decoupled decay (these rules have none of their own).
    """

    group_hyperparameters = ()

    def __init__(self, base_lr: float, alpha_lr: float, clamp: tuple[float, float], inner_steps: int) -> None:
        super().__init__()
        check_positive("alpha_lr", alpha_lr, allow_zero=True)
        check_positive("inner_steps", inner_steps, integer=True)
        if (
            not isinstance(clamp, (tuple, list))
            or len(clamp) != 2
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in clamp)
            or not 0 < clamp[0] <= clamp[1]
        ):
            raise ValueError(f"clamp must be a (low, high) pair of finite numbers with 0 < low <= high, got {clamp!r}")
        self.clamp = (float(clamp[0]), float(clamp[1]))
        self.alpha_lr = float(alpha_lr)
        self.inner_steps = inner_steps
        self.set_learning_rate(base_lr)

    def get_learning_rate(self) -> float:
        """``base_lr``: the rate every coordinate starts from (and returns to on reset)."""
        return self.base_lr

    def set_learning_rate(self, base_lr: float) -> None:
        """Set ``base_lr`` for parameters initialised or reset from now on (existing rates are kept)."""
        check_positive("base_lr", base_lr)
        low, high = self.clamp
        if not low <= base_lr <= high:
            raise ValueError(f"base_lr must lie within clamp={self.clamp!r}, got {base_lr!r}")
        self.base_lr = float(base_lr)

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        return self.reset_per_param_lr(super().init(params, num_steps=num_steps))

    @staticmethod
    def get_per_param_lr(state: OptimizerState) -> dict[str, Tensor]:
        """The current per-coordinate rates, by parameter name (``state.step_count`` counts the updates)."""
        return dict(state.slots["alpha"])

    def reset_per_param_lr(self, state: OptimizerState) -> OptimizerState:
        """``state`` with every rate back at ``base_lr`` and the rate-gradient window cleared; the
        step count is kept."""
        if "alpha" not in state.slots:
            raise ValueError(f"state has no 'alpha' slot; build the state with {type(self).__name__}.init(params)")
        alpha = state.slots["alpha"]
        slots = {slot: {n: torch.zeros_like(a) for n, a in alpha.items()} for slot in self.slot_names}
        slots["alpha"] = {n: torch.full_like(a, self.base_lr) for n, a in alpha.items()}
        return state.replace(slots={**state.slots, **slots})

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        step, state = self.begin_update(grads, state, params, loss)
        grads = self._gradients(grads, state, params, 0.0)
        window_ends = step % self.inner_steps == 0
        new: dict[str, Params] = {slot: {} for slot in self.slot_names}
        updates = {}
        for name, g in grads.items():
            entries = {slot: state.slots[slot][name] for slot in self.slot_names}
            updates[name], entries = self._coordinate_step(g, entries, window_ends)
            for slot, value in entries.items():
                new[slot][name] = value
        slots = {slot: {**state.slots[slot], **new[slot]} for slot in self.slot_names}
        return updates, state.replace(step_count=step, slots={**state.slots, **slots})

    def _coordinate_step(
        self, g: Tensor, entries: dict[str, Tensor], window_ends: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One tensor's update and its new slot entries, from its gradient and current entries."""
        raise NotImplementedError


class HypergradientRule(PerCoordinateRates):
    """Per-coordinate rates adapted online by their hypergradient (see the module docstring)."""

    name = "hypergradient"
    slot_names = ("alpha", "update_sum", "alpha_grad")

    def __init__(
        self, base_lr: float = BASE_LR, alpha_lr: float = 1.0, clamp: tuple[float, float] = (1e-8, 10.0),
        inner_steps: int = 1,
    ) -> None:
        super().__init__(base_lr, alpha_lr, clamp, inner_steps)

    def _coordinate_step(
        self, g: Tensor, entries: dict[str, Tensor], window_ends: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        alpha, update_sum = entries["alpha"], entries["update_sum"]
        rate_grad = entries["alpha_grad"] - g * update_sum
        if window_ends:
            alpha = (alpha - self.alpha_lr * rate_grad).clamp(*self.clamp)
            rate_grad, update_sum = torch.zeros_like(g), g
        else:
            update_sum = update_sum + g
        return -alpha * g, {"alpha": alpha, "update_sum": update_sum, "alpha_grad": rate_grad}


class ShrinkingRatesRule(PerCoordinateRates):
    """The seed specification's documented MetaSGD optimizer: ``alpha -= alpha_lr * g * (alpha * g)``,
    so rates only shrink (see the module docstring)."""

    name = "shrinking_rates"
    slot_names = ("alpha", "alpha_grad")

    def __init__(
        self, base_lr: float = BASE_LR, alpha_lr: float = 1e-3, clamp: tuple[float, float] = (1e-8, 10.0),
        inner_steps: int = 5,
    ) -> None:
        super().__init__(base_lr, alpha_lr, clamp, inner_steps)

    def _coordinate_step(
        self, g: Tensor, entries: dict[str, Tensor], window_ends: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        alpha = entries["alpha"]
        delta = alpha * g
        rate_grad = entries["alpha_grad"] + g * delta
        if window_ends:
            alpha = (alpha - self.alpha_lr * rate_grad).clamp(*self.clamp)
            rate_grad = torch.zeros_like(g)
        return -delta, {"alpha": alpha, "alpha_grad": rate_grad}
