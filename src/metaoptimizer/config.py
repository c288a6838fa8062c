"""Validated configuration and the optimizer state shared by every update rule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

METHODS = ("lstm", "meta_sgd", "warp_grad", "l2o")
PREPROCESSING = ("log_sign", "none")
META_OBJECTIVES = ("train_loss", "valid_loss", "log_train_loss", "log_valid_loss")


def _check_choice(name: str, value: Any, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted values: {', '.join(map(repr, accepted))}")


def check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite positive number (an int when ``integer``)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    bad = value < 0 if allow_zero else value <= 0
    if bad or value != value or value in (float("inf"), float("-inf")):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {kind} {bound}, got {value!r}")


@dataclass
class MetaOptimizerConfig:
    """Everything that defines a learned optimizer and how it is meta-trained.

    The first eight fields are the project's spec; the rest refine them and all have defaults.
    ``rule_options`` passes method-specific keyword arguments to the rule's constructor.
    """

    method: str = "lstm"
    hidden_size: int = 20
    num_layers: int = 2
    preconditioning: bool = True
    coordinatewise: bool = True
    meta_lr: float = 1e-3
    unroll_steps: int = 20
    gradient_clipping: float | None = 1.0
    preprocessing: str = "log_sign"
    preprocess_p: float = 10.0
    output_scale: float = 0.1
    meta_objective: str = "train_loss"
    second_order: bool = False
    loss: str = "cross_entropy"
    seed: int = 0
    rule_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("preprocessing", self.preprocessing, PREPROCESSING)
        _check_choice("meta_objective", self.meta_objective, META_OBJECTIVES)
        _check_choice("loss", self.loss, ("cross_entropy", "mse"))
        check_positive("hidden_size", self.hidden_size, integer=True)
        check_positive("num_layers", self.num_layers, integer=True)
        check_positive("unroll_steps", self.unroll_steps, integer=True)
        check_positive("meta_lr", self.meta_lr)
        check_positive("preprocess_p", self.preprocess_p)
        check_positive("output_scale", self.output_scale)
        if self.gradient_clipping is not None:
            check_positive("gradient_clipping", self.gradient_clipping)
        for flag in ("preconditioning", "coordinatewise", "second_order"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if not self.coordinatewise and self.method == "lstm":
            raise ValueError(
                "method='lstm' is coordinatewise by construction; coordinatewise=False is accepted "
                "only by methods that are not ('meta_sgd', 'warp_grad', 'l2o')"
            )
        if not isinstance(self.rule_options, dict):
            raise ValueError(f"rule_options must be a dict, got {type(self.rule_options).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaOptimizerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; accepted fields: {sorted(known)}")
        return cls(**data)


@dataclass
class OptimizerState:
    """State of an update rule over a dict of parameters (name -> tensor).

    ``hidden`` and ``cell`` hold recurrent rules' per-coordinate state, ``per_param_lr`` learned
    per-parameter rates, ``slots`` any other accumulator keyed by slot then parameter name
    (for example ``slots['exp_avg'][name]``). ``step_count`` counts applied updates and
    ``running_loss`` is an exponential average of observed losses, when the caller reports them.
    The state is a pytree, so ``torch.utils._pytree`` maps, detaches and flattens it.
    """

    hidden: dict[str, Tensor] = field(default_factory=dict)
    cell: dict[str, Tensor] = field(default_factory=dict)
    step_count: int = 0
    running_loss: float | None = None
    per_param_lr: dict[str, Tensor] = field(default_factory=dict)
    slots: dict[str, dict[str, Tensor]] = field(default_factory=dict)

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
        """The state of the parameters in ``names`` only (same step count and running loss)."""
        names = set(names)
        pick = lambda d: {k: v for k, v in d.items() if k in names}  # noqa: E731
        return self.replace(
            hidden=pick(self.hidden),
            cell=pick(self.cell),
            per_param_lr=pick(self.per_param_lr),
            slots={slot: pick(values) for slot, values in self.slots.items()},
        )

    @classmethod
    def merge(cls, states: list[OptimizerState]) -> OptimizerState:
        """Union of states over disjoint parameter names; step counts must agree."""
        if not states:
            return cls()
        counts = {s.step_count for s in states}
        if len(counts) != 1:
            raise ValueError(f"cannot merge states with different step counts {sorted(counts)}")
        merged = cls(step_count=states[0].step_count, running_loss=states[0].running_loss)
        for s in states:
            merged.hidden.update(s.hidden)
            merged.cell.update(s.cell)
            merged.per_param_lr.update(s.per_param_lr)
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


@dataclass
class MetaOptTrainResult:
    """What one meta-training step did.

    ``meta_loss`` is the mean meta-objective over the step's episodes, ``meta_grad_norm`` the
    meta-gradient's global norm before clipping, ``skipped`` whether the step was discarded for a
    non-finite loss or gradient, ``steps`` the number of meta-steps applied so far,
    ``skipped_total`` the number skipped so far, ``inner_steps`` the inner steps run in this step.
    """

    meta_loss: float
    meta_grad_norm: float
    skipped: bool
    steps: int
    skipped_total: int = 0
    inner_steps: int = 0
