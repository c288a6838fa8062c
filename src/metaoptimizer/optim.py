"""A ``torch.optim.Optimizer`` that runs any :class:`~metaoptimizer.rules.base.UpdateRule`.

As in every torch optimizer, ``optimizer.state[p]`` is a dict of tensors: ``"step"`` (the
updates applied to ``p``, a 0-d CPU tensor) and the rule's slots for ``p`` (``"exp_avg"``,
``"lstm/hidden"``, ...), so code that walks or moves optimizer state works. Parameters are named
stably (``"g0.p3"``: group 0, parameter 3) so they can join late (``add_param_group``) or miss
gradients on some steps. Each step merges the states of the parameters that have gradients,
grouped by step count (and by the group's hyperparameters), calls ``rule.update`` once per such
cohort under ``torch.no_grad`` and splits the new state back. Every group shares the optimizer's
clock (its number of steps), so a budget-aware rule puts a late parameter at the run's point of
its schedule, and the run's length (``total_steps``) and the loss (``step(closure)`` or
``step(loss=...)``) reach the rule.

What a param group holds, and who reads it:

* ``lr`` multiplies the rule's updates (and the decay below), so schedulers that change only the
  learning rate (``StepLR``, ``LambdaLR``, ``CosineAnnealingLR``, ``OneCycleLR(...,
  cycle_momentum=False)``, ...) work unchanged; a learned rule's ``lr`` is a multiplier, 1.0 by
  default.
* ``weight_decay``: hand-designed rules read their own (coupled L2 for SGD, momentum, RMSProp and
  Adam, decoupled ``lr * weight_decay`` for AdamW, as ``torch.optim``); for every other rule it is
  decoupled decay applied by the adapter, ``p <- p * (1 - lr * weight_decay)`` before the update,
  torch's AdamW formula with the group's ``lr``. Since a learned rule's ``lr`` is a multiplier of
  1, ``weight_decay`` there is AdamW's product ``lr * weight_decay`` (the fraction of the weights
  removed per step): AdamW(lr=1e-3, weight_decay=0.01) decays like ``weight_decay=1e-5``.
* ``momentum`` (Momentum, RMSProp built with momentum > 0) and ``betas`` (Adam, AdamW): the rule's
  own coefficients, which the group may change, so ``OneCycleLR`` and ``CyclicLR`` cycle them with
  their defaults. Rules without a single momentum coefficient (learned rules, SGD, the rate rules)
  expose neither, and torch's schedulers then refuse ``cycle_momentum=True`` ("optimizer must
  support momentum or beta1"): pass ``cycle_momentum=False``.
* Any other torch hyperparameter (``eps``, ``nesterov``, ...) in a group is an error, never ignored.

Hand-designed rules with torch kernels (SGD, momentum, uncentered RMSProp, Adam, AdamW; see
:meth:`~metaoptimizer.rules.hand.HandRule.torch_step`) run through multi-tensor (foreach) kernels
by default, or ``torch.optim``'s fused kernels with ``fused=True`` (SGD, momentum, and Adam/AdamW
at ``eps_root=0``); ``foreach=False`` runs the rule's functional update (the differentiable form),
which the kernels match to rounding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from metaoptimizer._validation import check_positive, check_unit_interval
from metaoptimizer.rules.base import UpdateRule
from metaoptimizer.rules.hand import HandRule
from metaoptimizer.rules.rates import PerCoordinateRates
from metaoptimizer.rules.state import OptimizerState

__all__ = ["NONFINITE_POLICIES", "TORCH_HYPERPARAMETERS", "LearnedOptimizer"]

NONFINITE_POLICIES = ("raise", "skip")
#: ``torch.optim`` hyperparameters a param group may hold only where the rule reads them.
TORCH_HYPERPARAMETERS = ("momentum", "betas", "dampening", "nesterov", "eps", "alpha", "centered", "amsgrad")


def _plain(value: Any) -> Any:
    """A group value as plain numbers (0-d tensors to floats, lists to tuples), for comparison."""
    if isinstance(value, Tensor):
        return float(value)
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _param_name(group_index: int, param_index: int) -> str:
    return f"g{group_index}.p{param_index}"


def _split_state(
    state: OptimizerState, names: Iterable[str], shared: frozenset[int] = frozenset()
) -> dict[str, dict[str, Tensor]]:
    """One torch-style state dict per name (``"step"`` plus the rule's slots), in one pass.

    Tensors whose storage is in ``shared`` (the data pointers of the parameters and gradients) are
    cloned: the adapter updates parameters in place and autograd may accumulate into gradients in
    place, so a rule that keeps a reference to either would see it change behind its back.
    """
    step = torch.tensor(float(state.step_count))
    out: dict[str, dict[str, Tensor]] = {name: {"step": step} for name in names}
    for slot, values in state.slots.items():
        for name, tensor in values.items():
            if name not in out:
                raise ValueError(f"the update rule returned state for unknown parameter {name!r}; known: {sorted(out)}")
            out[name][slot] = tensor.clone() if tensor.untyped_storage().data_ptr() in shared else tensor
    return out


def _merge_states(states: Mapping[str, Mapping[str, Tensor]], **counters: Any) -> OptimizerState:
    """The rule's view of several parameters' torch-style state dicts (one step count)."""
    slots: dict[str, dict[str, Tensor]] = {}
    for name, entries in states.items():
        for slot, tensor in entries.items():
            if slot != "step":
                slots.setdefault(slot, {})[name] = tensor
    return OptimizerState(slots=slots, **counters)


def _nonfinite_names(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of the tensors holding NaN or Inf.

    One pass per tensor: its sum is NaN or Inf whenever the tensor holds either, and the sums are
    checked with one synchronisation per device and dtype. A sum can also overflow on finite
    values, so tensors with a non-finite sum get the exact check (max and min, which propagate NaN
    and hold any Inf). Plain reductions are used because they are several times faster than
    ``isfinite().all()`` or an infinity norm on CPU.
    """
    sums = {name: t.sum() for name, t in tensors.items() if t.numel() > 0}
    kinds: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for total in sums.values():
        kinds.setdefault((total.device, total.dtype), []).append(total)
    if all(bool(torch.stack(same).isfinite().all()) for same in kinds.values()):
        return []
    suspects = [name for name, total in sums.items() if not bool(total.isfinite())]
    return [
        name for name in suspects
        if not bool(torch.stack([tensors[name].amax(), tensors[name].amin()]).isfinite().all())
    ]


class LearnedOptimizer(torch.optim.Optimizer):
    """Run ``rule`` as a ``torch.optim`` optimizer.

    ``lr`` (per parameter group) multiplies the rule's updates: keep 1.0 to apply the rule as
    trained, or let an LR scheduler vary it. ``maximize`` feeds the rule negated gradients.
    ``nonfinite`` decides what a NaN/Inf gradient or closure loss does: ``"raise"`` a ValueError
    naming the parameter, or ``"skip"`` the whole step and count it in ``skipped_steps``; either
    way no parameter and no state changes. The loss of a step comes from ``step(closure)`` or
    ``step(loss=...)`` and reaches the rule (rules with ``reads_loss``, such as Celo, need it);
    ``loss_decay`` is the decay of its exponential average, kept in ``running_loss``. Param
    groups hold ``lr``, ``weight_decay`` and the rule's own group hyperparameters (see the module
    docstring). ``foreach``/``fused`` choose torch's kernels for hand-designed rules that have
    them (default: foreach; ``foreach=False``: the rule's functional update); asking for them with
    another rule is an error. Learned rules with an ``update_in_place`` (the l2o MLP and the LSTM)
    write parameters and state in place by default, their deployment path; ``foreach=False``
    runs their functional update instead (the same numbers to rounding).
    ``total_steps`` tells a budget-aware rule (``rule.budget_aware``, e.g. Celo or an LSTM with a
    learned schedule) the length of the run, as ``OneCycleLR`` needs it; without it such a rule
    plans for the length it was meta-trained on (a warning says so) or, when it has none, the
    constructor raises.

    The rule is not moved: its parameters and buffers must already be on the parameters' device
    (a ValueError says so otherwise). ``state_dict()`` holds only tensors, numbers, strings and
    containers, so ``torch.load(weights_only=True)`` reads it back; the rule's own weights are not
    part of it (save them with the rule).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        rule: UpdateRule,
        lr: float = 1.0,
        *,
        maximize: bool = False,
        nonfinite: str = "raise",
        loss_decay: float = 0.9,
        total_steps: int | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if not isinstance(rule, UpdateRule):
            raise TypeError(f"rule must be a metaoptimizer UpdateRule, got {type(rule).__name__}")
        self.total_steps = rule.resolve_num_steps(total_steps)
        if total_steps is None and rule.budget_aware:
            warnings.warn(
                f"{type(rule).__name__} is budget-aware and plans for {self.total_steps} updates (the length it "
                "was meta-trained for); pass total_steps=N for a run of N updates",
                stacklevel=2,
            )
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r} is not supported; accepted values: {NONFINITE_POLICIES}")
        check_unit_interval("loss_decay", loss_decay)
        self.rule = rule
        self.kernel = self._choose_kernel(foreach, fused)
        self.group_keys = rule.group_hyperparameters if isinstance(rule, HandRule) else ()
        self.nonfinite = nonfinite
        self.loss_decay = float(loss_decay)
        self.skipped_steps = 0
        self.clock = 0
        self.running_loss: float | None = None
        defaults = {"lr": lr, "maximize": maximize, "weight_decay": 0.0}
        defaults.update({key: _plain(getattr(rule, key)) for key in self.group_keys})
        super().__init__(params, defaults)

    def _choose_kernel(self, foreach: bool | None, fused: bool | None) -> str | None:
        """"fused", "foreach", "in_place" (a learned rule's ``update_in_place``, its deployment
        path) or None (the rule's functional update), from the arguments and the rule."""
        for flag, value in (("foreach", foreach), ("fused", fused)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{flag} must be True, False or None, got {value!r}")
        if foreach and fused:
            raise ValueError("pass foreach=True or fused=True, not both")
        wanted = "fused" if fused else "foreach"
        available = isinstance(self.rule, HandRule) and self.rule.has_torch_kernel(fused=bool(fused))
        if (foreach or fused) and not available:
            raise ValueError(
                f"the update rule {self.rule.name!r} has no torch {wanted} kernel with these options (foreach: sgd, "
                "momentum, adam, adamw, uncentered rmsprop; fused: sgd, momentum, and adam/adamw at eps_root=0); "
                "leave foreach and fused unset to run its own update"
            )
        if foreach is False:
            return None
        if available:
            return wanted
        return "in_place" if not fused and hasattr(self.rule, "update_in_place") else None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see ``torch.optim.Optimizer.add_param_group``); a group that fails the
        checks of its ``lr``, ``maximize``, ``weight_decay``, the rule's hyperparameters, dtypes
        and device is not added."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_positive("lr", group["lr"], allow_zero=True)
            if not isinstance(group["maximize"], bool):
                raise ValueError(f"maximize must be True or False, got {group['maximize']!r}")
            check_positive("weight_decay", group["weight_decay"], allow_zero=True)
            unread = sorted(key for key in TORCH_HYPERPARAMETERS if key in group and key not in self.defaults)
            if unread:
                raise ValueError(
                    f"the param group sets {unread}, which the update rule {self.rule.name!r} does not read; its "
                    f"groups hold {sorted(self.defaults)}"
                )
            self._group_rule(group, {})
            for p in group["params"]:
                if not p.is_floating_point():
                    raise TypeError(f"LearnedOptimizer optimizes floating-point tensors only, got dtype {p.dtype}")
            self._check_rule_device({p.device for p in group["params"]})
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _check_rule_device(self, devices: set[torch.device]) -> None:
        rule_devices = {t.device for t in [*self.rule.parameters(), *self.rule.buffers()]}
        stray = devices - rule_devices
        if rule_devices and stray:
            raise ValueError(
                f"the update rule {self.rule.name!r} is on {sorted(map(str, rule_devices))} but parameters are on "
                f"{sorted(map(str, stray))}; move the rule with rule.to(device) before stepping"
            )

    def _group_rule(self, group: dict[str, Any], cache: dict[tuple, UpdateRule]) -> UpdateRule:
        """The rule with ``group``'s hyperparameters: the rule itself where they are its own, else
        a copy (kept in ``cache`` for groups with the same values)."""
        values = tuple((key, _plain(group[key])) for key in self.group_keys)
        if all(value == self.defaults[key] for key, value in values):
            return self.rule
        if values not in cache:
            cache[values] = self.rule.with_hyperparameters(**dict(values))
        return cache[values]

    def _named_params(self) -> list[tuple[str, Tensor, dict[str, Any]]]:
        return [
            (_param_name(gi, pi), p, group)
            for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"])
        ]

    @torch.no_grad()
    def step(
        self, closure: Callable[[], Tensor | float] | None = None, *, loss: Tensor | float | None = None
    ) -> Tensor | float | None:
        """Apply one update of the rule to every parameter that has a gradient; returns the loss.

        The loss (the closure's, or ``loss=`` when the gradients were computed outside) is passed
        to the rule; give one or the other, not both.
        """
        if closure is not None:
            if loss is not None:
                raise ValueError("pass either a closure or loss=, not both")
            with torch.enable_grad():
                loss = closure()
        active = [(name, p, group) for name, p, group in self._named_params() if p.grad is not None]
        grads: dict[str, Tensor] = {}
        for name, p, group in active:
            if p.grad.is_sparse:
                raise TypeError(f"LearnedOptimizer does not support sparse gradients (parameter {name!r})")
            grads[name] = -p.grad if group["maximize"] else p.grad
        loss_value = None if loss is None else float(loss.detach() if isinstance(loss, Tensor) else loss)
        if not self._step_is_finite(grads, loss_value):
            return loss
        if loss_value is not None:
            previous, decay = self.running_loss, self.loss_decay
            self.running_loss = loss_value if previous is None else decay * previous + (1.0 - decay) * loss_value
        if self.rule.reads_loss and loss_value is None:
            raise ValueError(
                f"the update rule {self.rule.name!r} reads the training loss: call optimizer.step(closure) "
                "or optimizer.step(loss=loss)"
            )
        if active:
            if self.kernel in (None, "in_place"):  # torch kernels take the rule's hyperparameters as numbers
                self._check_rule_device({p.device for _, p, _ in active})
            self._update(active, grads, loss_value)
        self.clock += 1
        return loss

    def _update(
        self, active: list[tuple[str, Tensor, dict[str, Any]]], grads: dict[str, Tensor], loss: float | None
    ) -> None:
        """Update the parameters in ``active`` and their states: one rule call (or torch kernel
        call) per cohort of parameters with the same step count and group hyperparameters."""
        params = {name: p for name, p, _ in active}
        states = {name: self.state.get(p) for name, p in params.items()}
        fresh = [name for name, state in states.items() if not state]
        shared = frozenset()
        if fresh or not self.kernel:  # new state tensors must not alias parameters or gradients
            shared = frozenset(t.untyped_storage().data_ptr() for t in [*params.values(), *grads.values()])
        if fresh:
            initial = self.rule.init({name: params[name] for name in fresh}, num_steps=self.total_steps)
            states.update(_split_state(initial, fresh, shared))
        rules: dict[tuple, UpdateRule] = {}
        group_rules: dict[int, UpdateRule] = {}
        counts: dict[int, int] = {}  # parameters stepped together share one "step" tensor: read it once
        cohorts: dict[tuple, tuple[UpdateRule, dict[str, Any], list[str]]] = {}
        for name, _, group in active:
            group_id = id(group)
            rule = group_rules.get(group_id)
            if rule is None:
                rule = group_rules[group_id] = self._group_rule(group, rules)
            step = states[name]["step"]
            count = counts.get(id(step))
            if count is None:
                count = counts[id(step)] = int(step)
            # A kernel takes one lr, so kernel cohorts are per group; rule calls only need one rule.
            key = (count, group_id if self.kernel else id(rule))
            cohort = cohorts.get(key)
            if cohort is None:
                cohort = cohorts[key] = (rule, group, [])
            cohort[2].append(name)
        if self.kernel == "in_place":
            for (count, _), (_, group, names) in cohorts.items():
                self._run_in_place(group, count, names, params, grads, states, loss)
            for name in params:
                self.state[params[name]] = states[name]
            return
        if self.kernel:
            for (count, _), (rule, group, names) in cohorts.items():
                self._run_kernel(rule, group, count, names, params, grads, states)
            for name in fresh:
                self.state[params[name]] = states[name]
            return
        updates, states = self._run_rule(cohorts, grads, params, states, shared, loss)
        for name, state in states.items():  # committed only once every rule call succeeded
            self.state[params[name]] = state
        self._apply(active, updates)

    def _run_kernel(
        self, rule: HandRule, group: dict[str, Any], count: int, names: list[str], params: dict[str, Tensor],
        grads: dict[str, Tensor], states: dict[str, dict[str, Tensor]],
    ) -> None:
        """One update of ``names`` in place through the rule's torch kernel."""
        slots = {slot: [states[n][slot] for n in names] for slot in rule.slot_names}
        new = rule.torch_step(
            [params[n] for n in names], [grads[n] for n in names], slots, count,
            lr_scale=_plain(group["lr"]), fused=self.kernel == "fused",
        )
        step = torch.tensor(float(count + 1))
        for i, name in enumerate(names):
            state = states[name]  # the parameter's own dict (a fresh one is stored by the caller)
            state["step"] = step
            for slot, tensors in new.items():
                state[slot] = tensors[i]

    def _run_in_place(
        self, group: dict[str, Any], count: int, names: list[str], params: dict[str, Tensor],
        grads: dict[str, Tensor], states: dict[str, dict[str, Tensor]], loss: float | None,
    ) -> None:
        """One update of ``names`` through the rule's ``update_in_place``: parameters and state
        written where they lie, no update tensors (the learned rules' deployment path; a rule
        that fails part-way may leave some of these parameters updated)."""
        targets = {n: params[n] for n in names}
        # Decay acts on the parameters the rule saw, as on the functional path: keep them.
        before = [p.clone() for p in targets.values()] if group["weight_decay"] else None
        merged = _merge_states(
            {n: states[n] for n in names}, step_count=count, num_steps=self.total_steps,
            running_loss=self.running_loss, clock=self.clock,
        )
        new_state = self.rule.update_in_place(
            {n: grads[n] for n in names}, merged, targets, lr=_plain(group["lr"]), loss=loss
        )
        if before is not None:
            torch._foreach_add_(list(targets.values()), before, alpha=-group["lr"] * group["weight_decay"])
        states.update(_split_state(new_state, names))

    def _run_rule(
        self, cohorts: dict[tuple, tuple[UpdateRule, dict[str, Any], list[str]]], grads: dict[str, Tensor],
        params: dict[str, Tensor], states: dict[str, dict[str, Tensor]], shared: frozenset[int], loss: float | None,
    ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """Updates and new per-parameter states: one ``rule.update`` call per cohort."""
        updates: dict[str, Tensor] = {}
        for (count, _), (rule, _, names) in cohorts.items():
            merged = _merge_states(
                {n: states[n] for n in names}, step_count=count, num_steps=self.total_steps,
                running_loss=self.running_loss, clock=self.clock,
            )
            new_updates, new_state = rule.update(
                {n: grads[n] for n in names}, merged, {n: params[n] for n in names}, loss=loss
            )
            if new_state.step_count != count + 1:
                raise ValueError(
                    f"the update rule {self.rule.name!r} returned a state with step_count={new_state.step_count} "
                    f"after update {count + 1}; rules must count their updates"
                )
            updates.update(new_updates)
            states.update(_split_state(new_state, names, shared))
        return updates, states

    def _apply(self, active: list[tuple[str, Tensor, dict[str, Any]]], updates: Mapping[str, Tensor]) -> None:
        """``p += group lr * update`` in place, one foreach call per parameter group, after the
        adapter's decoupled decay ``p *= 1 - lr * weight_decay`` where the rule has no decay of its own."""
        by_group: dict[int, tuple[dict[str, Any], list[Tensor], list[Tensor]]] = {}
        for name, p, group in active:
            if name in updates:
                _, targets, deltas = by_group.setdefault(id(group), (group, [], []))
                targets.append(p)
                deltas.append(updates[name])
        for group, targets, deltas in by_group.values():
            if group["weight_decay"] and "weight_decay" not in self.group_keys:
                torch._foreach_mul_(targets, 1.0 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(targets, deltas, alpha=group["lr"])

    def get_per_param_lr(self) -> dict[Tensor, Tensor]:
        """The per-coordinate rates of a rule that keeps them (the ``alpha`` slot, as
        ``OptimizerState.per_param_lr``), by parameter; parameters not yet stepped have none."""
        return {
            p: tensor for p, entries in self.state.items() for slot, tensor in entries.items()
            if slot == "alpha" or slot.endswith("/alpha")
        }

    def reset_per_param_lr(self) -> None:
        """Put every per-coordinate rate back at the rule's ``base_lr`` (rules with rates only,
        such as ``HypergradientRule``); step counts and parameters are kept."""
        if not isinstance(self.rule, PerCoordinateRates):
            raise TypeError(
                f"the update rule {self.rule.name!r} keeps no per-coordinate rates; reset_per_param_lr applies to "
                "HypergradientRule and ShrinkingRatesRule"
            )
        stepped = {name: p for name, p, _ in self._named_params() if self.state.get(p)}
        reset = self.rule.reset_per_param_lr(_merge_states({n: self.state[p] for n, p in stepped.items()}))
        for name, entries in _split_state(reset, stepped).items():
            self.state[stepped[name]] = {**entries, "step": self.state[stepped[name]]["step"]}

    def _step_is_finite(self, grads: Mapping[str, Tensor], loss_value: float | None) -> bool:
        """False (after counting a skipped step) or ValueError when a gradient or the loss is NaN/Inf."""
        bad = _nonfinite_names(grads)
        loss_bad = loss_value is not None and not math.isfinite(loss_value)
        if not bad and not loss_bad:
            return True
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            return False
        what = f"the gradient of parameter {bad[0]!r} (shape {tuple(grads[bad[0]].shape)})" if bad else "the loss"
        others = f" (and of {bad[1:]})" if len(bad) > 1 else ""
        raise ValueError(
            f"{what}{others} contains NaN or Inf; no parameter was changed. "
            "Pass nonfinite='skip' to LearnedOptimizer to skip such steps instead."
        )

    def state_dict(self) -> dict[str, Any]:
        """Torch's state dict (each parameter's dict of tensors) plus the rule's name, the clock,
        ``skipped_steps`` and ``running_loss``; loadable with ``weights_only=True``. As in
        ``torch.optim``, tensors are shared with the live state, not copied."""
        packed = super().state_dict()
        packed.update(
            rule=self.rule.name, clock=self.clock, skipped_steps=self.skipped_steps, running_loss=self.running_loss
        )
        return packed

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` so the next steps continue the saved trajectory exactly.

        State tensors move to their parameter's device and keep their dtype (rules may store state
        in another precision than the parameters); ``"step"`` stays on the CPU.
        """
        missing = sorted({"state", "param_groups", "rule", "clock", "skipped_steps", "running_loss"} - set(state_dict))
        if missing:
            raise ValueError(f"not a LearnedOptimizer state dict: missing keys {missing}")
        if state_dict["rule"] != self.rule.name:
            raise ValueError(
                f"state dict was saved with update rule {state_dict['rule']!r}, this optimizer runs {self.rule.name!r}"
            )
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        named = self._named_params()
        for index, data in saved_state.items():
            if not isinstance(index, int) or not 0 <= index < len(named):
                raise ValueError(f"state dict has state for parameter id {index!r}; valid ids are 0..{len(named) - 1}")
            name, p, _ = named[index]
            if not isinstance(data, Mapping) or "step" not in data or not all(
                isinstance(t, Tensor) for t in data.values()
            ):
                raise ValueError(f"state for parameter id {index} ({name!r}) must be a dict of tensors with a 'step' entry")
            self.state[p] = {key: t if key == "step" else t.to(device=p.device) for key, t in data.items()}
        self.clock = int(state_dict["clock"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.running_loss = state_dict["running_loss"]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle/deepcopy support: torch's fields plus the rule and the adapter's counters."""
        extra = ("rule", "kernel", "group_keys", "nonfinite", "loss_decay", "total_steps", "clock", "skipped_steps",
                 "running_loss")
        return {**super().__getstate__(), **{key: self.__dict__[key] for key in extra}}
