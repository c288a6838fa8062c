"""The update-rule contract: pure ``init`` / ``update`` over dicts of tensors.

A rule is an ``nn.Module`` whose parameters are its meta-parameters (none for hand-designed
rules). ``update`` never mutates its inputs and returns *additive* updates
(``new_params = params + updates``), so the same code runs under autograd for unrolled
meta-training, under ``torch.no_grad`` for deployment, and under ``torch.func`` transforms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from metaoptimizer.config import OptimizerState

Params = dict[str, Tensor]


class UpdateRule(nn.Module):
    """Base class of all update rules.

    Subclasses implement :meth:`init` and :meth:`update`. ``step`` is the 1-based index of the
    update being computed (the first call gets ``step=1``); the returned state must carry
    ``step_count=step``. Use :func:`next_step` to get it from a state.
    """

    #: Short name used in checkpoints and reports.
    name: str = "rule"
    #: Number of updates a budget-aware rule plans for (see :meth:`set_horizon`); None: the
    #: rule's updates do not depend on the training budget.
    horizon: int | None = None

    def init(self, params: Mapping[str, Tensor]) -> OptimizerState:
        raise NotImplementedError

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], step: int
    ) -> tuple[Params, OptimizerState]:
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, object]:
        """Constructor arguments needed to rebuild this rule (stored in checkpoints)."""
        return {}

    def set_horizon(self, steps: int) -> None:
        """Tell a budget-aware rule how many updates the coming run has (as one tells a cosine
        schedule its length). Rules whose updates ignore the budget (``horizon is None``) ignore it."""


def next_step(state: OptimizerState) -> int:
    """The ``step`` argument for the next :meth:`UpdateRule.update` call on ``state``."""
    return state.step_count + 1


def apply_updates(params: Mapping[str, Tensor], updates: Mapping[str, Tensor]) -> Params:
    """``params + updates`` for every parameter that has an update; others are kept as they are."""
    return {name: (p + updates[name]) if name in updates else p for name, p in params.items()}


def zeros_like_dict(params: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> Params:
    return {name: torch.zeros_like(p, dtype=dtype) for name, p in params.items()}


def check_update_call(grads: Mapping[str, Tensor], params: Mapping[str, Tensor], step: int) -> None:
    """Names, shapes, dtypes and step of an ``update`` call (not values: a finiteness check would sync)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step is the 1-based index of the update (an int >= 1); got step={step!r}")
    for name, g in grads.items():
        if name not in params:
            raise ValueError(f"gradient for unknown parameter {name!r}; known parameters: {sorted(params)}")
        if g.shape != params[name].shape:
            raise ValueError(
                f"gradient of {name!r} has shape {tuple(g.shape)} but the parameter has shape {tuple(params[name].shape)}"
            )
        if not g.is_floating_point():
            raise TypeError(f"gradient of {name!r} must be a floating-point tensor, got dtype {g.dtype}")


def check_grads(grads: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    """Raise a clear error when gradients do not match parameters in names, shapes or finiteness."""
    missing = sorted(set(grads) - set(params))
    if missing:
        raise ValueError(f"gradients for unknown parameters {missing}; known parameters: {sorted(params)}")
    for name, g in grads.items():
        p = params[name]
        if g.shape != p.shape:
            raise ValueError(
                f"gradient of {name!r} has shape {tuple(g.shape)} but the parameter has shape {tuple(p.shape)}"
            )
        if not torch.isfinite(g).all():
            raise ValueError(f"gradient of {name!r} contains NaN or Inf values; the update was not computed")


def check_unit_interval(name: str, value: float, *, closed_low: bool = True) -> None:
    """Raise ValueError unless ``value`` lies in [0, 1) (or (0, 1) when not ``closed_low``)."""
    ok = (0.0 <= value < 1.0) if closed_low else (0.0 < value < 1.0)
    if not ok or math.isnan(value):
        interval = "[0, 1)" if closed_low else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
