"""Input features of per-parameter learned optimizers (the vocabulary of Metz et al. 2022).

A learned rule such as :class:`~metaoptimizer.rules.mlp.MLPRule` sees, for every coordinate, the
gradient, the parameter value, momenta at several decays, RMS and Adafactor-style factored
second moments, and ratios of momentum (or gradient) to the square root of the second moment;
and, shared by all coordinates, step-count embeddings and optionally the fraction of training
done. Each per-coordinate feature is normalised per tensor to unit root mean square, so the
learned rule sees the same scale whatever the tensor's gradient scale is.

Factored statistics use a 2-D *matrix view* of a tensor (:func:`as_matrix`): rows x columns for
matrices and higher-rank tensors, one row for vectors and scalars, so they cost O(rows + cols)
memory (for a vector they degenerate to a full second moment, as in Adafactor). Everything else
works on flat tensors, so one code path, and one compiled kernel, serves every shape.

Accumulators live in ``OptimizerState.slots`` under :attr:`FeatureConfig.slot_names`, per
coordinate ones flat. They are not bias-corrected: a correction is one factor per tensor, which
the per-tensor normalisation of every feature (and of every ratio) cancels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaoptimizer._validation import check_flag, check_positive, check_unit_interval
from metaoptimizer.rules.base import check_update_call, compute_dtype
from metaoptimizer.rules.state import OptimizerState

#: Kinds of per-coordinate feature a rule may read (see :class:`FeatureConfig`).
FEATURE_KINDS = ("grad", "param", "momentum", "rms", "factored", "mom_ratio", "grad_ratio")
#: Accepted ``state_dtype`` names.
STATE_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}
#: Slots that hold recurrent (LSTM) state rather than accumulators.
RECURRENT_SLOTS = ("hidden", "cell", "tensor_hidden", "tensor_cell")
#: Scale applied to logarithms of tensor statistics so that they enter networks at O(1).
LOG_SCALE = 0.1

Accumulators = dict[str, Tensor]


def _decays(name: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of decays in [0, 1), got {value!r}")
    for i, decay in enumerate(value):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)):
            raise ValueError(f"{name}[{i}] must be a number in [0, 1), got {decay!r}")
        check_unit_interval(f"{name}[{i}]", float(decay))
    if len(set(value)) != len(value):
        raise ValueError(f"{name} has repeated decays: {tuple(value)!r}")
    return tuple(float(d) for d in value)


@dataclass(frozen=True)
class FeatureConfig:
    """Which accumulators a rule keeps and which features it reads.

    ``momentum_decays``, ``rms_decays`` and ``factored_decays`` each keep one accumulator per
    decay (momentum and RMS: one float per coordinate; factored: rows + cols floats per matrix).
    ``features`` picks from :data:`FEATURE_KINDS`: ``'momentum'``, ``'rms'`` and ``'factored'``
    give one feature per decay (the RMS ones as square roots); ``'mom_ratio'`` gives
    ``m / sqrt(v)`` per momentum decay and ``'grad_ratio'`` gives ``g / sqrt(v)``, where ``v`` is
    the first factored second moment, or the first RMS one when no factored decay is kept.
    ``step_timescales`` give the shared features ``tanh(step / timescale)``; ``training_fraction``
    adds the fraction of the run done, ``min(state.schedule_step() / state.num_steps, 1)``, which
    makes the rule budget-aware (``init`` needs ``num_steps``). ``eps`` is added to squared
    gradients and under every square root and normalisation. ``state_dtype`` stores the
    accumulators in a narrower type (``'bfloat16'`` halves their memory); features are computed
    in the parameters' dtype.

    The default keeps Adam's state, 2 floats per coordinate (a momentum and an RMS). Factored
    statistics cost an extra pass over each tensor (row and column reductions); a typical richer
    configuration keeps two momenta and a factored second moment, still 2 floats per coordinate:
    ``FeatureConfig(momentum_decays=(0.9, 0.99), rms_decays=(), factored_decays=(0.999,),
    features=('grad', 'param', 'momentum', 'factored', 'mom_ratio', 'grad_ratio'))``.

    ``momentum_slots``, ``rms_slots`` (pairs of slot name and decay) and ``factored_slots``
    (pairs of (row slot, column slot) and decay) are derived tables the step functions iterate.
    """

    momentum_decays: tuple[float, ...] = (0.9,)
    rms_decays: tuple[float, ...] = (0.999,)
    factored_decays: tuple[float, ...] = ()
    features: tuple[str, ...] = ("grad", "param", "momentum", "rms", "mom_ratio", "grad_ratio")
    step_timescales: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0, 10000.0)
    training_fraction: bool = False
    eps: float = 1e-12
    state_dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("momentum_decays", "rms_decays", "factored_decays"):
            object.__setattr__(self, name, _decays(name, getattr(self, name)))
        if isinstance(self.features, str) or not isinstance(self.features, Sequence) or not self.features:
            raise ValueError(
                f"features must be a non-empty sequence of names from {FEATURE_KINDS}, got {self.features!r}"
            )
        unknown = [f for f in self.features if f not in FEATURE_KINDS]
        if unknown:
            raise ValueError(f"unknown features {unknown}; accepted values: {', '.join(map(repr, FEATURE_KINDS))}")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"features has repeated names: {tuple(self.features)!r}")
        object.__setattr__(self, "features", tuple(self.features))
        if isinstance(self.step_timescales, str) or not isinstance(self.step_timescales, Sequence):
            raise ValueError(f"step_timescales must be a sequence of positive numbers, got {self.step_timescales!r}")
        for i, scale in enumerate(self.step_timescales):
            check_positive(f"step_timescales[{i}]", scale)
        object.__setattr__(self, "step_timescales", tuple(float(s) for s in self.step_timescales))
        check_flag("training_fraction", self.training_fraction)
        check_positive("eps", self.eps)
        if self.state_dtype is not None and self.state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"state_dtype={self.state_dtype!r} is not supported; accepted values: {sorted(STATE_DTYPES)} or None"
            )
        self._check_consistent()
        # Slot names are built here, not while a compiler traces the step (where decays are symbolic).
        object.__setattr__(self, "momentum_slots", tuple((f"momentum_{d}", d) for d in self.momentum_decays))
        object.__setattr__(self, "rms_slots", tuple((f"rms_{d}", d) for d in self.rms_decays))
        factored = tuple(((f"factored_row_{d}", f"factored_col_{d}"), d) for d in self.factored_decays)
        object.__setattr__(self, "factored_slots", factored)

    def _check_consistent(self) -> None:
        """Every feature has the accumulator it reads, and every kept accumulator is read."""
        wants = set(self.features)
        ratios = wants & {"mom_ratio", "grad_ratio"}
        needs = {
            "momentum_decays": wants & {"momentum", "mom_ratio"},
            "rms_decays": wants & {"rms"},
            "factored_decays": wants & {"factored"},
        }
        if ratios:
            needs["factored_decays" if self.factored_decays else "rms_decays"] |= ratios
            if not self.factored_decays and not self.rms_decays:
                raise ValueError(
                    f"features {sorted(ratios)} divide by a second moment: keep rms_decays or factored_decays"
                )
        for kind, readers in needs.items():
            kept = getattr(self, kind)
            if readers and not kept:
                raise ValueError(f"features {sorted(readers)} need at least one decay in {kind}")
            if kept and not readers:
                raise ValueError(
                    f"{kind}={kept!r} are kept but no feature reads them; add a feature or drop the decays"
                )

    @property
    def feature_names(self) -> tuple[str, ...]:
        """One name per per-coordinate feature, in the order :func:`tensor_features` returns them."""
        per_kind = {
            "grad": ["grad"],
            "param": ["param"],
            "momentum": [f"momentum_{d}" for d in self.momentum_decays],
            "rms": [f"rms_{d}" for d in self.rms_decays],
            "factored": [f"factored_{d}" for d in self.factored_decays],
            "mom_ratio": [f"mom_ratio_{d}" for d in self.momentum_decays],
            "grad_ratio": ["grad_ratio"],
        }
        return tuple(name for kind in self.features for name in per_kind[kind])

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @property
    def num_global(self) -> int:
        """Number of features shared by all coordinates (step embeddings, fraction of training)."""
        return len(self.step_timescales) + self.training_fraction

    @property
    def slot_names(self) -> tuple[str, ...]:
        """Every accumulator's slot name: ``momentum_<decay>``, ``rms_<decay>``, ``factored_row|col_<decay>``."""
        factored = tuple(name for pair, _ in self.factored_slots for name in pair)
        return tuple(name for name, _ in (*self.momentum_slots, *self.rms_slots)) + factored

    @property
    def floats_per_coordinate(self) -> int:
        """Accumulator floats kept per parameter coordinate, factored statistics aside."""
        return len(self.momentum_decays) + len(self.rms_decays)

    def storage_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        return STATE_DTYPES[self.state_dtype] if self.state_dtype else param_dtype

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def coerce(cls, value: FeatureConfig | Mapping[str, Any] | None) -> FeatureConfig:
        """A config from a config, a dict of its fields (as :meth:`to_dict` writes) or None (default)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown feature options {unknown}; accepted: {sorted(known)}")
            return cls(**value)
        raise TypeError(f"features must be a FeatureConfig, a dict of its fields or None, got {type(value).__name__}")


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of the matrix view: ``(shape[0], rest)`` for rank >= 2, ``(1, numel)`` below."""
    numel = math.prod(shape)
    if len(shape) >= 2:
        return shape[0], numel // shape[0] if shape[0] else 0
    return 1, numel


