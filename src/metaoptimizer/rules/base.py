"""The update-rule contract: pure ``init`` / ``update`` over dicts of tensors.

    init(params, *, num_steps=None) -> state          # the run's budget lives in the state
    update(grads, state, params, *, loss=None) -> (updates, new_state)

A rule is an ``nn.Module`` whose parameters are its meta-parameters (none for hand-designed
rules). ``update`` never mutates its inputs and returns *additive* updates
(``new_params = params + updates``), so the same code runs under autograd for unrolled
meta-training, under ``torch.no_grad`` for deployment, and under ``torch.func`` transforms.
Rules that read the run's length (``budget_aware``) take it from ``state.num_steps``; rules that
read the training loss (``reads_loss``) get it as ``loss=`` at every update.

Every rule class with a ``name`` is registered, and a rule is described by its name and
constructor arguments (:func:`to_spec`), from which :func:`from_spec` rebuilds it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metaoptimizer._validation import check_positive, check_unit_interval
from metaoptimizer.rules.state import OptimizerState

Params = dict[str, Tensor]

#: Every rule class by its ``name`` (filled as classes are defined).
RULES: dict[str, type[UpdateRule]] = {}

__all__ = [
    "RULES",
    "OptimizerState",
    "Params",
    "UpdateRule",
    "apply_updates",
    "check_grads",
    "check_unit_interval",
    "from_spec",
    "to_spec",
]


class UpdateRule(nn.Module):
    """Base class of all update rules.

    Subclasses implement :meth:`init` and :meth:`update`; ``update`` starts with
    :meth:`begin_update` and returns a state with ``step_count`` one higher. Constructor
    arguments are stored as attributes of the same names, so :meth:`hyperparameters` reads them
    back.
    """

    #: Registry key, used in checkpoints, specs and reports.
    name: str = "rule"
    #: Whether updates depend on the run's length (``state.num_steps``).
    budget_aware: bool = False
    #: Whether ``update`` needs the training loss (``loss=``).
    reads_loss: bool = False
    #: The budget a budget-aware rule assumes when ``init`` gets none (the length it was
    #: meta-trained for); None: such a rule needs ``num_steps``.
    default_num_steps: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            known = RULES.get(cls.name)
            # The first class of a name keeps it; a reloaded module's class replaces itself.
            if known is None or (known.__module__, known.__qualname__) == (cls.__module__, cls.__qualname__):
                RULES[cls.name] = cls

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        raise NotImplementedError

    def update(
        self,
        grads: Mapping[str, Tensor],
        state: OptimizerState,
        params: Mapping[str, Tensor],
        *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, object]:
        """The constructor arguments, read back from the attributes of the same names."""
        signature = inspect.signature(type(self).__init__)
        return {
            name: getattr(self, name)
            for name, p in signature.parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    @classmethod
    def from_hyperparameters(cls, hyperparameters: Mapping[str, Any]) -> UpdateRule:
        """Rebuild from :meth:`hyperparameters` (composites and rules with structured arguments override it)."""
        return cls(**hyperparameters)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items() if not isinstance(v, nn.Module))

    def resolve_num_steps(self, num_steps: int | None) -> int | None:
        """The budget to keep in a new state: ``num_steps``, else the rule's default; a
        budget-aware rule without either raises."""
        if num_steps is not None:
            check_positive("num_steps", num_steps, integer=True)
            return num_steps
        if self.budget_aware and self.default_num_steps is None:
            raise ValueError(
                f"the update rule {self.name!r} is budget-aware: pass the run's length, init(params, num_steps=N) "
                "(torch optimizers: total_steps=N)"
            )
        return self.default_num_steps if self.budget_aware else None

    def begin_update(
        self,
        grads: Mapping[str, Tensor],
        state: OptimizerState,
        params: Mapping[str, Tensor],
        loss: Tensor | float | None = None,
    ) -> tuple[int, OptimizerState]:
        """Check an ``update`` call and return (1-based index of this update, state to start from).

        A fresh ``OptimizerState()`` becomes ``init(params)`` (keeping its budget, clock and
        running loss). Checks names, shapes and dtypes, not values: a finiteness check would read
        the data (a device sync, and data-dependent control flow ``vmap``/``compile`` reject).
        """
        check_update_call(grads, params)
        if not isinstance(state, OptimizerState):
            raise TypeError(f"state must be an OptimizerState, got {type(state).__name__}")
        if self.reads_loss and loss is None:
            raise ValueError(
                f"the update rule {self.name!r} reads the training loss: pass update(..., loss=loss) "
                "(torch optimizers: optimizer.step(closure) or optimizer.step(loss=loss))"
            )
        if state.is_fresh():
            fresh = self.init(params, num_steps=state.num_steps)
            state = fresh.replace(running_loss=state.running_loss, clock=state.clock)
        return state.step_count + 1, state


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The precision learned rules compute in: float64 for float64 parameters, float32 otherwise
    (float16/bfloat16 parameters get float32 arithmetic, and their updates are cast back)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def in_compute_dtype(tensors: Mapping[str, Tensor]) -> Params:
    """``tensors`` cast to :func:`compute_dtype` (no copy where they already are)."""
    return {name: t.to(compute_dtype(t.dtype)) for name, t in tensors.items()}


def check_update_call(grads: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    """Names, shapes and dtypes of an ``update`` call's gradients."""
    for name, g in grads.items():
        if name not in params:
            raise ValueError(f"gradient for unknown parameter {name!r}; known parameters: {sorted(params)}")
        if g.shape != params[name].shape:
            raise ValueError(
                f"gradient of {name!r} has shape {tuple(g.shape)} but the parameter has shape {tuple(params[name].shape)}"
            )
        if not g.is_floating_point():
            raise TypeError(f"gradient of {name!r} must be a floating-point tensor, got dtype {g.dtype}")


