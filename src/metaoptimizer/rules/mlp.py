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

Per-tensor statistics (each feature's mean square, for the normalisation, and the parameter's
mean square, for the step size) come with ``statistics='previous'`` (the default) from the
tensor's previous update, so every update after a tensor's first is **one pass** over its
coordinates that advances the accumulators, computes the features once, evaluates the MLP with
last update's normalisation and sums this update's statistics for the next one. The semantic
change against ``statistics='current'`` (the reference mode: statistics of this very update,
two passes) is a one-step lag in a per-tensor scale; a tensor's first update computes its own
statistics first, so step 1 is the same in both modes. The lagged statistics live in the slots
``feature_mean_square`` (one float per feature) and ``param_mean_square`` (one float) per tensor.
With factored features a factored pass (row and column reductions) comes first in both modes.

``backend`` picks how the passes run: ``'matmul'`` (eager, the MLP as matrix products: the
reference, and what meta-training differentiates), ``'pointwise'`` (eager, the MLP unrolled into
pointwise arithmetic, :mod:`metaoptimizer.rules.fused`), ``'compiled'`` (the pointwise form
through ``torch.compile``; used only when no autograd graph is recorded, the matmul path
otherwise) or ``'auto'`` (the default): compiled kernels for tensors of at least
:data:`COMPILE_MIN_NUMEL` coordinates when no autograd graph is recorded, the eager matmul form
otherwise (small tensors cost per-call overhead either way, and tests never wait for a compiler).
A compiler failure falls back to the eager form with one warning. All backends give the same
numbers up to rounding.

:meth:`MLPRule.update_in_place` is the deployment form (no autograd): the one pass writes the
accumulators and ``param + lr * update`` where they lie, so a step allocates no full-size tensor.
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
    advance_per_coordinate,
    as_matrix,
    feature_moments,
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

BACKENDS = ("auto", "matmul", "pointwise", "compiled")
#: Where each rule's per-tensor statistics come from (see the module docstring).
STATISTICS = ("previous", "current")
#: Smallest tensor that ``backend='auto'`` runs through compiled kernels.
COMPILE_MIN_NUMEL = 1 << 16
#: Slots of the lagged per-tensor statistics (``statistics='previous'``).
LAGGED_SLOTS = ("feature_mean_square", "param_mean_square")
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


def check_statistics(statistics: str) -> str:
    if statistics not in STATISTICS:
        raise ValueError(
            f"statistics={statistics!r} is not supported; accepted values: {', '.join(map(repr, STATISTICS))}"
        )
    return statistics


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; accepted values: {', '.join(map(repr, BACKENDS))}")
    return backend


def updated_slots(state: OptimizerState, accumulators: Mapping[str, Accumulators]) -> dict[str, dict[str, Tensor]]:
    """``state.slots`` with the accumulators of the parameters in ``accumulators`` replaced."""
    slots = {slot: dict(values) for slot, values in state.slots.items()}
    for name, acc in accumulators.items():
        for slot, value in acc.items():
            slots.setdefault(slot, {})[name] = value
    return slots


def autograd_needed(rule: nn.Module, *tensor_dicts: Mapping[str, Tensor]) -> bool:
    """Whether this call records an autograd graph (then compiled steps are not used)."""
    if not torch.is_grad_enabled():
        return False
    tensors = [*rule.parameters(), *(t for d in tensor_dicts for t in d.values())]
    return any(t.requires_grad for t in tensors)


def check_deployment_call(rule: nn.Module, *tensor_dicts: Mapping[str, Tensor]) -> None:
    """Refuse an ``update_in_place`` call that would record an autograd graph: writing state and
    parameters in place would cut it."""
    if autograd_needed(rule, *tensor_dicts):
        raise ValueError("update_in_place is for deployment: call it under torch.no_grad(), or use update()")


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


def scaled_update(
    features: list[Tensor], layers: Layers, skip: Tensor, step_size: Tensor, magnitude_scale: float, pointwise: bool
) -> Tensor:
    """The MLP's direction times its bounded magnitude times the step size, for flat features."""
    direction, magnitude = (mlp_pointwise if pointwise else mlp_matmul)(features, layers, skip)
    log_size = torch.clamp(magnitude * magnitude_scale, -MAX_LOG_MAGNITUDE, MAX_LOG_MAGNITUDE)
    return direction * torch.exp(log_size) * step_size