def as_matrix(t: Tensor) -> Tensor:
    return t.reshape(matrix_shape(t.shape))


def init_slots(params: Mapping[str, Tensor], config: FeatureConfig) -> dict[str, dict[str, Tensor]]:
    """Zero accumulators for every parameter, keyed ``slots[slot][name]``.

    Per-coordinate accumulators are flat (``numel`` floats); factored ones hold the rows and the
    columns of the parameter's matrix view.
    """
    slots: dict[str, dict[str, Tensor]] = {slot: {} for slot in config.slot_names}
    for name, p in params.items():
        zeros = functools.partial(torch.zeros, dtype=config.storage_dtype(compute_dtype(p.dtype)), device=p.device)
        rows, cols = matrix_shape(p.shape)
        for slot, _ in (*config.momentum_slots, *config.rms_slots):
            slots[slot][name] = zeros(p.numel())
        for (row, col), _ in config.factored_slots:
            slots[row][name], slots[col][name] = zeros(rows), zeros(cols)
    return slots


def tensor_accumulators(slots: Mapping[str, Mapping[str, Tensor]], name: str, config: FeatureConfig) -> Accumulators:
    """The accumulators of parameter ``name``, keyed by slot."""
    missing = [slot for slot in config.slot_names if name not in slots.get(slot, {})]
    if missing:
        raise ValueError(f"state has no {missing} entry for {name!r}; build the state with init(params)")
    return {slot: slots[slot][name] for slot in config.slot_names}


