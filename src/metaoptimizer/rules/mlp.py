"""``method='l2o'``: a per-parameter MLP over optimizer features (Metz et al. 2022, small_fc_lopt).

For every coordinate a tiny MLP reads the normalised features of
:mod:`metaoptimizer.rules.features` (plus the shared step embeddings, folded into its first
bias) and emits a direction ``d`` and a log-magnitude ``s``. The update is

    update = d * exp(magnitude_scale * s) * step_mult * sqrt(mean(p^2) + param_scale_floor^2)

i.e. relative to the root mean square of the parameter tensor (LARS/VeLO-style), with a floor so
that zero-initialised tensors still move; with ``param_relative=False`` the last factor is 1.

Initialisation makes the untrained rule a sensible optimizer: a linear skip path maps the
normalised ``m / sqrt(v)`` feature (or ``g / sqrt(v)``, or the gradient: the first available)
to the direction with weight -1, and the MLP's output layer starts small, so the first updates
are Adam-like steps of relative size ``step_mult``.

The step runs tensor by tensor in up to three passes over the coordinates (:class:`TensorPasses`):
factored statistics (only with factored features), accumulators and feature statistics, and
the pointwise update. ``backend`` picks how they run: ``'matmul'`` (eager, the MLP as matrix
products: the reference, and what meta-training differentiates), ``'pointwise'`` (eager, the
MLP unrolled into pointwise arithmetic, :mod:`metaoptimizer.rules.fused`) or ``'compiled'`` (the
pointwise form through ``torch.compile``, for large models; used only when no autograd graph is
recorded, the matmul path otherwise). All three give the same numbers up to rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from metaoptimizer._validation import check_positive
from metaoptimizer.rules.base import Params, UpdateRule, in_compute_dtype
from metaoptimizer.rules.state import OptimizerState
from metaoptimizer.rules.features import (
    Accumulators,
    FeatureConfig,
    as_matrix,
    check_update_inputs,
    factored_pass,
    global_features,
    init_slots,
    normalisation_scales,
    tensor_accumulators,
    tensor_features,
    tensor_statistics,
)
from metaoptimizer.rules.fused import Layers, compiled, mlp_pointwise

BACKENDS = ("matmul", "pointwise", "compiled")
#: Bound on ``magnitude_scale * s`` before the exponential, so an untrained or diverging rule
#: cannot overflow to ``inf`` (e^10 is a 22026-fold step).
MAX_LOG_MAGNITUDE = 10.0
#: Features the skip path reads at initialisation, in order of preference.
PRIOR_FEATURES = ("mom_ratio", "grad_ratio", "momentum", "grad")


def prior_index(config: FeatureConfig) -> int | None:
    """Index of the feature the skip path follows at initialisation (see :data:`PRIOR_FEATURES`).

    None when the features include none of them: the skip path then starts at zero.
    """
    names = config.feature_names
    for prefix in PRIOR_FEATURES:
        for i, name in enumerate(names):
            if name.startswith(prefix):
                return i
    return None


@dataclass(frozen=True)
class StepScale:
    """How a direction and a log-magnitude become an update's size (see the module docstring)."""

    step_mult: float = 1e-2
    magnitude_scale: float = 1.0
    param_relative: bool = True
    param_scale_floor: float = 1e-3

    def __post_init__(self) -> None:
        check_positive("step_mult", self.step_mult)
        check_positive("magnitude_scale", self.magnitude_scale, allow_zero=True)
        check_positive("param_scale_floor", self.param_scale_floor, allow_zero=True)
        if not isinstance(self.param_relative, bool):
            raise ValueError(f"param_relative must be True or False, got {self.param_relative!r}")
        if self.param_relative and self.param_scale_floor == 0:
            raise ValueError("param_relative=True needs param_scale_floor > 0, or zero tensors would never move")

    def step_size(self, param_mean_square: Tensor) -> Tensor:
        """Per-tensor step size: ``step_mult`` times the parameter RMS (floored), or ``step_mult``."""
        if not self.param_relative:
            return torch.full_like(param_mean_square, self.step_mult)
        return self.step_mult * torch.sqrt(param_mean_square + self.param_scale_floor**2)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; accepted values: {', '.join(map(repr, BACKENDS))}")
    return backend


