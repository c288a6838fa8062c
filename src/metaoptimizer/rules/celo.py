"""Celo and Celo-Adam: general-purpose learned optimizers (Moudgil et al., TMLR 2025).

Both scale a per-tensor step by the learned LSTM scheduler's ``lr_mult`` (see
:mod:`metaoptimizer.rules._celo_common`). **Celo**'s step comes from a tiny per-coordinate MLP
(30 inputs, two hidden layers of 4, ReLU) over Adam- and Adafactor-style features, each feature
normalised by its root mean square over the tensor; the step is relative to the tensor's scale:
``-lr_mult * 1e-3 * direction * exp(1e-3 * magnitude) * rms(param)``. **Celo-Adam** is Adam
(betas 0.9/0.999, eps 1e-8) whose learning rate is ``1e-3 * lr_mult``.

Notice: adapted from amoudgl/celo (``celo/optimizers/celo.py``, ``celo_adam.py``; Copyright (c)
2025 Abhinav Moudgil, MIT) and google/learned_optimization (Copyright 2021 Google LLC, Apache
License 2.0); see :mod:`metaoptimizer.rules._celo_common`.

``CeloRule.pretrained()`` / ``CeloAdamRule.pretrained()`` carry the authors' trained weights
(MIT, shipped in ``metaoptimizer/pretrained``); ``CeloRule()`` starts from the reference's
initialisation for meta-training. Both need the budget (``init(params, num_steps=N)``) and the
loss at every update (``update(..., loss=L)``); see ``CeloFamilyRule`` for dtypes and state.

Example: a few Celo steps on a quadratic.

>>> import torch
>>> from metaoptimizer.rules.base import apply_updates
>>> rule = CeloRule.pretrained()
>>> params = {"w": torch.ones(3, 2)}
>>> state = rule.init(params, num_steps=20)
>>> for _ in range(20):
...     loss = (params["w"] ** 2).sum()
...     updates, state = rule.update({"w": 2 * params["w"]}, state, params, loss=loss)
...     params = apply_updates(params, updates)
>>> bool((params["w"] ** 2).sum() < 6.0)
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from metaoptimizer.rules._celo_common import (
    CeloFamilyRule, as_float32, ema, factored_accumulate, factored_dims, factored_preconditioned,
    factored_slot_shapes, row_col_factors, truncated_normal,
)
from metaoptimizer.rules.fused import Layers, compiled, mlp_pointwise

#: Decays of Celo's accumulators (the published configuration).
MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAYS = (0.999,)
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)

#: The per-coordinate MLP's input groups, in the reference's order, with their widths.
FEATURE_GROUPS = (
    ("grad", 1), ("clipped_grad", 1), ("param", 1), ("momentum", 3), ("rms", 1), ("momentum_rsqrt_rms", 3),
    ("rsqrt_rms", 1), ("adafactor_grad", 3), ("grad_rsqrt_rms", 1), ("row", 3), ("col", 3),
    ("rsqrt_row", 3), ("rsqrt_col", 3), ("adafactor_momentum", 3),
)
NUM_FEATURES = sum(width for _, width in FEATURE_GROUPS)
MLP_HIDDEN = 4
#: Scales of the MLP's outputs (the reference's ``step_mult`` and ``exp_mult``).
STEP_MULT = 1e-3
EXP_MULT = 1e-3


def normalise(feature: Tensor) -> Tensor:
    """Each feature (leading axis) divided by its root mean square over the tensor (eps 1e-5)."""
    return feature * torch.rsqrt(1e-5 + mean_squares(feature))


def mean_squares(feature: Tensor) -> Tensor:
    """Mean of the squares of each feature (leading axis) over the tensor (keeps the dims)."""
    return feature.square().mean(dim=tuple(range(1, feature.dim())), keepdim=True)


Dims = tuple[int, int] | None


def accumulate(grad: Tensor, slots: Mapping[str, Tensor], dims: Dims) -> dict[str, Tensor]:
    """Celo's accumulators (momentum, RMS, Adafactor moments) advanced with ``grad``; ``dims`` is
    ``factored_dims(grad.shape)``, computed by the caller so compiled passes see plain ints."""
    device = grad.device
    second = {key: value for key, value in slots.items() if key.startswith("v_")}
    return {
        "momentum": ema(slots["momentum"], grad, as_float32(MOMENTUM_DECAYS).to(device)),
        "rms": ema(slots["rms"], grad * grad, as_float32(RMS_DECAYS).to(device)),
        **factored_accumulate(grad, second, as_float32(ADAFACTOR_DECAYS).to(device), dims),
    }


def celo_features(grad: Tensor, param: Tensor, acc: Mapping[str, Tensor], dims: Dims) -> list[Tensor]:
    """The MLP's inputs (:data:`FEATURE_GROUPS`), each with a leading feature axis, from the
    accumulators ``acc`` already advanced with ``grad``.

    A tensor below 2 dims has no row/column factors; its full Adafactor second moment stands in
    for both, as in the reference.
    """
    momentum, rms = acc["momentum"], acc["rms"]
    adafactor_grad = factored_preconditioned(grad, acc, dims)
    rsqrt_rms = torch.rsqrt(rms + 1e-6)
    g = grad.unsqueeze(0)
    if dims is None:
        v = acc["v_diag"]
        row_col = [v, v, torch.rsqrt(v + 1e-8), torch.rsqrt(v + 1e-8)]
        # m * v^-1/2; where v is tiny (a gradient that was always ~0, so m is ~0 too) the
        # derivative through v would be 0 * inf: stop it there, the value is unchanged.
        v_safe = torch.where(v < 1e-20, v.detach(), v)
        adafactor_momentum = momentum * v_safe**-0.5
    else:
        row_col = [f.expand_as(adafactor_grad) for f in row_col_features(acc, dims)]
        row_factor, col_factor = row_col_factors(acc["v_row"], acc["v_col"], dims)
        adafactor_momentum = momentum * row_factor * col_factor
    return [
        g, g.clamp(-0.1, 0.1), param.unsqueeze(0), momentum, rms, momentum * rsqrt_rms, rsqrt_rms, adafactor_grad,
        g * rsqrt_rms, *row_col, adafactor_momentum,
    ]


def row_col_features(acc: Mapping[str, Tensor], dims: tuple[int, int]) -> list[Tensor]:
    """Features 9-12 of a tensor of 2+ dims (row and column averages, their inverse square roots),
    computed on the averages and broadcastable against the tensor (not expanded)."""
    d1, d0 = dims
    row, col = acc["v_row"].unsqueeze(1 + d0), acc["v_col"].unsqueeze(1 + d1)
    return [row, col, torch.rsqrt(row + 1e-8), torch.rsqrt(col + 1e-8)]


def celo_step(direction: Tensor, magnitude: Tensor, param: Tensor, lr_mult: Tensor) -> Tensor:
    """The update from the MLP's outputs: a step relative to the tensor's root mean square."""
    param_scale = torch.sqrt(param.square().mean() + 1e-9)
    return -(lr_mult * (direction * (param_scale * torch.exp(magnitude * EXP_MULT)) * STEP_MULT))


def statistics_pass(
    grad: Tensor, param: Tensor, slots: Mapping[str, Tensor], dims: Dims
) -> tuple[dict[str, Tensor], Tensor]:
    """First pass over the coordinates: the advanced accumulators and the (30,) mean squares of
    the features (the features themselves are not kept)."""
    acc = accumulate(grad, slots, dims)
    features = celo_features(grad, param, acc, dims)
    if dims is not None:
        # A row or column feature repeats one average along an axis: its mean square is the averages'.
        features[9:13] = row_col_features(acc, dims)
    return acc, torch.cat([mean_squares(f).reshape(-1) for f in features])


def update_pass(
    grad: Tensor, param: Tensor, acc: Mapping[str, Tensor], layers: Layers, lr_mult: Tensor, dims: Dims
) -> Tensor:
    """Second pass, pointwise: features, the MLP (normalisation folded into ``layers``), the step."""
    columns = [column for f in celo_features(grad, param, acc, dims) for column in f]
    direction, magnitude = mlp_pointwise(columns, layers)
    return celo_step(direction, magnitude, param, lr_mult)


class CeloRule(CeloFamilyRule):
    """Celo: learned scheduler times a per-coordinate MLP step relative to the parameter scale.

    State per parameter: momentum (3 floats per coordinate), RMS (1), and either Adafactor row
    and column averages (3 decays each, one per row/column) or, below 2 dims, the full second
    moment (3): for a tensor of 2+ dims, 4 floats per coordinate plus 3 per row and per column,
    for a vector 7 per coordinate; plus 149 floats per tensor for the scheduler.

    ``backend='eager'`` computes the features once and the MLP as matrix products (what the
    golden tests and meta-training use). ``'compiled'`` runs each tensor in two fused passes
    through ``torch.compile`` (accumulators and feature statistics, then the pointwise MLP with
    the normalisation folded into its first layer), which never materialises the 30 features;
    it is used only when no autograd graph is recorded (deployment), the eager form otherwise,
    and agrees with it to float32 rounding. The first compiled step takes minutes on a CPU.
    """

    name = "celo"
    weights_file = "celo_theta.npz"

    def __init__(self, lstm_hidden_size: int = 64, backend: str = "eager") -> None:
        super().__init__(lstm_hidden_size, backend)
        self.first_weight = nn.Parameter(truncated_normal(NUM_FEATURES, MLP_HIDDEN))
        self.first_bias = nn.Parameter(torch.zeros(MLP_HIDDEN))
        self.hidden_weight = nn.Parameter(truncated_normal(MLP_HIDDEN, MLP_HIDDEN))
        self.hidden_bias = nn.Parameter(torch.zeros(MLP_HIDDEN))
        # Two outputs (direction, log-magnitude); the reference's third output is unused.
        self.out_weight = nn.Parameter(truncated_normal(MLP_HIDDEN, 3)[:, :2].clone())
        self.out_bias = nn.Parameter(torch.zeros(2))

    def coordinate_slot_shapes(self, shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
        return {
            "momentum": (len(MOMENTUM_DECAYS), *shape),
            "rms": (len(RMS_DECAYS), *shape),
            **factored_slot_shapes(shape, len(ADAFACTOR_DECAYS)),
        }

    def layers(self) -> list[tuple[Tensor, Tensor]]:
        """The MLP's (weight, bias) pairs, ReLU between them."""
        return [
            (self.first_weight, self.first_bias), (self.hidden_weight, self.hidden_bias),
            (self.out_weight, self.out_bias),
        ]

    def tensor_update(
        self, grad: Tensor, param: Tensor, slots: dict[str, Tensor], lr_mult: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        dims = factored_dims(grad.shape)
        if self.fused_step(grad, param, lr_mult, *slots.values()):
            acc, feature_mean_squares = compiled(statistics_pass)(grad, param, slots, dims)
            (first_weight, first_bias), *rest = self.layers()
            folded = [(first_weight * torch.rsqrt(1e-5 + feature_mean_squares)[:, None], first_bias), *rest]
            return compiled(update_pass)(grad, param, acc, folded, lr_mult, dims), acc
        acc = accumulate(grad, slots, dims)
        x = torch.cat([normalise(f) for f in celo_features(grad, param, acc, dims)]).reshape(NUM_FEATURES, -1).T
        for index, (weight, bias) in enumerate(self.layers()):
            x = (torch.relu(x) if index else x) @ weight + bias
        direction, magnitude = (x[:, i].reshape(param.shape) for i in (0, 1))
        return celo_step(direction, magnitude, param, lr_mult), acc

    def weight_layout(self) -> dict[str, tuple[int, ...]]:
        layout = {f"ff_mod_stack/~/w0__{i}": (1, width, MLP_HIDDEN) for i, (_, width) in enumerate(FEATURE_GROUPS)}
        return {
            **layout,
            "ff_mod_stack/~/b0": (1, MLP_HIDDEN),
            "ff_mod_stack/~/w1": (1, MLP_HIDDEN, MLP_HIDDEN),
            "ff_mod_stack/~/b1": (1, MLP_HIDDEN),
            "ff_mod_stack/~/w2": (1, MLP_HIDDEN, 3),
            "ff_mod_stack/~/b2": (1, 3),
        }

    def load_rule_weights(self, arrays: Mapping[str, Tensor]) -> None:
        # The leading axis is the reference's ``param_inits = 1`` (its controls are then always 1).
        first = [arrays[f"ff_mod_stack/~/w0__{i}"][0] for i in range(len(FEATURE_GROUPS))]
        self.first_weight.copy_(torch.cat(first))
        self.first_bias.copy_(arrays["ff_mod_stack/~/b0"][0])
        self.hidden_weight.copy_(arrays["ff_mod_stack/~/w1"][0])
        self.hidden_bias.copy_(arrays["ff_mod_stack/~/b1"][0])
        self.out_weight.copy_(arrays["ff_mod_stack/~/w2"][0, :, :2])
        self.out_bias.copy_(arrays["ff_mod_stack/~/b2"][0, :2])


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def adam_pass(
    grad: Tensor, momentum: Tensor, rms: Tensor, lr_mult: Tensor, corrections: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Celo-Adam's pointwise step: (update, new momentum, new RMS); ``corrections`` are Adam's bias
    corrections ``1 - beta**step`` as float32 tensors (so a compiled pass does not see the step)."""
    beta1, beta2 = (as_float32((beta,)).to(grad.device) for beta in ADAM_BETAS)
    momentum = ema(momentum, grad, beta1)
    rms = ema(rms, grad * grad, beta2)
    lr = lr_mult * STEP_MULT
    step_size = (momentum / corrections[0]) * (lr / (ADAM_EPS + torch.sqrt(rms / corrections[1] + 1e-10)))
    return -step_size[-1], momentum, rms


class CeloAdamRule(CeloFamilyRule):
    """Celo-Adam: Adam (bias-corrected, betas 0.9/0.999, eps 1e-8) at learning rate
    ``1e-3 * lr_mult`` from the learned scheduler. State: 2 floats per coordinate plus 149 per tensor.
    ``backend='compiled'`` fuses the pointwise step with ``torch.compile`` (deployment only, as for
    :class:`CeloRule`).
    """

    name = "celo_adam"
    weights_file = "celo_adam_theta.npz"

    def coordinate_slot_shapes(self, shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
        return {"momentum": (1, *shape), "rms": (1, *shape)}

    def tensor_update(
        self, grad: Tensor, param: Tensor, slots: dict[str, Tensor], lr_mult: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        corrections = tuple(1 - as_float32(beta).to(grad.device) ** step for beta in ADAM_BETAS)
        fn = compiled(adam_pass) if self.fused_step(grad, lr_mult, *slots.values()) else adam_pass
        update, momentum, rms = fn(grad, slots["momentum"], slots["rms"], lr_mult, corrections)
        return update, {"momentum": momentum, "rms": rms}