def _moving_average(average: Tensor, value: Tensor, decay: float, config: FeatureConfig) -> Tensor:
    """``decay * average + (1 - decay) * value``, computed in ``value``'s dtype and stored as configured."""
    return torch.lerp(average.to(value.dtype), value, 1.0 - decay).to(config.storage_dtype(value.dtype))


def factored_second_moment(row: Tensor, col: Tensor) -> Tensor:
    """Adafactor's rank-1 estimate ``row col^T / mean(row)`` of the second moment (a matrix view)."""
    return row[:, None] * col[None, :] / row.mean()


def factored_pass(grad: Tensor, acc: Accumulators, config: FeatureConfig) -> tuple[Accumulators, list[Tensor]]:
    """The factored accumulators after seeing ``grad`` (a matrix view) and their ``1 / sqrt(v + eps)``.

    Returns the new row/column accumulators and, per factored decay, the flat inverse square
    root of the rank-1 second moment. This pass holds every broadcast of a row or column
    statistic; materialising its result once keeps the later passes simple flat loops, which the
    compiler fuses (a broadcast inside them makes it split the loop), and saves recomputing it.
    """
    if not config.factored_slots:
        return {}, []
    square = grad.square() + config.eps
    row_mean, col_mean = square.mean(dim=1), square.mean(dim=0)
    out: Accumulators = {}
    inv_roots = []
    for (row, col), d in config.factored_slots:
        out[row] = _moving_average(acc[row], row_mean, d, config)
        out[col] = _moving_average(acc[col], col_mean, d, config)
        second = factored_second_moment(out[row].to(grad.dtype), out[col].to(grad.dtype))
        inv_roots.append(torch.rsqrt(second + config.eps).reshape(-1))
    return out, inv_roots


def advance_per_coordinate(grad: Tensor, acc: Accumulators, config: FeatureConfig) -> Accumulators:
    """The momentum and RMS accumulators after seeing ``grad`` (flat); pointwise."""
    out = {slot: _moving_average(acc[slot], grad, d, config) for slot, d in config.momentum_slots}
    if config.rms_slots:
        square = grad.square() + config.eps
        out.update({slot: _moving_average(acc[slot], square, d, config) for slot, d in config.rms_slots})
    return out


