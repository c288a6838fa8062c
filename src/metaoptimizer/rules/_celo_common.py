"""What Celo and Celo-Adam share: the learned LSTM scheduler, its loss-buffer and progress
features, the gradient accumulators, and the loader of the published weights.

Celo (Moudgil et al., "Celo: Training Versatile Learned Optimizers on a Compute Diet", TMLR 2025;
github.com/amoudgl/celo, MIT) runs one small LSTM per parameter tensor that reads how far training
has come and how the loss has moved, and emits a step-size multiplier ``lr_mult`` for that tensor.
Parts of the reference are adapted from google/learned_optimization (Apache-2.0): the
accumulators (``common.py``), the loss buffer and the tanh embedding of the training fraction
(VeLO's ``hyper_v2.py``). This is our own implementation of the same arithmetic, written against
``reference/*.py`` and checked against golden trajectories of the JAX code (``tests/test_celo.py``).

Notice: the algorithms here are adapted from google/learned_optimization, Copyright 2021 Google
LLC, licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0),
and from amoudgl/celo, Copyright (c) 2025 Abhinav Moudgil, MIT licence
(``metaoptimizer/pretrained/LICENSE-celo-MIT.txt``).

Conventions: every accumulator carries its decay axis *first* (the reference puts it last; first
keeps each decay's values contiguous, which the fused kernels need); the factored
(Adafactor-style) second moment reduces the two largest axes, ties broken by position (as
``numpy.argsort`` does on these short shapes); 0-d tensors are treated as shape (1,).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from importlib import resources
from os import PathLike

import numpy as np
import torch
from torch import Tensor, nn

from metaoptimizer._validation import check_positive
from metaoptimizer.rules.base import Params, UpdateRule, check_slots
from metaoptimizer.rules.mlp import autograd_needed
from metaoptimizer.rules.state import OptimizerState

#: Points (as fractions of the budget) where the tanh embedding of training progress switches.
FRACTION_TIMESCALES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
#: Number of exponential averages of the loss (half-lives log-spaced from 10 to the budget).
LOSS_BUFFER_SIZE = 10
#: Scheduler inputs: the progress embedding then the loss features (the reference's sorted keys).
SCHEDULER_INPUTS = len(FRACTION_TIMESCALES) + LOSS_BUFFER_SIZE - 1
GRAD_CLIP = 1000.0
#: Added to squared gradients by the factored accumulator (as in learned_optimization).
FACTORED_EPS = 1e-30

#: Run-level slots, one small copy per parameter tensor so the state splits per parameter.
HIDDEN, CELL, LOSS_MEANS, LOSS_MIN, LOSS_COUNT = "lstm_hidden", "lstm_cell", "loss_means", "loss_min", "loss_count"


def factored_dims(shape: Sequence[int]) -> tuple[int, int] | None:
    """``(d1, d0)``: the second-largest and the largest axis of ``shape`` (None below 2 dims).

    Equal sizes keep their order, as ``numpy.argsort`` does on the reference's short shapes, so
    a (3, 3, 4, 4) conv kernel factors over axes (2, 3).
    """
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda axis: shape[axis])
    return order[-2], order[-1]


def as_float32(value: float | Sequence[float]) -> Tensor:
    """Constants in float32, so ``1 - decay`` rounds as in the (float32) reference."""
    return torch.tensor(value, dtype=torch.float32)


def fraction_embedding(fraction: Tensor) -> Tensor:
    """``tanh(10 (fraction - timescale))`` for each of :data:`FRACTION_TIMESCALES`: shape (9,)."""
    return torch.tanh((fraction - as_float32(FRACTION_TIMESCALES).to(fraction.device)) * 10)


def loss_buffer_decays(num_steps: int, device: torch.device | None = None) -> Tensor:
    """Decays of the loss averages: half-lives log-spaced from 10 to ``num_steps`` updates.

    ``10**x`` is taken as ``exp(x ln 10)`` in float32, which gives the reference's decays bit for bit.
    """
    exponents = torch.linspace(1.0, math.log10(num_steps), LOSS_BUFFER_SIZE, dtype=torch.float32, device=device)
    half_lives = torch.exp(exponents * as_float32(math.log(10.0)).to(device))
    return torch.exp(-1.0 / half_lives)


def update_loss_buffer(
    means: Tensor, running_min: Tensor, decays: Tensor, loss: Tensor, count: Tensor
) -> tuple[Tensor, Tensor]:
    """Fold ``loss`` into the averages (last axis) of buffers that have seen ``count`` losses
    (shape ``means.shape[:-1] + (1,)``); returns (means, running minimum of the bias-corrected means).

    A loss above twice the largest bias-corrected average is clipped there, so a spike does not
    swamp the buffer (the first loss is taken as it is).
    """
    correction = 1 - decays ** (count + 1)
    ceiling = (means / correction).amax(dim=-1, keepdim=True).abs() * 2
    loss = torch.where(count == 0, loss, torch.minimum(ceiling, loss))
    means = means * decays + loss * (1.0 - decays)
    return means, torch.minimum(running_min, means / correction)


def loss_buffer_features(means: Tensor, running_min: Tensor, decays: Tensor, count: Tensor) -> Tensor:
    """Where each shorter average sits between its running minimum (-1) and the next longer
    average (0), clipped to [-1, 1] (last axis: 9 features); zeros while ``count`` (losses seen,
    this one included, at least 1) is at most 2."""
    corrected = means / (1 - decays**count)
    shorter, longer, floor = corrected[..., :-1], corrected[..., 1:], running_min[..., :-1]
    spread = torch.clamp(longer - floor, min=1e-8)
    features = torch.clamp((shorter - floor) / spread - 1.0, -1.0, 1.0)
    return torch.where(count <= 2, torch.zeros_like(features), features)


def ema(average: Tensor, value: Tensor, decays: Tensor) -> Tensor:
    """One exponential-average step per decay; ``average`` carries the decay axis first."""
    decays = decays.reshape(-1, *[1] * value.dim())
    return decays * average + (1 - decays) * value.unsqueeze(0)


def _safe_rsqrt(x: Tensor) -> Tensor:
    return torch.rsqrt(torch.clamp(x, min=1e-9))


def row_col_factors(v_row: Tensor, v_col: Tensor, dims: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Adafactor's factors, broadcastable against the full tensor (decay axis first)."""
    d1, d0 = dims
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_factor = _safe_rsqrt(v_row / (v_row.mean(dim=1 + reduced_d1, keepdim=True) + 1e-9))
    return row_factor.unsqueeze(1 + d0), _safe_rsqrt(v_col).unsqueeze(1 + d1)