def tensor_update(
    grad: Tensor, param: Tensor, acc: Accumulators, inv_roots: list[Tensor], layers: Layers, skip: Tensor,
    step_size: Tensor, magnitude_scale: float, config: FeatureConfig, pointwise: bool,
) -> Tensor:
    """One tensor's pointwise pass over flat tensors: features, MLP and the scaled update.

    ``layers`` and ``skip`` already include the tensor's feature normalisation
    (:func:`normalised_network`).
    """
    features = tensor_features(grad, param, acc, inv_roots, config)
    return scaled_update(features, layers, skip, step_size, magnitude_scale, pointwise)


def fused_tensor_step(
    grad: Tensor, param: Tensor, acc: Accumulators, inv_roots: list[Tensor], layers: Layers, skip: Tensor,
    step_size: Tensor, magnitude_scale: float, config: FeatureConfig, pointwise: bool,
) -> tuple[Accumulators, Tensor, Tensor, Tensor]:
    """One tensor's whole step in one pass over flat tensors (``statistics='previous'``).

    Advances the per-coordinate accumulators, computes the features once, applies the MLP
    (``layers``/``skip`` normalised with the previous update's statistics) and sums this update's
    statistics. Returns (new accumulators, update, features' mean squares, ``mean(param^2)``).
    """
    new_acc = advance_per_coordinate(grad, acc, config)
    features = tensor_features(grad, param, new_acc, inv_roots, config)
    _, mean_square = feature_moments(features, with_means=False)
    update = scaled_update(features, layers, skip, step_size, magnitude_scale, pointwise)
    return new_acc, update, mean_square, param.square().mean()