def tensor_features(
    grad: Tensor, param: Tensor, acc: Accumulators, inv_roots: Sequence[Tensor], config: FeatureConfig
) -> list[Tensor]:
    """The per-coordinate features of one tensor, all flat, from its *updated* accumulators.

    ``inv_roots`` come from :func:`factored_pass`; the ``'factored'`` features are their
    reciprocals and the ``'rms'`` ones ``(v + eps) / sqrt(v + eps)``: both ``sqrt(v + eps)``,
    written so that the square root shared with the ratios is computed once.
    """
    dtype = grad.dtype
    momenta = [acc[slot].to(dtype) for slot, _ in config.momentum_slots]
    rms = [acc[slot].to(dtype) + config.eps for slot, _ in config.rms_slots]
    inv_rms = [torch.rsqrt(v) for v in rms]
    denominators = [*inv_roots, *inv_rms]
    inv_root = denominators[0] if denominators else None
    per_kind = {
        "grad": lambda: [grad],
        "param": lambda: [param],
        "momentum": lambda: momenta,
        "rms": lambda: [v * r for v, r in zip(rms, inv_rms, strict=True)],
        "factored": lambda: [torch.reciprocal(r) for r in inv_roots],
        "mom_ratio": lambda: [m * inv_root for m in momenta],
        "grad_ratio": lambda: [grad * inv_root],
    }
    return [f for kind in config.features for f in per_kind[kind]()]


def feature_moments(features: Sequence[Tensor], with_means: bool = True) -> tuple[Tensor | None, Tensor]:
    """Per-feature mean (None without ``with_means``) and mean square, each of shape (num_features,)."""
    mean = torch.stack([f.mean() for f in features]) if with_means else None
    return mean, torch.stack([f.square().mean() for f in features])


def normalisation_scales(mean_square: Tensor, eps: float) -> Tensor:
    """Factors that bring each feature to unit root mean square over its tensor."""
    return torch.rsqrt(mean_square + eps)


def tensor_statistics(
    grad: Tensor, param: Tensor, acc: Accumulators, inv_roots: Sequence[Tensor], config: FeatureConfig,
    with_means: bool = True,
) -> tuple[Accumulators, Tensor | None, Tensor, Tensor]:
    """One tensor's pointwise-and-reduce pass over flat tensors, after :func:`factored_pass`.

    Returns the new per-coordinate accumulators, the features' means (None without
    ``with_means``: each is one more sum in the loop) and mean squares, and ``mean(param^2)``.
    The features themselves are not kept: the update pass recomputes them, which costs less
    memory traffic than storing them.
    """
    new_acc = advance_per_coordinate(grad, acc, config)
    mean, mean_square = feature_moments(tensor_features(grad, param, new_acc, inv_roots, config), with_means)
    return new_acc, mean, mean_square, param.square().mean()


def global_features(
    step: int, state: OptimizerState, config: FeatureConfig, *, device=None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Features shared by every coordinate: ``tanh(step / timescale)`` and the fraction of training."""
    values = [math.tanh(step / scale) for scale in config.step_timescales]
    if config.training_fraction:
        if state.num_steps is None:
            raise ValueError("features with training_fraction=True need the run's length: init(params, num_steps=N)")
        values.append(min(state.schedule_step() / state.num_steps, 1.0))
    return torch.tensor(values, dtype=dtype, device=device)


def check_update_inputs(
    grads: Mapping[str, Tensor], params: Mapping[str, Tensor], slots: Mapping[str, Mapping[str, Tensor]],
    config: FeatureConfig,
) -> None:
    """:func:`~metaoptimizer.rules.base.check_update_call`, plus the accumulators each gradient needs."""
    check_update_call(grads, params)
    for name in grads:
        tensor_accumulators(slots, name, config)


def state_numel(state: OptimizerState) -> dict[str, int]:
    """Number of state elements by kind: per-coordinate accumulators, factored ones, recurrent state."""
    counts = {"per_coordinate": 0, "factored": 0, "recurrent": 0}
    for slot, values in state.slots.items():
        base = slot.rsplit("/", 1)[-1]
        kind = "factored" if base.startswith("factored_") else "recurrent" if base in RECURRENT_SLOTS else "per_coordinate"
        counts[kind] += sum(t.numel() for t in values.values())
    return counts
