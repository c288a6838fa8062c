"""Coordinatewise LSTM optimizer (Andrychowicz et al. 2016, "Learning to learn by gradient descent
by gradient descent").

One small LSTM, shared by every coordinate of every parameter, reads that coordinate's
(preprocessed) gradient and emits its update. Each coordinate has its own hidden and cell state,
so the rule works on parameters of any shape. The cell is written as plain matmuls so that it
supports double backward and ``torch.func`` transforms (``nn.LSTM`` supports neither).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from metaoptimizer.config import PREPROCESSING, OptimizerState, check_positive
from metaoptimizer.rules.base import Params, UpdateRule, check_unit_interval, check_update_call
from metaoptimizer.schedules import CosineDecay, LearnedSchedule, warmup_cosine

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def log_sign_preprocess(grad: Tensor, p: float) -> Tensor:
    """Andrychowicz et al.'s gradient preprocessing: (log|g|/p, sign g) for |g| >= e^-p, else (-1, e^p g).

    Returns a tensor of shape ``grad.shape + (2,)``. The log is taken of a clamped magnitude so that
    the unused branch never produces ``-inf`` (which would poison gradients through ``where``).
    """
    threshold = math.exp(-p)
    magnitude = grad.abs()
    large = magnitude >= threshold
    log_part = torch.where(large, torch.log(magnitude.clamp_min(threshold)) / p, torch.full_like(grad, -1.0))
    sign_part = torch.where(large, torch.sign(grad), grad * math.exp(p))
    return torch.stack([log_part, sign_part], dim=-1)


class LSTMRule(UpdateRule):
    """Coordinatewise LSTM update rule.

    Inputs per coordinate: the preprocessed gradient (``'log_sign'``: 2 features, ``'none'``: the raw
    gradient) and, with ``preconditioning``, the gradient divided by its running RMS (an
    Adam/RMSProp-like normalised direction the LSTM can learn to use); with ``momentum_decay > 0``
    also the bias-corrected momentum divided by the same RMS (Adam's direction). The top layer's
    hidden state goes through a linear head, plus a learned linear skip path from the inputs; the
    update is ``output_scale`` times the sum. ``init_lr > 0`` initialises the skip path so that the
    untrained rule already descends (Adam-like with momentum, RMSProp-like with only
    ``preconditioning``, sign descent without) and meta-training learns a correction;
    ``init_lr=0`` is the paper's pure LSTM.

    ``horizon`` makes the rule budget-aware: the LSTM also reads the fraction of training done,
    and the whole update is multiplied by a :class:`~metaoptimizer.schedules.LearnedSchedule` of
    that fraction with ``schedule_knots`` knots, initialised as linear warmup over
    ``warmup_fraction`` of the run then cosine decay (floored at 1%). :meth:`set_horizon` stretches
    it over another budget, as one would a cosine schedule.

    ``chunk_size`` processes a tensor's coordinates in chunks of that many, bounding the size of
    temporaries on large models. ``state_dtype`` stores hidden/cell state in a narrower type
    (``'bfloat16'`` halves state memory); computation stays in the parameters' dtype.
    """

    name = "lstm"

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        preprocessing: str = "log_sign",
        preprocess_p: float = 10.0,
        output_scale: float = 0.1,
        preconditioning: bool = True,
        rms_decay: float = 0.95,
        forget_bias: float = 1.0,
        chunk_size: int | None = None,
        state_dtype: str | None = None,
        init_lr: float = 0.0,
        momentum_decay: float = 0.0,
        horizon: int | None = None,
        schedule_knots: int = 20,
        warmup_fraction: float = 0.05,
    ) -> None:
        super().__init__()
        check_positive("hidden_size", hidden_size, integer=True)
        check_positive("num_layers", num_layers, integer=True)
        check_positive("preprocess_p", preprocess_p)
        check_positive("output_scale", output_scale)
        check_unit_interval("rms_decay", rms_decay, closed_low=False)
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing={preprocessing!r} is not supported; accepted values: {PREPROCESSING}")
        if chunk_size is not None:
            check_positive("chunk_size", chunk_size, integer=True)
        check_positive("init_lr", init_lr, allow_zero=True)
        check_unit_interval("momentum_decay", momentum_decay)
        if momentum_decay > 0 and not preconditioning:
            raise ValueError("momentum_decay > 0 needs preconditioning=True (momentum is divided by the running RMS)")
        if horizon is not None:
            check_positive("horizon", horizon, integer=True)
        check_positive("schedule_knots", schedule_knots, integer=True)
        check_unit_interval("warmup_fraction", warmup_fraction)
        if state_dtype is not None and state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype={state_dtype!r} is not supported; accepted values: {sorted(STATE_DTYPES)}")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.preprocessing = preprocessing
        self.preprocess_p = float(preprocess_p)
        self.output_scale = float(output_scale)
        self.preconditioning = preconditioning
        self.rms_decay = float(rms_decay)
        self.forget_bias = float(forget_bias)
        self.chunk_size = chunk_size
        self.state_dtype = state_dtype
        self.init_lr = float(init_lr)
        self.momentum_decay = float(momentum_decay)
        self.horizon = horizon
        self.schedule_knots = schedule_knots
        self.warmup_fraction = float(warmup_fraction)

        # Direction features feed the cells and the skip path; the training fraction only the cells.
        direction_size = (2 if preprocessing == "log_sign" else 1) + int(preconditioning) + int(momentum_decay > 0)
        input_size = direction_size + int(horizon is not None)
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.input_weights = nn.ParameterList(nn.Parameter(torch.empty(n, 4 * hidden_size)) for n in sizes)
        self.hidden_weights = nn.ParameterList(
            nn.Parameter(torch.empty(hidden_size, 4 * hidden_size)) for _ in range(num_layers)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(4 * hidden_size)) for _ in range(num_layers))
        self.head = nn.Linear(hidden_size, 1)
        self.skip = nn.Parameter(torch.zeros(direction_size))
        self.schedule = LearnedSchedule(horizon, schedule_knots) if horizon is not None else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) weights, forget-gate bias ``forget_bias``, a small head."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for w in [*self.input_weights, *self.hidden_weights]:
                w.uniform_(-bound, bound)
            for b in self.biases:
                b.zero_()
                b[self.hidden_size : 2 * self.hidden_size] = self.forget_bias
            self.head.weight.uniform_(-0.1 * bound, 0.1 * bound)
            self.head.bias.zero_()
            # The skip path starts the rule as a simple baseline: Adam-like with momentum,
            # RMSProp-like with preconditioning, sign descent without, each with step size
            # ``init_lr`` (the last direction feature); 0 gives the paper's pure LSTM.
            self.skip.zero_()
            self.skip[-1] = -self.init_lr / self.output_scale
            if self.schedule is not None:
                warmup = round(self.warmup_fraction * self.horizon)
                # horizon + 1 keeps warmup shorter than the run for any warmup_fraction < 1; the
                # value at the horizon is floored at 1% below either way.
                prior = warmup_cosine(warmup, self.horizon + 1) if warmup else CosineDecay(self.horizon)
                knots = torch.linspace(0, self.horizon, self.schedule_knots + 1)
                factors = torch.tensor([prior(round(float(k))) for k in knots]).clamp_min(0.01)
                self.schedule.log_knots.copy_(factors.log())

    def hyperparameters(self) -> dict[str, object]:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "preprocessing": self.preprocessing,
            "preprocess_p": self.preprocess_p,
            "output_scale": self.output_scale,
            "preconditioning": self.preconditioning,
            "rms_decay": self.rms_decay,
            "forget_bias": self.forget_bias,
            "chunk_size": self.chunk_size,
            "state_dtype": self.state_dtype,
            "init_lr": self.init_lr,
            "momentum_decay": self.momentum_decay,
            "horizon": self.horizon,
            "schedule_knots": self.schedule_knots,
            "warmup_fraction": self.warmup_fraction,
        }

    def set_horizon(self, steps: int) -> None:
        """Stretch the learned schedule over ``steps`` updates (no-op without a horizon)."""
        check_positive("steps", steps, integer=True)
        if self.schedule is not None:
            self.horizon = steps
            self.schedule.total_steps = steps

    def _stored_dtype(self, param: Tensor) -> torch.dtype:
        return STATE_DTYPES[self.state_dtype] if self.state_dtype else param.dtype

    def init(self, params: Mapping[str, Tensor]) -> OptimizerState:
        shape = lambda p: (self.num_layers, p.numel(), self.hidden_size)  # noqa: E731
        hidden = {n: torch.zeros(shape(p), dtype=self._stored_dtype(p), device=p.device) for n, p in params.items()}
        cell = {n: torch.zeros(shape(p), dtype=self._stored_dtype(p), device=p.device) for n, p in params.items()}
        slots = {slot: {n: torch.zeros_like(p) for n, p in params.items()} for slot in self._slot_names()}
        return OptimizerState(hidden=hidden, cell=cell, slots=slots)

    def _slot_names(self) -> tuple[str, ...]:
        return ("rms",) * self.preconditioning + ("momentum",) * (self.momentum_decay > 0)

    def _features(self, grad: Tensor, rms: Tensor | None, momentum: Tensor | None, step: int) -> Tensor:
        """Per-coordinate direction inputs, shape (numel, direction features)."""
        flat = grad.reshape(-1)
        if self.preprocessing == "log_sign":
            parts = [log_sign_preprocess(flat, self.preprocess_p)]
        else:
            parts = [flat.unsqueeze(-1)]
        if rms is not None:
            scale = torch.rsqrt(rms.reshape(-1) / (1.0 - self.rms_decay**step) + 1e-8)
            parts.append((flat * scale).unsqueeze(-1))
            if momentum is not None:
                corrected = momentum.reshape(-1) / (1.0 - self.momentum_decay**step)
                parts.append((corrected * scale).unsqueeze(-1))
        return torch.cat(parts, dim=-1)

    def _cells(
        self, directions: Tensor, hidden: Tensor, cell: Tensor, progress: float | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the stacked cells on a batch of coordinates; returns (output, new hidden, new cell)."""
        x = directions
        if progress is not None:
            x = torch.cat([directions, directions.new_full((directions.shape[0], 1), progress)], dim=-1)
        new_h, new_c = [], []
        for layer in range(self.num_layers):
            gates = x @ self.input_weights[layer] + hidden[layer] @ self.hidden_weights[layer] + self.biases[layer]
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * cell[layer] + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            new_h.append(h)
            new_c.append(c)
            x = h
        return self.head(x).squeeze(-1) + directions @ self.skip, torch.stack(new_h), torch.stack(new_c)

    def _run_chunks(
        self, features: Tensor, hidden: Tensor, cell: Tensor, progress: float | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The cells over all coordinates of one tensor, ``chunk_size`` at a time; returns (new
        hidden, new cell, output). Chunks are cast to the compute dtype one at a time and written
        into preallocated results in the stored dtype, so temporaries stay chunk-sized."""
        size = self.chunk_size or features.shape[0]
        if size >= features.shape[0]:
            out, h, c = self._cells(features, hidden.to(features.dtype), cell.to(features.dtype), progress)
            return h.to(hidden.dtype), c.to(cell.dtype), out
        new_hidden, new_cell = torch.empty_like(hidden), torch.empty_like(cell)
        out = features.new_empty(features.shape[0])
        for start in range(0, features.shape[0], size):
            end = start + size
            chunk_out, h, c = self._cells(
                features[start:end], hidden[:, start:end].to(features.dtype), cell[:, start:end].to(features.dtype),
                progress,
            )
            new_hidden[:, start:end] = h
            new_cell[:, start:end] = c
            out[start:end] = chunk_out
        return new_hidden, new_cell, out

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], step: int
    ) -> tuple[Params, OptimizerState]:
        check_update_call(grads, params, step)
        missing = [name for name in grads if name not in state.hidden]
        if missing:
            raise ValueError(f"state has no LSTM state for {missing}; build the state with init(params)")
        updates: Params = {}
        hidden, cell = dict(state.hidden), dict(state.cell)
        slots = {slot: dict(state.slots[slot]) for slot in self._slot_names()}
        progress = None if self.horizon is None else min((step - 1) / self.horizon, 1.0)
        scale = self.output_scale if self.schedule is None else self.output_scale * self.schedule(step - 1)
        for name, grad in grads.items():
            rms = momentum = None
            if self.preconditioning:
                rms = self.rms_decay * slots["rms"][name] + (1.0 - self.rms_decay) * grad * grad
                slots["rms"][name] = rms
            if self.momentum_decay > 0:
                momentum = self.momentum_decay * slots["momentum"][name] + (1.0 - self.momentum_decay) * grad
                slots["momentum"][name] = momentum
            features = self._features(grad, rms, momentum, step)
            hidden[name], cell[name], out = self._run_chunks(features, state.hidden[name], state.cell[name], progress)
            updates[name] = (scale * out).reshape(grad.shape)
        return updates, state.replace(hidden=hidden, cell=cell, slots={**state.slots, **slots}, step_count=step)
