"""Run a ``torch.optim`` optimizer (Prodigy, schedule-free AdamW, ...) as an update rule, so that
evaluation baselines from other packages go through the runner's one deployment loop.

This adapter is for deployment (evaluation) only: it is **not differentiable** (the wrapped
optimizer updates its own tensors in place under ``torch.no_grad``) and it is **stateful** (the
optimizer and its tensors live on the rule instance, not in the returned ``OptimizerState``):
``init`` starts a new run and discards the previous one, so one instance serves one run at a
time. It is not a registered rule (no spec, no checkpoint): it exists for evaluation baselines. Each ``update`` copies the caller's parameters into the optimizer's tensors, sets their
gradients, takes one ``optimizer.step()`` and returns the difference as the additive update;
the caller's tensors are never mutated.

Optimizers that train at one point and evaluate at another (schedule-free methods: gradients at
``y``, the averaged iterate ``x`` for evaluation) expose ``train()`` / ``eval()``; for them
:meth:`TorchOptimizerRule.evaluation_params` returns the evaluation point, which the runner
evaluates (validation metrics in eval mode), while training steps always run in train mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metaoptimizer.rules.base import Params, UpdateRule
from metaoptimizer.rules.state import OptimizerState


class TorchOptimizerRule(UpdateRule):
    """``optimizer_class(params, **options)`` (a ``torch.optim.Optimizer`` subclass) as a
    deployment-only, non-differentiable update rule (see the module docstring)."""

    def __init__(self, optimizer_class: type[torch.optim.Optimizer], **options: Any) -> None:
        super().__init__()
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        self.name = f"torch.optim:{optimizer_class.__name__}"  # for messages; the class stays unregistered
        self.optimizer_class = optimizer_class
        self.options = options
        self._leaves: dict[str, nn.Parameter] = {}
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def switches_modes(self) -> bool:
        """True for optimizers with ``train()`` / ``eval()`` modes (schedule-free methods)."""
        return callable(getattr(self.optimizer_class, "train", None)) and callable(
            getattr(self.optimizer_class, "eval", None))

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        """Start a new run: fresh copies of ``params`` and a fresh optimizer over them (in train
        mode). The budget is kept in the state; the wrapped optimizers do not read it."""
        self._leaves = {name: nn.Parameter(p.detach().clone()) for name, p in params.items()}
        self._optimizer = self.optimizer_class(list(self._leaves.values()), **self.options)
        if self.switches_modes:
            self._optimizer.train()
        return OptimizerState(num_steps=self.resolve_num_steps(num_steps))

    def _load(self, params: Mapping[str, Tensor]) -> torch.optim.Optimizer:
        if self._optimizer is None or set(params) != set(self._leaves):
            raise ValueError(f"{self.optimizer_class.__name__} has no run over these parameters; call init(params) first")
        with torch.no_grad():
            for name, leaf in self._leaves.items():
                leaf.copy_(params[name])
        return self._optimizer

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        step, state = self.begin_update(grads, state, params, loss)  # a fresh state calls init: a new run
        optimizer = self._load(params)
        for name, leaf in self._leaves.items():
            leaf.grad = grads[name].detach().clone() if name in grads else None
        optimizer.step()
        with torch.no_grad():
            updates = {name: self._leaves[name].detach() - params[name] for name in grads}
        for leaf in self._leaves.values():
            leaf.grad = None
        return updates, state.replace(step_count=step)

    def evaluation_params(self, params: Mapping[str, Tensor]) -> Params:
        """The point to evaluate for training point ``params``: the averaged iterate (eval mode)
        for optimizers with modes, ``params`` itself otherwise."""
        if not self.switches_modes:
            return dict(params)
        optimizer = self._load(params)
        optimizer.eval()
        point = {name: leaf.detach().clone() for name, leaf in self._leaves.items()}
        optimizer.train()
        return point

    def extra_repr(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options.items())
        return f"{self.optimizer_class.__name__}({options})"