def updated_slots(state: OptimizerState, accumulators: Mapping[str, Accumulators]) -> dict[str, dict[str, Tensor]]:
    """``state.slots`` with the accumulators of the parameters in ``accumulators`` replaced."""
    slots = {slot: dict(values) for slot, values in state.slots.items()}
    for name, acc in accumulators.items():
        for slot, value in acc.items():
            slots[slot][name] = value
    return slots


def autograd_needed(rule: nn.Module, *tensor_dicts: Mapping[str, Tensor]) -> bool:
    """Whether this call records an autograd graph (then compiled steps are not used)."""
    if not torch.is_grad_enabled():
        return False
    tensors = [*rule.parameters(), *(t for d in tensor_dicts for t in d.values())]
    return any(t.requires_grad for t in tensors)


class PerCoordinateMLP(nn.Module):
    """Weights of a tiny per-coordinate MLP, or of a bank of ``bank_size`` of them.

    Layer weights have shape ``(bank_size, in, out)``; the first layer's inputs are the
    per-coordinate features followed by the global ones, the last layer has 2 outputs (direction,
    log-magnitude), and ``skip`` (``(bank_size, num_features)``) maps the normalised features
    linearly to the direction.
    """

    def __init__(
        self, num_features: int, num_global: int, hidden_size: int, num_layers: int, prior: int | None,
        bank_size: int = 1, output_init: float = 1e-2, seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        generator = torch.Generator().manual_seed(seed)
        sizes = [num_features + num_global] + [hidden_size] * num_layers + [2]
        weights, biases = [], []
        for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            gain = output_init if index == len(sizes) - 2 else 1.0
            w = torch.randn(bank_size, fan_in, fan_out, generator=generator) * (gain / math.sqrt(fan_in))
            weights.append(nn.Parameter(w))
            biases.append(nn.Parameter(torch.zeros(bank_size, fan_out)))
        self.weights = nn.ParameterList(weights)
        self.biases = nn.ParameterList(biases)
        skip = torch.zeros(bank_size, num_features)
        if prior is not None:
            skip[:, prior] = -1.0
        self.skip = nn.Parameter(skip)

    def layers(self, global_feats: Tensor, mixture: Tensor | None = None) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """The (weight, bias) layers and skip vector to evaluate, global features folded into the first bias.

        Without ``mixture`` the bank must hold one network and the result has no bank dimension;
        with ``mixture`` of shape ``(T, bank_size)`` each tensor gets its mixture of the bank and
        the results have a leading dimension T.
        """
        if mixture is None:
            if self.skip.shape[0] != 1:
                raise ValueError(f"a bank of {self.skip.shape[0]} networks needs mixture coefficients")
            mix = lambda t: t[0]  # noqa: E731
        else:
            mix = lambda t: torch.tensordot(mixture, t, dims=1)  # noqa: E731
        # Iterate, never slice: a slice of a ParameterList re-wraps its entries as new leaf
        # Parameters, which would cut the graph to weights substituted by functional_call.
        (first, *weights), (first_bias, *biases) = [mix(w) for w in self.weights], [mix(b) for b in self.biases]
        n = self.num_features
        first_bias = first_bias + global_feats.to(first.dtype) @ first[..., n:, :]
        layers = [(first[..., :n, :], first_bias), *zip(weights, biases, strict=True)]
        return layers, mix(self.skip)


def normalised_network(
    layers: Layers, skip: Tensor, scales: Tensor, dtype: torch.dtype
) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """The network with the per-tensor feature normalisation folded into its first layer and skip.

    ``(scales * x) @ W == x @ (scales[:, None] * W)``: folding costs a few scalar products per
    tensor instead of one multiplication per feature and coordinate.
    """
    (first_weight, first_bias), *rest = layers
    folded = [(first_weight * scales[:, None], first_bias), *rest]
    return [(w.to(dtype), b.to(dtype)) for w, b in folded], (skip * scales).to(dtype)


def mlp_matmul(features: list[Tensor], layers: Layers, skip: Tensor) -> tuple[Tensor, Tensor]:
    """Direction and log-magnitude of the per-coordinate MLP with matrix products (the reference)."""
    x = torch.stack(features, dim=-1)
    h = x
    for index, (weight, bias) in enumerate(layers):
        h = (torch.relu(h) if index else h) @ weight + bias
    return h[..., 0] + x @ skip, h[..., 1]


def tensor_update(
    grad: Tensor, param: Tensor, acc: Accumulators, inv_roots: list[Tensor], layers: Layers, skip: Tensor,
    step_size: Tensor, magnitude_scale: float, config: FeatureConfig, pointwise: bool,
) -> Tensor:
    """One tensor's pointwise pass over flat tensors: features, MLP and the scaled update.

    ``layers`` and ``skip`` already include the tensor's feature normalisation
    (:func:`normalised_network`).
    """
    features = tensor_features(grad, param, acc, inv_roots, config)
    direction, magnitude = (mlp_pointwise if pointwise else mlp_matmul)(features, layers, skip)
    log_size = torch.clamp(magnitude * magnitude_scale, -MAX_LOG_MAGNITUDE, MAX_LOG_MAGNITUDE)
    return direction * torch.exp(log_size) * step_size


class Reduction(NamedTuple):
    """What the reduction passes of one tensor produce: everything the update pass needs."""

    acc: Accumulators
    inv_roots: list[Tensor]
    mean: Tensor | None
    mean_square: Tensor
    param_mean_square: Tensor


@dataclass(frozen=True)
class TensorPasses:
    """The passes of a per-tensor step (factored statistics, statistics, update), eager or compiled.

    Each pass is a simple loop over the coordinates: the factored pass reduces rows and columns
    and materialises the factored second moments' inverse roots, the statistics pass advances the
    per-coordinate accumulators and sums the features, the update pass is purely pointwise
    (every per-tensor quantity is computed before it).
    """

    factored: Callable
    statistics: Callable
    update: Callable
    pointwise: bool

    @classmethod
    def select(cls, backend: str, autograd: bool) -> TensorPasses:
        """The passes for ``backend``; compiled ones only when no autograd graph is recorded."""
        if backend == "compiled" and not autograd:
            return cls(compiled(factored_pass), compiled(tensor_statistics), compiled(tensor_update), True)
        return cls(factored_pass, tensor_statistics, tensor_update, backend == "pointwise")

    def reduce(
        self, grad: Tensor, param: Tensor, acc: Accumulators, config: FeatureConfig, with_means: bool = False
    ) -> Reduction:
        """New accumulators and the per-tensor statistics of one tensor (feature means if asked)."""
        factored, inv_roots = self.factored(as_matrix(grad), acc, config)
        per_coordinate, mean, mean_square, param_ms = self.statistics(
            grad.reshape(-1), param.reshape(-1), acc, inv_roots, config, with_means
        )
        return Reduction({**acc, **factored, **per_coordinate}, inv_roots, mean, mean_square, param_ms)

    def apply(
        self, grad: Tensor, param: Tensor, reduced: Reduction, layers: Layers, skip: Tensor, step_size: Tensor,
        magnitude_scale: float, config: FeatureConfig,
    ) -> Tensor:
        """The update of one tensor, in its shape, from its reduction, the MLP and its step size."""
        scales = normalisation_scales(reduced.mean_square, config.eps)
        layers, skip = normalised_network(layers, skip, scales, grad.dtype)
        update = self.update(
            grad.reshape(-1), param.reshape(-1), reduced.acc, reduced.inv_roots, layers, skip,
            step_size.to(grad.dtype), magnitude_scale, config, self.pointwise,
        )
        return update.reshape(grad.shape)


class FeatureRule(UpdateRule):
    """Shared set-up of the rules built on :mod:`~metaoptimizer.rules.features` and
    :class:`PerCoordinateMLP`: argument checks, the step scale, the backend and the feature config."""

    def __init__(
        self, hidden_size: int, num_layers: int, features: FeatureConfig | Mapping[str, Any] | None,
        scale: StepScale, output_init: float, backend: str, seed: int,
    ) -> None:
        super().__init__()
        check_positive("hidden_size", hidden_size, integer=True)
        check_positive("num_layers", num_layers, integer=True, allow_zero=True)
        check_positive("output_init", output_init)
        self.scale = scale
        self.backend = check_backend(backend)
        self.features = FeatureConfig.coerce(features)
        self.budget_aware = self.features.training_fraction
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.output_init = float(output_init)
        self.seed = seed

    def hyperparameters(self) -> dict[str, object]:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "features": self.features.to_dict(),
            **dataclasses.asdict(self.scale),
            "output_init": self.output_init,
            "backend": self.backend,
            "seed": self.seed,
        }


