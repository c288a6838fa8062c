"""Meta-learning a hand-designed optimizer's hyperparameters by differentiating through its updates.

:class:`LearnedHyperparameters` is an update rule that runs one of the hand rules
(:mod:`metaoptimizer.rules.hand`) with its learning rate, and optionally its momentum and
epsilon, computed from meta-parameters: the hand rules accept 0-dim tensor hyperparameters and
differentiate through them, so an unroll's meta-loss has a gradient with respect to these
meta-parameters and ``MetaTrainer`` (or any meta-optimizer) can learn them. Rates are global
or one per parameter tensor.

optax's meta-learning example, RMSProp's learning rate learned while it fits a noisy line, is
``metaopt lr-example`` (:mod:`metaoptimizer.cli.lr_example`, task in :mod:`metaoptimizer.tasks.line`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaoptimizer.config import OptimizerState, check_positive
from metaoptimizer.rules.base import Params, UpdateRule
from metaoptimizer.rules.hand import HandRule, make_hand_rule

LEARNABLE = ("lr", "momentum", "eps")
LR_PARAMETRISATIONS = ("log", "sigmoid")
#: Hand rules with each optional learnable hyperparameter (Adam's momentum is beta1).
_HAS = {"momentum": ("momentum", "rmsprop", "adam", "adamw"), "eps": ("rmsprop", "adam", "adamw")}
_ADAM_LIKE = ("adam", "adamw")


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class LearnedHyperparameters(UpdateRule):
    """A hand rule (``'sgd'``, ``'momentum'``, ``'rmsprop'``, ``'adam'``, ``'adamw'``) whose
    hyperparameters named in ``learn`` are meta-parameters.

    ``lr`` is parametrised as ``exp(raw)`` (``lr_parametrisation='log'``) or ``sigmoid(raw)``
    (``'sigmoid'``, rates in (0, 1) as in optax's example); ``momentum`` (Adam's beta1) as
    ``sigmoid(raw)``; ``eps`` as ``exp(raw)``. Each starts at the rule's value: ``lr``, or the
    ``momentum``/``betas``/``eps`` given in ``fixed`` (the other constructor arguments of the
    hand rule, kept constant), or the rule's default. With ``per_tensor`` every tensor named in
    ``param_names`` has its own values; otherwise one value serves all parameters.
    """

    name = "learned_hyperparameters"

    def __init__(
        self,
        rule: str = "rmsprop",
        lr: float = 0.1,
        *,
        learn: Sequence[str] = ("lr",),
        lr_parametrisation: str = "log",
        param_names: Sequence[str] | None = None,
        per_tensor: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **fixed: Any,
    ) -> None:
        super().__init__()
        check_positive("lr", lr)
        learn = tuple(learn)
        if not learn or len(set(learn)) != len(learn) or not set(learn) <= set(LEARNABLE):
            raise ValueError(f"learn={learn!r} must name distinct hyperparameters among {LEARNABLE}")
        if lr_parametrisation not in LR_PARAMETRISATIONS:
            raise ValueError(
                f"lr_parametrisation={lr_parametrisation!r} is not supported; accepted values: {LR_PARAMETRISATIONS}"
            )
        if not isinstance(per_tensor, bool):
            raise TypeError(f"per_tensor must be True or False, got {per_tensor!r}")
        if per_tensor and not param_names:
            raise ValueError("per_tensor=True needs param_names, the names of the parameter tensors")
        if param_names is not None and len(set(param_names)) != len(param_names):
            raise ValueError(f"param_names must be distinct, got {list(param_names)}")
        for hyper in learn:
            if hyper in _HAS and rule not in _HAS[hyper]:
                raise ValueError(f"rule {rule!r} has no {hyper}; learning {hyper} needs one of {_HAS[hyper]}")
        self.template: HandRule = make_hand_rule(rule, lr=lr, **fixed)
        self.rule_name = rule
        self.lr = float(lr)
        self.learn = learn
        self.lr_parametrisation = lr_parametrisation
        self.param_names = None if param_names is None else list(param_names)
        self.per_tensor = per_tensor
        self.fixed = fixed
        shape = (len(self.param_names),) if per_tensor else ()
        self.raw = nn.ParameterDict(
            {h: nn.Parameter(torch.full(shape, self._raw_init(h), device=device, dtype=dtype)) for h in learn}
        )

    def _initial(self, hyper: str) -> float:
        if hyper == "lr":
            return self.lr
        if hyper == "momentum":
            return float(self.template.betas[0] if self.rule_name in _ADAM_LIKE else self.template.momentum)
        return float(self.template.eps)

    def _raw_init(self, hyper: str) -> float:
        value = self._initial(hyper)
        if hyper == "momentum" or (hyper == "lr" and self.lr_parametrisation == "sigmoid"):
            if not 0.0 < value < 1.0:
                raise ValueError(f"a sigmoid-parametrised {hyper} must start in (0, 1), got {value!r}")
            return _logit(value)
        if value <= 0.0:
            raise ValueError(f"a log-parametrised {hyper} must start > 0, got {value!r}")
        return math.log(value)

    def hyperparameters(self) -> dict[str, object]:
        return {
            "rule": self.rule_name,
            "lr": self.lr,
            "learn": list(self.learn),
            "lr_parametrisation": self.lr_parametrisation,
            "param_names": self.param_names,
            "per_tensor": self.per_tensor,
            **self.fixed,
        }

    def values(self) -> dict[str, Tensor]:
        """Current learned hyperparameters (differentiable; shape ``()`` or ``(len(param_names),)``)."""
        out = {}
        for hyper, raw in self.raw.items():
            log_scale = hyper == "eps" or (hyper == "lr" and self.lr_parametrisation == "log")
            out[hyper] = torch.exp(raw) if log_scale else torch.sigmoid(raw)
        return out

    def _hand_rule(self, values: Mapping[str, Tensor]) -> HandRule:
        """The hand rule with ``values`` (0-dim tensors) in place of its fixed hyperparameters."""
        kwargs = {hyper: values[hyper] for hyper in ("lr", "eps") if hyper in values}
        if "momentum" in values:
            if self.rule_name in _ADAM_LIKE:
                kwargs["betas"] = (values["momentum"], self.template.betas[1])
            else:
                kwargs["momentum"] = values["momentum"]
        # In range by construction (exp, sigmoid): the template's copy skips the constructor's checks.
        return self.template.with_unchecked_hyperparameters(**kwargs)

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        return self.template.init(params, num_steps=num_steps)

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        values = self.values()
        if not self.per_tensor:  # the hand rule checks the call and starts a fresh state itself
            return self._hand_rule(values).update(grads, state, params)
        step, state = self.begin_update(grads, state, params, loss)
        unknown = sorted(set(grads) - set(self.param_names))
        if unknown:
            raise ValueError(f"no learned hyperparameters for {unknown}; this rule knows {self.param_names}")
        updates: Params = {}
        for index, name in enumerate(self.param_names):
            if name in grads:
                rule = self._hand_rule({h: v[index] for h, v in values.items()})
                update, state = rule.update({name: grads[name]}, state.replace(step_count=step - 1), params)
                updates.update(update)
        return updates, state.replace(step_count=step)

    def learned_values(self) -> dict[str, dict[str, float]]:
        """Every learned hyperparameter by parameter tensor name (``'global'`` when no names are known)."""
        names = self.param_names or ["global"]
        with torch.no_grad():
            values = self.values()
            return {
                hyper: {n: float(v[i] if self.per_tensor else v) for i, n in enumerate(names)}
                for hyper, v in values.items()
            }

    def learned_lr(self) -> dict[str, float]:
        """The learning rate of every parameter tensor (a single ``'global'`` entry when no names are known)."""
        if "lr" in self.learn:
            return self.learned_values()["lr"]
        return dict.fromkeys(self.param_names or ["global"], self.lr)