def check_slots(rule: UpdateRule, state: OptimizerState, names, slot_names) -> None:
    """Raise when ``state`` lacks one of ``slot_names`` for a parameter in ``names``."""
    for name in names:
        missing = [slot for slot in slot_names if name not in state.slots.get(slot, {})]
        if missing:
            raise ValueError(
                f"state has no {missing} entry for {name!r}; build the state with {type(rule).__name__}.init(params)"
            )


def apply_updates(params: Mapping[str, Tensor], updates: Mapping[str, Tensor]) -> Params:
    """``params + updates`` for every parameter that has an update; others are kept as they are."""
    return {name: (p + updates[name]) if name in updates else p for name, p in params.items()}


def zeros_like_dict(params: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> Params:
    return {name: torch.zeros_like(p, dtype=dtype) for name, p in params.items()}


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


def _spec_value(value: Any) -> Any:
    if isinstance(value, UpdateRule):
        return to_spec(value)
    if hasattr(value, "to_spec"):
        return value.to_spec()
    if hasattr(value, "to_dict") and not isinstance(value, Mapping):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _spec_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_spec_value(v) for v in value)
    return value


def to_spec(rule: UpdateRule) -> dict[str, Any]:
    """``{"rule": name, "hyperparameters": {...}}``: enough to rebuild ``rule`` (without its weights)."""
    if type(rule).name not in RULES or RULES[type(rule).name] is not type(rule):
        raise ValueError(f"{type(rule).__name__} is not a registered rule (give the class a unique `name`)")
    return {"rule": rule.name, "hyperparameters": {k: _spec_value(v) for k, v in rule.hyperparameters().items()}}


def _is_spec(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"rule", "hyperparameters"}


def _from_spec_value(value: Any) -> Any:
    if _is_spec(value):
        return from_spec(value)
    if isinstance(value, Mapping):
        return {k: _from_spec_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_from_spec_value(v) for v in value)
    return value


def from_spec(spec: Mapping[str, Any]) -> UpdateRule:
    """The rule that :func:`to_spec` described, with freshly initialised meta-parameters."""
    if not _is_spec(spec):
        raise ValueError(f"a rule spec is a dict with keys 'rule' and 'hyperparameters', got {spec!r}")
    name = spec["rule"]
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; registered rules: {sorted(RULES)}")
    cls = RULES[name]
    return cls.from_hyperparameters(_from_spec_value(dict(spec["hyperparameters"])))