class MLPRule(FeatureRule):
    """Per-parameter MLP learned optimizer (``method='l2o'``); see the module docstring.

    ``hidden_size`` x ``num_layers`` ReLU hidden units (``num_layers=0``: a linear rule),
    ``features`` a :class:`FeatureConfig` (or a dict of its fields), ``output_init`` the scale of
    the output layer's initial weights relative to 1/sqrt(fan_in), ``seed`` the seed of the
    initial meta-parameters.
    """

    name = "l2o"

    def __init__(
        self,
        hidden_size: int = 4,
        num_layers: int = 2,
        features: FeatureConfig | Mapping[str, Any] | None = None,
        step_mult: float = 1e-2,
        magnitude_scale: float = 1.0,
        param_relative: bool = True,
        param_scale_floor: float = 1e-3,
        output_init: float = 1e-2,
        backend: str = "matmul",
        seed: int = 0,
    ) -> None:
        super().__init__(hidden_size, num_layers, features, StepScale(step_mult, magnitude_scale, param_relative,
                         param_scale_floor), output_init, backend, seed)
        self.mlp = PerCoordinateMLP(
            self.features.num_features, self.features.num_global, hidden_size, num_layers,
            prior_index(self.features), output_init=output_init, seed=seed,
        )

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        return OptimizerState(num_steps=self.resolve_num_steps(num_steps), slots=init_slots(params, self.features))

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        step, state = self.begin_update(grads, state, params, loss)
        config = self.features
        check_update_inputs(grads, params, state.slots, config)
        if not grads:
            return {}, state.replace(step_count=step)
        device = next(iter(grads.values())).device
        shared = global_features(step, state, config, device=device, dtype=self.mlp.skip.dtype)
        layers, skip = self.mlp.layers(shared)
        dtypes = {name: g.dtype for name, g in grads.items()}
        grads, params = in_compute_dtype(grads), in_compute_dtype({name: params[name] for name in grads})
        passes = TensorPasses.select(self.backend, autograd_needed(self, grads, params))
        updates: Params = {}
        accumulators: dict[str, Accumulators] = {}
        for name, grad in grads.items():
            reduced = passes.reduce(grad, params[name], tensor_accumulators(state.slots, name, config), config)
            step_size = self.scale.step_size(reduced.param_mean_square)
            updates[name] = passes.apply(
                grad, params[name], reduced, layers, skip, step_size, self.scale.magnitude_scale, config
            )
            accumulators[name] = reduced.acc
        updates = {name: u.to(dtypes[name]) for name, u in updates.items()}
        return updates, state.replace(step_count=step, slots=updated_slots(state, accumulators))