def factored_accumulate(
    grad: Tensor, second: Mapping[str, Tensor], decays: Tensor, dims: tuple[int, int] | None
) -> dict[str, Tensor]:
    """Adafactor-style second moments of ``grad``, advanced one step.

    ``second`` holds ``v_row`` and ``v_col`` (means of squared gradients over the largest and the
    second-largest axis, ``dims = factored_dims(grad.shape)``, passed in so that compiled callers
    see plain ints) for tensors of 2 or more dims, ``v_diag`` (the full second moment) otherwise;
    each with a leading decay axis.
    """
    squared = grad * grad + FACTORED_EPS
    if dims is None:
        return {"v_diag": ema(second["v_diag"], squared, decays)}
    d1, d0 = dims
    return {
        "v_row": ema(second["v_row"], squared.mean(dim=d0), decays),
        "v_col": ema(second["v_col"], squared.mean(dim=d1), decays),
    }


def factored_preconditioned(grad: Tensor, second: Mapping[str, Tensor], dims: tuple[int, int] | None) -> Tensor:
    """``grad`` preconditioned by the (updated) accumulators of :func:`factored_accumulate`,
    with a leading decay axis."""
    if dims is None:
        return grad.unsqueeze(0) * _safe_rsqrt(second["v_diag"] + 1e-9)
    row_factor, col_factor = row_col_factors(second["v_row"], second["v_col"], dims)
    return grad.unsqueeze(0) * row_factor * col_factor


