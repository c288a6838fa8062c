"""``OptimizerState``: the state of any update rule over a dict of parameters.

Every per-parameter tensor lives in ``slots[slot][parameter name]``; a rule owns the slots it
creates (composites prefix their members' slots with ``"<member>/"``). Keying by parameter name is
what lets the ``torch.optim`` adapter split a state per parameter and merge it back. Besides the
slots the state holds what every rule may read: the number of updates applied (``step_count``),
the run's budget (``num_steps``, from ``init``), the adapter's running loss, and ``clock``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor


@dataclass
class OptimizerState:
    """State of an update rule; ``OptimizerState()`` with its defaults is a fresh state.

    ``step_count`` counts the updates applied to these parameters (bias corrections use it);
    ``clock``, when set, is the run's global count of updates (the torch adapter sets it to the
    optimizer's step, so a parameter that joined late or skipped steps still follows the run's
    schedule); ``num_steps`` is the run's length for budget-aware rules; ``running_loss`` an
    exponential average of the losses the caller reported. The state is a pytree, so
    ``torch.utils._pytree`` maps, detaches and flattens it.
    """

    step_count: int = 0
    num_steps: int | None = None
    running_loss: float | None = None
    clock: int | None = None
    slots: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def schedule_step(self) -> int:
        """0-based index of the coming update on the run's clock (for schedules and budgets)."""
        return self.step_count if self.clock is None else self.clock

    def is_fresh(self) -> bool:
        """True for a state no ``init`` has filled and no update has advanced."""
        return self.step_count == 0 and not self.slots

    # The spec's fields, as views onto the slots of the rules that keep them.
    @property
    def hidden(self) -> dict[str, Tensor]:
        """Recurrent per-coordinate hidden state (the LSTM rule's ``hidden`` slot)."""
        return self._view("hidden")

    @property
    def cell(self) -> dict[str, Tensor]:
        """Recurrent per-coordinate cell state (the LSTM rule's ``cell`` slot)."""
        return self._view("cell")

    @property
    def per_param_lr(self) -> dict[str, Tensor]:
        """Per-coordinate learning rates (the online rate rule's ``alpha`` slot)."""
        return self._view("alpha")

    def _view(self, slot: str) -> dict[str, Tensor]:
        merged: dict[str, Tensor] = {}
        for name, values in self.slots.items():
            if name == slot or name.endswith("/" + slot):
                merged.update(values)
        return merged

    def replace(self, **changes: Any) -> OptimizerState:
        return dataclasses.replace(self, **changes)

    def map_tensors(self, fn) -> OptimizerState:
        """Apply ``fn`` to every tensor in the state, leaving other leaves unchanged."""
        return pytree.tree_map(lambda x: fn(x) if isinstance(x, Tensor) else x, self)

    def detach(self) -> OptimizerState:
        """Cut the autograd graph (used at truncation boundaries)."""
        return self.map_tensors(lambda t: t.detach())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> OptimizerState:
        return self.map_tensors(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def tensors(self) -> list[Tensor]:
        return [x for x in pytree.tree_leaves(self) if isinstance(x, Tensor)]

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (safe for ``torch.save`` and ``weights_only`` loading); tensors are shared."""
        return pytree.tree_map(lambda x: x, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def select(self, names) -> OptimizerState:
        """The state of the parameters in ``names`` only (same counters)."""
        names = set(names)
        return self.replace(
            slots={slot: {k: v for k, v in values.items() if k in names} for slot, values in self.slots.items()}
        )

    def with_prefix(self, prefix: str) -> OptimizerState:
        """The same state with every slot renamed ``prefix + slot`` (how composites namespace members)."""
        return self.replace(slots={prefix + slot: values for slot, values in self.slots.items()})

    def member(self, prefix: str) -> OptimizerState:
        """The slots under ``prefix``, with the prefix removed (inverse of :meth:`with_prefix`)."""
        return self.replace(
            slots={slot[len(prefix):]: values for slot, values in self.slots.items() if slot.startswith(prefix)}
        )

    @classmethod
    def merge(cls, states: list[OptimizerState]) -> OptimizerState:
        """Union of states over disjoint parameter names; step counts must agree."""
        if not states:
            return cls()
        counts = {s.step_count for s in states}
        if len(counts) != 1:
            raise ValueError(f"cannot merge states with different step counts {sorted(counts)}")
        first = states[0]
        merged = first.replace(slots={})
        for s in states:
            for slot, values in s.slots.items():
                merged.slots.setdefault(slot, {}).update(values)
        return merged

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizerState:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise ValueError(f"not an OptimizerState dict; expected keys among {sorted(known)}")
        return cls(**data)


pytree.register_dataclass(OptimizerState)