def fused_tensor_step_(
    grad: Tensor, param: Tensor, acc: Accumulators, inv_roots: list[Tensor], layers: Layers, skip: Tensor,
    step_size: Tensor, magnitude_scale: float, config: FeatureConfig, pointwise: bool, lr: Tensor,
) -> tuple[Tensor, Tensor]:
    """:func:`fused_tensor_step` writing in place: the accumulators into ``acc``'s tensors and
    ``param + lr * update`` into ``param`` (flat views). Returns this update's statistics."""
    new_acc, update, mean_square, param_mean_square = fused_tensor_step(
        grad, param, acc, inv_roots, layers, skip, step_size, magnitude_scale, config, pointwise
    )
    for slot, value in new_acc.items():
        acc[slot].copy_(value)
    param.add_(update * lr)
    return mean_square, param_mean_square


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
    fused: Callable
    fused_: Callable
    pointwise: bool

    @classmethod
    def select(cls, backend: str, autograd: bool, numel: int | None = None) -> TensorPasses:
        """The passes for ``backend`` and a tensor of ``numel`` coordinates (None: any size);
        compiled ones only when no autograd graph is recorded."""
        if backend == "auto":
            backend = "compiled" if numel is not None and numel >= COMPILE_MIN_NUMEL else "matmul"
        if backend == "compiled" and not autograd:
            return cls(
                compiled(factored_pass), compiled(tensor_statistics), compiled(tensor_update),
                compiled(fused_tensor_step), compiled(fused_tensor_step_), True,
            )
        return cls(
            factored_pass, tensor_statistics, tensor_update, fused_tensor_step, fused_tensor_step_,
            backend == "pointwise",
        )

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

    def fused_step(
        self, grad: Tensor, param: Tensor, acc: Accumulators, previous: tuple[Tensor, Tensor], layers: Layers,
        skip: Tensor, scale: StepScale, config: FeatureConfig, lr: Tensor | None = None,
    ) -> tuple[Accumulators, Tensor | None, tuple[Tensor, Tensor]]:
        """One tensor's step from the previous update's (feature mean squares, parameter mean
        square); returns the new accumulators, the update in the tensor's shape and this update's
        statistics (:func:`fused_tensor_step`). With ``lr`` the step is written in place
        (:func:`fused_tensor_step_`: ``acc``'s tensors and ``param`` change) and the update is None."""
        factored, inv_roots = self.factored(as_matrix(grad), acc, config)
        feature_ms, param_ms = previous
        scales = normalisation_scales(feature_ms.to(grad.dtype), config.eps)
        layers, skip = normalised_network(layers, skip, scales, grad.dtype)
        step_size = scale.step_size(param_ms.to(grad.dtype))
        args = (grad.reshape(-1), param.view(-1), acc, inv_roots, layers, skip, step_size, scale.magnitude_scale, config,
                self.pointwise)
        if lr is not None:
            statistics = self.fused_(*args, lr)
            for slot, value in factored.items():
                acc[slot].copy_(value)
            return acc, None, statistics
        per_coordinate, update, feature_ms, param_ms = self.fused(*args)
        return {**acc, **factored, **per_coordinate}, update.reshape(grad.shape), (feature_ms, param_ms)


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
        backend: str = "auto",
        statistics: str = "previous",
        seed: int = 0,
    ) -> None:
        super().__init__(hidden_size, num_layers, features, StepScale(step_mult, magnitude_scale, param_relative,
                         param_scale_floor), output_init, backend, seed)
        self.statistics = check_statistics(statistics)
        self.mlp = PerCoordinateMLP(
            self.features.num_features, self.features.num_global, hidden_size, num_layers,
            prior_index(self.features), output_init=output_init, seed=seed,
        )

    def hyperparameters(self) -> dict[str, object]:
        return {**super().hyperparameters(), "statistics": self.statistics}

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        return OptimizerState(num_steps=self.resolve_num_steps(num_steps), slots=init_slots(params, self.features))

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        return self._step(grads, state, params, loss, lr=None)

    def update_in_place(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        lr: float = 1.0, loss: Tensor | float | None = None,
    ) -> OptimizerState:
        """``update`` for deployment, writing in place: adds ``lr`` times the update to ``params``
        and writes the new accumulators into ``state``'s tensors (the returned state shares them;
        the caller gives up the old one). One pass per tensor reads gradient, parameter and
        accumulators once and writes parameter and accumulators once, with no new full-size
        tensor. The same numbers as ``update`` then ``params + lr * updates`` (tests pin it).
        """
        check_deployment_call(self, grads, params)
        _, state = self._step(grads, state, params, loss, lr=lr)
        return state

    def _step(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor],
        loss: Tensor | float | None, lr: float | None,
    ) -> tuple[Params, OptimizerState]:
        """``update`` (``lr`` None) or ``update_in_place`` (``lr`` its factor)."""
        step, state = self.begin_update(grads, state, params, loss)
        config = self.features
        check_update_inputs(grads, params, state.slots, config)
        if not grads:
            return {}, state.replace(step_count=step)
        device = next(iter(grads.values())).device
        shared = global_features(step, state, config, device=device, dtype=self.mlp.skip.dtype)
        layers, skip = self.mlp.layers(shared)
        originals = params
        dtypes = {name: g.dtype for name, g in grads.items()}
        grads, params = in_compute_dtype(grads), in_compute_dtype({name: params[name] for name in grads})
        autograd = autograd_needed(self, grads, params)
        lagged = [state.slots.get(slot, {}) for slot in LAGGED_SLOTS]
        updates: Params = {}
        new_slots: dict[str, Accumulators] = {}
        for name, grad in grads.items():
            passes = TensorPasses.select(self.backend, autograd, grad.numel())
            acc = tensor_accumulators(state.slots, name, config)
            param = params[name]
            in_place = lr is not None and param is originals[name] and param.is_contiguous()
            if self.statistics == "previous" and all(name in values for values in lagged):
                lr_tensor = torch.tensor(lr, dtype=param.dtype, device=param.device) if in_place else None
                acc, updates[name], statistics = passes.fused_step(
                    grad, param, acc, (lagged[0][name], lagged[1][name]), layers, skip, self.scale, config, lr_tensor
                )
            else:  # reference mode, and a tensor's first update in the lagged mode
                reduced = passes.reduce(grad, param, acc, config)
                updates[name] = passes.apply(
                    grad, param, reduced, layers, skip, self.scale.step_size(reduced.param_mean_square),
                    self.scale.magnitude_scale, config,
                )
                acc, statistics = reduced.acc, (reduced.mean_square, reduced.param_mean_square)
            if self.statistics == "previous":
                acc = {**acc, **dict(zip(LAGGED_SLOTS, statistics, strict=True))}
            new_slots[name] = acc
        if lr is not None:  # the rest of update_in_place: what the fused step did not write
            for name, update in updates.items():
                if update is not None:
                    originals[name].add_(update.to(dtypes[name]), alpha=lr)
            for name, acc in new_slots.items():
                for slot, value in acc.items():
                    old = state.slots.get(slot, {}).get(name)
                    if old is not None and old is not value:
                        old.copy_(value)
                        acc[slot] = old
            return {}, state.replace(step_count=step, slots=updated_slots(state, new_slots))
        updates = {name: u.to(dtypes[name]) for name, u in updates.items()}
        return updates, state.replace(step_count=step, slots=updated_slots(state, new_slots))