def factored_slot_shapes(shape: Sequence[int], decays: int) -> dict[str, tuple[int, ...]]:
    """Shapes of :func:`factored_accumulate`'s accumulators for a tensor of ``shape``."""
    dims = factored_dims(shape)
    if dims is None:
        return {"v_diag": (decays, *shape)}
    d1, d0 = dims
    drop = lambda axis: tuple(n for i, n in enumerate(shape) if i != axis)  # noqa: E731
    return {"v_row": (decays, *drop(d0)), "v_col": (decays, *drop(d1))}


class LSTMScheduler(nn.Module):
    """Celo's learned scheduler: progress and loss features -> a step-size multiplier per tensor.

    ``x -> in(x) + relu(mix(x))`` feeds an LSTM cell (Haiku's: gates i, g, f, o from
    ``[input, h] @ gate_weight``, +1 on the forget gate), and ``lr_mult = 0.1 exp(step(h))``.
    The reference takes the max of ``relu(mix(x))`` over tensors; every tensor reads the same
    features there (the clock and the loss), so that max is each row's own value, which is what
    this computes (a tensor's schedule then never depends on which other tensors share the
    call). Parameters start as Haiku's defaults (truncated normal with
    standard deviation ``1/sqrt(fan_in)``, zero biases, zero initial state) for training from
    scratch; ``CeloFamilyRule.load_weights`` sets the published ones.
    """

    def __init__(self, hidden_size: int = 64) -> None:
        super().__init__()
        check_positive("hidden_size", hidden_size, integer=True)
        self.hidden_size = hidden_size
        linear = lambda n_in, n_out: nn.Parameter(truncated_normal(n_in, n_out))  # noqa: E731
        self.mix_weight, self.mix_bias = linear(SCHEDULER_INPUTS, hidden_size), nn.Parameter(torch.zeros(hidden_size))
        self.in_weight, self.in_bias = linear(SCHEDULER_INPUTS, hidden_size), nn.Parameter(torch.zeros(hidden_size))
        self.gate_weight = linear(2 * hidden_size, 4 * hidden_size)
        self.gate_bias = nn.Parameter(torch.zeros(4 * hidden_size))
        self.step_weight, self.step_bias = linear(hidden_size, 1), nn.Parameter(torch.zeros(1))
        self.initial_hidden = nn.Parameter(torch.zeros(1, hidden_size))
        self.initial_cell = nn.Parameter(torch.zeros(1, hidden_size))

    def lstm_input(self, features: Tensor) -> Tensor:
        """The LSTM's input row for the (18,) scheduler features."""
        mix = torch.relu(features @ self.mix_weight + self.mix_bias)
        return features @ self.in_weight + self.in_bias + mix

    def forward(self, features: Tensor, hidden: Tensor, cell: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(lr_mult (n,), new hidden (n, H), new cell (n, H)) for ``n`` tensors' (18,) features and states."""
        x = self.lstm_input(features)
        gates = torch.cat([x, hidden], dim=-1) @ self.gate_weight + self.gate_bias
        i, g, f, o = gates.chunk(4, dim=-1)
        cell = torch.sigmoid(f + 1) * cell + torch.sigmoid(i) * torch.tanh(g)
        hidden = torch.sigmoid(o) * torch.tanh(cell)
        lr_mult = torch.exp((hidden @ self.step_weight + self.step_bias).squeeze(-1)) * 0.1
        return lr_mult, hidden, cell


def truncated_normal(fan_in: int, fan_out: int) -> Tensor:
    std = 1.0 / math.sqrt(fan_in)
    return nn.init.trunc_normal_(torch.empty(fan_in, fan_out), std=std, a=-2 * std, b=2 * std)


def scheduler_features(fraction: Tensor, loss_features: Tensor) -> Tensor:
    """The scheduler's 18 inputs per row: progress embedding, then the row's loss features."""
    progress = fraction_embedding(fraction).expand(*loss_features.shape[:-1], -1)
    return torch.cat([progress, loss_features], dim=-1)


RUN_SLOTS = (HIDDEN, CELL, LOSS_MEANS, LOSS_MIN, LOSS_COUNT)
#: ``'eager'``: plain torch ops (differentiable; what the golden tests check). ``'compiled'``:
#: the per-coordinate work fused by ``torch.compile`` when no autograd graph is recorded.
BACKENDS = ("eager", "compiled")


class CeloFamilyRule(UpdateRule):
    """Base of Celo and Celo-Adam: a per-tensor step scaled by the learned scheduler's ``lr_mult``.

    Budget-aware and loss-reading: ``init(params, num_steps=N)`` sets the run's length and
    ``update(..., loss=L)`` needs the loss at the current parameters (before the update). The
    training fraction is ``state.schedule_step() / num_steps``. The scheduler's state (an LSTM
    row, the loss averages and the number of losses they hold) is tiny and kept per parameter
    name, so the state splits per parameter; like the per-coordinate accumulators, it advances
    only for parameters that have a gradient in the update.

    ``backend`` (see :data:`BACKENDS`) picks how the per-coordinate work runs.

    Computation is in float32 for every parameter dtype (float16, bfloat16, float32, float64):
    the weights were trained in float32 and the accumulators need its range. State is stored in
    float32; the update is cast back to the parameter's dtype.
    """

    budget_aware = True
    reads_loss = True
    #: The published weights, shipped in ``metaoptimizer/pretrained``.
    weights_file = ""

    def __init__(self, lstm_hidden_size: int = 64, backend: str = "eager") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported; accepted values: {BACKENDS}")
        self.lstm_hidden_size = lstm_hidden_size
        self.backend = backend
        self.scheduler = LSTMScheduler(lstm_hidden_size)

    def fused_step(self, *tensors: Tensor) -> bool:
        """Whether a tensor's step over ``tensors`` runs compiled: ``backend='compiled'`` and no
        autograd graph is recorded (``torch.compile`` cannot differentiate twice; meta-training
        stays eager)."""
        return self.backend == "compiled" and not autograd_needed(self, dict(enumerate(tensors)))

    # -- subclass hooks ------------------------------------------------------------------------
    def coordinate_slot_shapes(self, shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """Per-coordinate slot name -> shape for a parameter of ``shape`` (0-d treated as (1,))."""
        raise NotImplementedError

    def tensor_update(
        self, grad: Tensor, param: Tensor, slots: dict[str, Tensor], lr_mult: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Update (float32) and new per-coordinate slots of one tensor, from its clipped float32
        gradient and parameter (0-d as (1,)), its slots, its ``lr_mult`` and the 1-based step."""
        raise NotImplementedError

    # -- contract ------------------------------------------------------------------------------
    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        num_steps = self.resolve_num_steps(num_steps)
        slots: dict[str, dict[str, Tensor]] = {slot: {} for slot in RUN_SLOTS}
        for name, p in params.items():
            # The trained initial LSTM state, one row per tensor; detached, so that a fresh state
            # holds no autograd graph (it can be copied and saved like any other).
            slots[HIDDEN][name] = self.scheduler.initial_hidden.detach()[0].to(p.device, copy=True)
            slots[CELL][name] = self.scheduler.initial_cell.detach()[0].to(p.device, copy=True)
            slots[LOSS_MEANS][name] = torch.zeros(LOSS_BUFFER_SIZE, device=p.device)
            slots[LOSS_MIN][name] = torch.full((LOSS_BUFFER_SIZE,), 999999999999.0, device=p.device)
            slots[LOSS_COUNT][name] = torch.zeros(1, device=p.device)
            for slot, shape in self.coordinate_slot_shapes(_working_shape(p)).items():
                slots.setdefault(slot, {})[name] = torch.zeros(shape, device=p.device)
        return OptimizerState(num_steps=num_steps, slots=slots)

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *, loss=None
    ) -> tuple[Params, OptimizerState]:
        step, state = self.begin_update(grads, state, params, loss)
        loss = scalar_loss(loss)
        for name in grads:
            check_slots(self, state, [name], [*RUN_SLOTS, *self.coordinate_slot_shapes(_working_shape(params[name]))])
        names = list(grads)
        if not names:
            return {}, state.replace(step_count=step)
        schedule = self.schedule(state, loss, names)
        slots = {slot: dict(values) for slot, values in state.slots.items()}
        for i, name in enumerate(names):
            for slot in RUN_SLOTS:
                slots[slot][name] = schedule[slot][i]
        lr_mult = dict(zip(names, schedule["lr_mult"]))
        updates: Params = {}
        for name, grad in grads.items():
            param = params[name]
            own = {slot: v[name] for slot, v in state.slots.items() if slot not in RUN_SLOTS and name in v}
            update, new = self.tensor_update(
                _working(grad).clamp(-GRAD_CLIP, GRAD_CLIP), _working(param), own, lr_mult[name], step
            )
            for slot, value in new.items():
                slots[slot][name] = value
            updates[name] = update.reshape(param.shape).to(param.dtype)
        return updates, state.replace(slots=slots, step_count=step)

    def schedule(self, state: OptimizerState, loss: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        """The scheduler's inputs and outputs for the coming update, without changing ``state``.

        Rows follow ``names``: ``lr_mult`` (n,), the new ``lstm_hidden``/``lstm_cell`` (n, H),
        ``loss_means``/``loss_min`` (n, 10) and ``loss_count`` (n, 1); ``loss_features`` (n, 9) and
        ``features`` (n, 18) are the scheduler's inputs, ``fraction_trained`` the 0-d training fraction.
        """
        row = lambda slot: torch.stack([state.slots[slot][n] for n in names])  # noqa: E731
        hidden = row(HIDDEN)
        device = hidden.device
        count = row(LOSS_COUNT)
        decays = loss_buffer_decays(state.num_steps, device)
        means, minima = update_loss_buffer(row(LOSS_MEANS), row(LOSS_MIN), decays, loss.to(device), count)
        loss_features = loss_buffer_features(means, minima, decays, count + 1)
        fraction = torch.tensor(float(state.schedule_step()), device=device) / torch.tensor(
            float(state.num_steps), device=device
        )
        features = scheduler_features(fraction, loss_features)
        lr_mult, hidden, cell = self.scheduler(features, hidden, row(CELL))
        return {
            "fraction_trained": fraction, "loss_features": loss_features, "features": features, "lr_mult": lr_mult,
            HIDDEN: hidden, CELL: cell, LOSS_MEANS: means, LOSS_MIN: minima, LOSS_COUNT: count + 1,
        }

    # -- weights -------------------------------------------------------------------------------
    def weight_layout(self) -> dict[str, tuple[int, ...]]:
        """npz keys -> shapes of the rule's own weights (beyond the scheduler's)."""
        return {}

    def load_rule_weights(self, arrays: Mapping[str, Tensor]) -> None:
        """Copy the arrays of :meth:`weight_layout` into the rule's parameters."""

    def load_weights(self, path: str | PathLike) -> CeloFamilyRule:
        """Set every meta-parameter from a weights file in the reference's layout (the package's
        ``pretrained/*_theta.npz``, see ``read_theta``); returns the rule."""
        layout = {key: shape for key, (_, shape) in scheduler_layout(self.lstm_hidden_size).items()}
        arrays = read_theta(path, {**layout, **self.weight_layout()}, ignored=UNUSED_SCHEDULER_KEYS)
        load_scheduler(self.scheduler, arrays)
        with torch.no_grad():
            self.load_rule_weights(arrays)
        return self

    @classmethod
    def pretrained(cls, **options) -> CeloFamilyRule:
        """The rule (constructor ``options``) with the authors' published weights (``weights_file``)."""
        return cls(**options).load_weights(resources.files("metaoptimizer.pretrained").joinpath(cls.weights_file))


def scalar_loss(loss) -> Tensor:
    """``loss`` (a number or a one-element floating-point tensor) as a 0-d float32 tensor; a clear
    error when it is missing or not a finite scalar."""
    if loss is None:
        raise ValueError(
            "this rule reads the training loss at every update: pass update(..., loss=L); with the torch "
            "optimizer call optimizer.step(closure) or optimizer.step(loss=loss)"
        )
    if isinstance(loss, Tensor):
        if loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError(
                f"loss must be a scalar floating-point value, got a tensor of shape {tuple(loss.shape)} "
                f"and dtype {loss.dtype}"
            )
        return loss.reshape(()).float()
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        raise ValueError(f"loss must be a finite number or a scalar floating-point tensor, got {loss!r}")
    return as_float32(float(loss))


def _working_shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape) if t.dim() else (1,)


def _working(t: Tensor) -> Tensor:
    """``t`` in float32, 0-d tensors as shape (1,) (the reference's convention)."""
    return t.reshape(_working_shape(t)).float()


def read_theta(
    path: str | PathLike, expected: Mapping[str, tuple[int, ...]], ignored: Sequence[str] = ()
) -> dict[str, Tensor]:
    """The arrays of a weights file (``celo_theta.npz`` layout, see the package README), checked.

    Every key of ``expected`` must be present with that shape; ``ignored`` keys may be present
    (layers of the reference whose output never reaches the update); any other key means a
    foreign file. Errors name the file and the offending keys.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"cannot read Celo weights from {path}: not a readable .npz file ({error})") from error
    missing = sorted(set(expected) - set(arrays))
    unknown = sorted(set(arrays) - set(expected) - set(ignored))
    if missing or unknown:
        raise ValueError(
            f"{path} is not a weights file for this rule: missing keys {missing}, unexpected keys {unknown}"
        )
    for key, shape in expected.items():
        array = arrays[key]
        if array.shape != tuple(shape) or array.dtype.kind != "f":
            raise ValueError(
                f"{path}: {key!r} has shape {array.shape} and dtype {array.dtype}; expected shape {tuple(shape)} floats"
            )
    return {key: torch.from_numpy(np.asarray(arrays[key], dtype=np.float32)) for key in expected}


#: npz keys of the scheduler -> (attribute of :class:`LSTMScheduler`, stored shape).
def scheduler_layout(hidden_size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    h = hidden_size
    return {
        "lstm_init_state/hidden": ("initial_hidden", (1, h)),
        "lstm_init_state/cell": ("initial_cell", (1, h)),
        "rnn_params/linear_1/w": ("mix_weight", (SCHEDULER_INPUTS, h)),
        "rnn_params/linear_1/b": ("mix_bias", (h,)),
        "rnn_params/linear_2/w": ("in_weight", (SCHEDULER_INPUTS, h)),
        "rnn_params/linear_2/b": ("in_bias", (h,)),
        "rnn_params/rnn/linear/w": ("gate_weight", (2 * h, 4 * h)),
        "rnn_params/rnn/linear/b": ("gate_bias", (4 * h,)),
        "rnn_params/step_size/w": ("step_weight", (h, 1)),
        "rnn_params/step_size/b": ("step_bias", (1,)),
    }


#: Reference layers whose output is discarded: the first mix layer (overwritten in
#: ``_rnn_forward``) and Celo's controls (a softmax over one entry, always 1).
UNUSED_SCHEDULER_KEYS = (
    "rnn_params/linear/w", "rnn_params/linear/b", "rnn_params/rnn_to_controls/w", "rnn_params/rnn_to_controls/b",
)


def load_scheduler(scheduler: LSTMScheduler, arrays: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for key, (attribute, _) in scheduler_layout(scheduler.hidden_size).items():
            getattr(scheduler, attribute).copy_(arrays[key])
