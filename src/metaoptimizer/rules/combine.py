"""Composition: ``chain(*rules)`` and ``named_chain(**rules)`` run rules one after the other.

The first member gets the gradients, each later member the updates of the one before (as in
optax): ``chain(clip_by_global_norm(1.0), Adam(1e-3))`` clips gradients before Adam,
``named_chain(lstm=LSTMRule(...), schedule=scale_by_schedule(LearnedSchedule(...)))`` scales the
LSTM's updates by a learned schedule. Each member's slots are namespaced ``"<member>/<slot>"``
(members of ``chain`` are named ``"0"``, ``"1"``, ...), so members never see each other's state,
and the members' meta-parameters are the chain's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from metaoptimizer.rules.base import Params, UpdateRule
from metaoptimizer.rules.state import OptimizerState

__all__ = ["NamedChain", "chain", "named_chain"]


class NamedChain(UpdateRule):
    """Rules applied in order, each keeping its state under its own name."""

    name = "named_chain"

    def __init__(self, **members: UpdateRule) -> None:
        super().__init__()
        if not members:
            raise ValueError("a chain needs at least one rule")
        for key, rule in members.items():
            if not isinstance(rule, UpdateRule):
                raise TypeError(f"chain member {key!r} must be an UpdateRule, got {type(rule).__name__}")
            if "/" in key or "." in key:
                raise ValueError(f"chain member names may not contain '/' or '.', got {key!r}")
        self.members = nn.ModuleDict(members)
        self.budget_aware = any(rule.budget_aware for rule in members.values())
        self.reads_loss = any(rule.reads_loss for rule in members.values())
        defaults = [rule.default_num_steps for rule in members.values() if rule.default_num_steps is not None]
        self.default_num_steps = defaults[0] if defaults else None

    def hyperparameters(self) -> dict[str, object]:
        return dict(self.members.items())

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        num_steps = self.resolve_num_steps(num_steps)
        slots: dict[str, dict[str, Tensor]] = {}
        for key, rule in self.members.items():
            slots.update(rule.init(params, num_steps=num_steps).with_prefix(f"{key}/").slots)
        return OptimizerState(num_steps=num_steps, slots=slots)

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        step, state = self.begin_update(grads, state, params, loss)
        updates: Params = dict(grads)
        slots: dict[str, dict[str, Tensor]] = {}
        for key, rule in self.members.items():
            prefix = f"{key}/"
            member_state = state.member(prefix)
            updates, member_state = rule.update(updates, member_state, params, loss=loss)
            slots.update(member_state.with_prefix(prefix).slots)
        return updates, state.replace(step_count=step, slots=slots)


class Chain(NamedChain):
    """:class:`NamedChain` whose members are named by position."""

    name = "chain"

    def __init__(self, *rules: UpdateRule) -> None:
        super().__init__(**{str(i): rule for i, rule in enumerate(rules)})

    def hyperparameters(self) -> dict[str, object]:
        return {"rules": list(self.members.values())}

    @classmethod
    def from_hyperparameters(cls, hyperparameters: Mapping[str, Any]) -> Chain:
        return cls(*hyperparameters["rules"])


def chain(*rules: UpdateRule) -> Chain:
    """``rules`` applied in order; member ``i``'s slots are ``"i/<slot>"``."""
    return Chain(*rules)


def named_chain(**rules: UpdateRule) -> NamedChain:
    """``rules`` applied in keyword order; member ``key``'s slots are ``"key/<slot>"``."""
    return NamedChain(**rules)
