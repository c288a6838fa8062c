"""A hierarchical learned optimizer: a per-tensor LSTM steers a tiny per-coordinate MLP.

In the spirit of Wichrowska et al. 2017 ("Learned optimizers that scale and generalize") and
VeLO (Metz et al. 2022): the expensive recurrent computation runs once per *tensor*, not once per
coordinate. Each step:

1. every tensor's reduction passes (:class:`~metaoptimizer.rules.mlp.TensorPasses`) advance its
   accumulators and summarise its features: log mean square and normalised mean of each
   feature, the step embeddings, log size, rank and log parameter mean square;
2. an LSTM cell (plain matrix products, so it supports double backward), shared by all tensors
   and batched over them, reads each summary together with the mean hidden state of all
   tensors (the cross-tensor context of Wichrowska et al.'s global RNN);
3. its head gives, per tensor, softmax mixture coefficients over a bank of tiny per-coordinate
   MLPs and a log step-size multiplier;
4. each tensor's update is the mixed MLP's output, exactly as in
   :class:`~metaoptimizer.rules.mlp.MLPRule` (same features, same fused pointwise kernel).

Per-coordinate state is that of the :class:`~metaoptimizer.rules.features.FeatureConfig`
(2 floats by default, Adam's budget); the LSTM keeps ``2 * tensor_hidden_size`` floats per
tensor in the slots ``tensor_hidden`` / ``tensor_cell``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metaoptimizer._validation import check_positive
from metaoptimizer.rules.base import check_slots, in_compute_dtype
from metaoptimizer.rules.state import OptimizerState
from metaoptimizer.rules.base import Params
from metaoptimizer.rules.features import (
    LOG_SCALE,
    FeatureConfig,
    check_update_inputs,
    global_features,
    init_slots,
    tensor_accumulators,
)
from metaoptimizer.rules.mlp import (
    MAX_LOG_MAGNITUDE,
    FeatureRule,
    PerCoordinateMLP,
    Reduction,
    StepScale,
    TensorPasses,
    autograd_needed,
    prior_index,
    updated_slots,
)

#: Per-tensor inputs besides the feature statistics and global features: log size, rank >= 2, log mean(p^2).
SHAPE_INPUTS = 3


def lstm_cell(x: Tensor, hidden: Tensor, cell: Tensor, input_weight: Tensor, hidden_weight: Tensor, bias: Tensor):
    """One LSTM step over a batch (rows of ``x``) as plain matrix products; gates in order i, f, g, o."""
    gates = x @ input_weight + hidden @ hidden_weight + bias
    i, f, g, o = gates.chunk(4, dim=-1)
    cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cell), cell


def tensor_summary(reduced: Reduction, global_feats: Tensor, numel: int, ndim: int, eps: float) -> Tensor:
    """What the per-tensor LSTM sees of one tensor (a vector of O(1) entries)."""
    log_mean_square = LOG_SCALE * torch.log(reduced.mean_square + eps)
    normalised_mean = reduced.mean * torch.rsqrt(reduced.mean_square + eps)
    shape = torch.stack([
        torch.tensor(LOG_SCALE * math.log(max(numel, 1)), dtype=log_mean_square.dtype, device=log_mean_square.device),
        torch.tensor(float(ndim >= 2), dtype=log_mean_square.dtype, device=log_mean_square.device),
        LOG_SCALE * torch.log(reduced.param_mean_square + eps),
    ])
    return torch.cat([log_mean_square, normalised_mean, global_feats.to(log_mean_square.dtype), shape])


class HierarchicalRule(FeatureRule):
    """Per-tensor LSTM producing the mixture of a bank of per-coordinate MLPs (see the module docstring).

    ``hidden_size`` x ``num_layers``: the per-coordinate MLPs, ``bank_size`` how many of them
    the LSTM mixes, ``tensor_hidden_size`` the LSTM's width. ``features``, ``step_mult``,
    ``magnitude_scale``, ``param_relative``, ``param_scale_floor``, ``output_init``, ``backend``
    and ``seed`` are as in :class:`~metaoptimizer.rules.mlp.MLPRule`. The LSTM's log step-size
    multiplier is bounded like the per-coordinate magnitude.
    """

    name = "hierarchical"

    def __init__(
        self,
        hidden_size: int = 4,
        num_layers: int = 1,
        bank_size: int = 4,
        tensor_hidden_size: int = 16,
        features: FeatureConfig | Mapping[str, Any] | None = None,
        step_mult: float = 1e-2,
        magnitude_scale: float = 1.0,
        param_relative: bool = True,
        param_scale_floor: float = 1e-3,
        output_init: float = 1e-2,
        backend: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(hidden_size, num_layers, features, StepScale(step_mult, magnitude_scale, param_relative,
                         param_scale_floor), output_init, backend, seed)
        check_positive("bank_size", bank_size, integer=True)
        check_positive("tensor_hidden_size", tensor_hidden_size, integer=True)
        self.bank_size = bank_size
        self.tensor_hidden_size = tensor_hidden_size
        config = self.features
        self.bank = PerCoordinateMLP(
            config.num_features, config.num_global, hidden_size, num_layers, prior_index(config),
            bank_size=bank_size, output_init=output_init, seed=seed,
        )
        summary_size = 2 * config.num_features + config.num_global + SHAPE_INPUTS
        generator = torch.Generator().manual_seed(seed + 1)
        width = tensor_hidden_size
        bound = 1.0 / math.sqrt(width)
        uniform = lambda *shape: (torch.rand(*shape, generator=generator) * 2 - 1) * bound  # noqa: E731
        self.input_weight = nn.Parameter(uniform(summary_size + width, 4 * width))
        self.hidden_weight = nn.Parameter(uniform(width, 4 * width))
        lstm_bias = torch.zeros(4 * width)
        lstm_bias[width : 2 * width] = 1.0  # forget-gate bias: remember by default
        self.lstm_bias = nn.Parameter(lstm_bias)
        self.head_weight = nn.Parameter(uniform(width, bank_size + 1) * output_init)
        self.head_bias = nn.Parameter(torch.zeros(bank_size + 1))

    def hyperparameters(self) -> dict[str, object]:
        return {**super().hyperparameters(), "bank_size": self.bank_size, "tensor_hidden_size": self.tensor_hidden_size}

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        dtype = self.head_bias.dtype
        zeros = lambda p: torch.zeros(self.tensor_hidden_size, dtype=dtype, device=p.device)  # noqa: E731
        slots = init_slots(params, self.features)
        slots["tensor_hidden"] = {name: zeros(p) for name, p in params.items()}
        slots["tensor_cell"] = {name: zeros(p) for name, p in params.items()}
        return OptimizerState(num_steps=self.resolve_num_steps(num_steps), slots=slots)

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        step, state = self.begin_update(grads, state, params, loss)
        config = self.features
        check_update_inputs(grads, params, state.slots, config)
        check_slots(self, state, grads, ("tensor_hidden", "tensor_cell"))
        if not grads:
            return {}, state.replace(step_count=step)
        names = list(grads)
        dtypes = {name: g.dtype for name, g in grads.items()}
        grads, params = in_compute_dtype(grads), in_compute_dtype({name: params[name] for name in names})
        dtype = self.head_bias.dtype
        global_feats = global_features(step, state, config, device=grads[names[0]].device, dtype=dtype)
        autograd = autograd_needed(self, grads, params)
        passes = {name: TensorPasses.select(self.backend, autograd, grads[name].numel()) for name in names}
        reduced = {
            name: passes[name].reduce(
                grads[name], params[name], tensor_accumulators(state.slots, name, config), config, with_means=True
            )
            for name in names
        }
        summaries = torch.stack([
            tensor_summary(reduced[name], global_feats, params[name].numel(), params[name].dim(), config.eps)
            for name in names
        ]).to(dtype)
        hidden = torch.stack([state.slots["tensor_hidden"][name] for name in names])
        cell = torch.stack([state.slots["tensor_cell"][name] for name in names])
        context = hidden.mean(dim=0, keepdim=True).expand_as(hidden)
        hidden, cell = lstm_cell(
            torch.cat([summaries, context], dim=1), hidden, cell, self.input_weight, self.hidden_weight, self.lstm_bias
        )
        head = hidden @ self.head_weight + self.head_bias
        mixture = torch.softmax(head[:, : self.bank_size], dim=1)
        multipliers = torch.exp(torch.clamp(head[:, self.bank_size], -MAX_LOG_MAGNITUDE, MAX_LOG_MAGNITUDE))
        layers, skip = self.bank.layers(global_feats, mixture)
        updates: Params = {}
        for index, name in enumerate(names):
            tensor_layers = [(w[index], b[index]) for w, b in layers]
            step_size = self.scale.step_size(reduced[name].param_mean_square) * multipliers[index]
            updates[name] = passes[name].apply(
                grads[name], params[name], reduced[name], tensor_layers, skip[index], step_size,
                self.scale.magnitude_scale, config,
            )
        slots = updated_slots(state, {name: r.acc for name, r in reduced.items()})
        slots["tensor_hidden"] = {**state.slots["tensor_hidden"], **dict(zip(names, hidden.unbind(0), strict=True))}
        slots["tensor_cell"] = {**state.slots["tensor_cell"], **dict(zip(names, cell.unbind(0), strict=True))}
        return {name: u.to(dtypes[name]) for name, u in updates.items()}, state.replace(step_count=step, slots=slots)
