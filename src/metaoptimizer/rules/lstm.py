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
from typing import Any

import torch
from torch import Tensor, nn

from metaoptimizer._validation import check_choice, check_flag, check_positive, check_unit_interval
from metaoptimizer.rules._celo_common import (
    LOSS_BUFFER_SIZE, LOSS_COUNT, LOSS_MEANS, LOSS_MIN, loss_buffer_decays, loss_buffer_features, scalar_loss,
    update_loss_buffer,
)
from metaoptimizer.rules.base import Params, UpdateRule, check_slots, compute_dtype
from metaoptimizer.rules.combine import NamedChain, named_chain
from metaoptimizer.rules.fused import compiled
from metaoptimizer.rules.mlp import COMPILE_MIN_NUMEL, autograd_needed, check_deployment_call
from metaoptimizer.rules.state import OptimizerState
from metaoptimizer.rules.transforms import scale_by_schedule
from metaoptimizer.schedules import LearnedSchedule

#: ``'log_sign'``: Andrychowicz et al.'s (log|g|/p, sign g); ``'none'``: the raw gradient;
#: ``'tensor_rms'``: the gradient over its root mean square across the tensor (as Celo normalises
#: its features), which does not change when the gradient is rescaled.
PREPROCESSING = ("log_sign", "none", "tensor_rms")
#: ``relative_step``: the update is multiplied by ``sqrt(mean(param**2) + PARAM_SCALE_FLOOR**2)``
#: of its tensor (Celo's parameter-relative step); the floor keeps an all-zero tensor moving.
PARAM_SCALE_FLOOR = 1e-6
#: Added to the mean square of a gradient before ``'tensor_rms'`` divides by its root.
GRAD_SCALE_EPS = 1e-16
#: The loss slots of ``loss_features`` (Celo's loss buffer), kept per parameter tensor.
LOSS_SLOTS = (LOSS_MEANS, LOSS_MIN, LOSS_COUNT)
#: Loss features the cells read with ``loss_features`` (one per adjacent pair of loss averages).
NUM_LOSS_FEATURES = LOSS_BUFFER_SIZE - 1
#: ``'auto'``: the cells of large tensors (at least :data:`~metaoptimizer.rules.mlp.COMPILE_MIN_NUMEL`
#: coordinates) through ``torch.compile`` when no autograd graph is recorded, eager otherwise;
#: ``'eager'``: always eager.
BACKENDS = ("auto", "eager")
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
#: Coordinates per chunk when ``chunk_size`` is None, on the CPU and on accelerators: temporaries
#: stay near ``chunk * (6 * hidden_size + inputs)`` floats (8 MB on the CPU, where chunks should
#: fit the caches; 130 MB on a GPU, where fewer, larger chunks save kernel launches) at any size.
DEFAULT_CHUNK_SIZE = 1 << 14
ACCELERATOR_CHUNK_SIZE = 1 << 18




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

    ``training_fraction`` makes the rule budget-aware: the cells also read the fraction of the
    run done, ``state.schedule_step() / state.num_steps`` (capped at 1). :func:`budget_aware_lstm`
    pairs such an LSTM with a learned schedule.

    Inputs to find a task's step scale (issue 16 item 5), as Celo has them: ``relative_step``
    multiplies every update by its tensor's parameter root mean square (see
    :data:`PARAM_SCALE_FLOOR`), so with ``preprocessing='tensor_rms'`` and ``preconditioning``
    rescaling a tensor's parameters by ``c`` and its gradients by any factor rescales its update by
    ``c`` (up to the epsilons); ``init_lr`` is then a step relative to the parameters' size.
    ``loss_features`` makes the cells read Celo's 9 loss-trend features (where each short
    average of the loss sits between its running minimum and the next longer average, in
    [-1, 1]; unchanged when the loss is multiplied by a constant; :func:`~metaoptimizer.rules._celo_common.
    loss_buffer_features`); the rule then reads the loss at every update and needs the budget
    (the averages' half-lives span 10 steps to the run).

    ``chunk_size`` processes a tensor's coordinates in chunks of that many (None:
    :data:`DEFAULT_CHUNK_SIZE`, :data:`ACCELERATOR_CHUNK_SIZE` off the CPU), bounding the size of
    temporaries at any model size.
    ``state_dtype`` stores hidden/cell state in a narrower type (``'bfloat16'`` halves state
    memory). Arithmetic runs in float32 (float64 for float64 parameters, see
    :func:`compute_dtype`); updates come back in the parameters' dtype. ``backend``
    (:data:`BACKENDS`) picks eager or compiled cells; both give the same numbers up to rounding.
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
        training_fraction: bool = False,
        backend: str = "auto",
        relative_step: bool = False,
        loss_features: bool = False,
    ) -> None:
        super().__init__()
        check_positive("hidden_size", hidden_size, integer=True)
        check_positive("num_layers", num_layers, integer=True)
        check_positive("preprocess_p", preprocess_p)
        check_positive("output_scale", output_scale)
        check_unit_interval("rms_decay", rms_decay, closed_low=False)
        check_choice("preprocessing", preprocessing, PREPROCESSING)
        check_choice("backend", backend, BACKENDS)
        check_flag("preconditioning", preconditioning)
        check_flag("training_fraction", training_fraction)
        check_flag("relative_step", relative_step)
        check_flag("loss_features", loss_features)
        if chunk_size is not None:
            check_positive("chunk_size", chunk_size, integer=True)
        check_positive("init_lr", init_lr, allow_zero=True)
        check_unit_interval("momentum_decay", momentum_decay)
        if momentum_decay > 0 and not preconditioning:
            raise ValueError("momentum_decay > 0 needs preconditioning=True (momentum is divided by the running RMS)")
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
        self.training_fraction = training_fraction
        self.relative_step = relative_step
        self.loss_features = loss_features
        self.budget_aware = training_fraction or loss_features
        self.reads_loss = loss_features
        self.backend = backend

        # Direction features feed the cells and the skip path; the run's context (training
        # fraction, loss features) only the cells.
        direction_size = (2 if preprocessing == "log_sign" else 1) + int(preconditioning) + int(momentum_decay > 0)
        input_size = direction_size + int(training_fraction) + NUM_LOSS_FEATURES * int(loss_features)
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.input_weights = nn.ParameterList(nn.Parameter(torch.empty(n, 4 * hidden_size)) for n in sizes)
        self.hidden_weights = nn.ParameterList(
            nn.Parameter(torch.empty(hidden_size, 4 * hidden_size)) for _ in range(num_layers)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(4 * hidden_size)) for _ in range(num_layers))
        self.head = nn.Linear(hidden_size, 1)
        self.skip = nn.Parameter(torch.zeros(direction_size))
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

    def _stored_dtype(self, param: Tensor) -> torch.dtype:
        return STATE_DTYPES[self.state_dtype] if self.state_dtype else param.dtype

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        def zeros(p: Tensor) -> Tensor:
            return torch.zeros((self.num_layers, p.numel(), self.hidden_size), dtype=self._stored_dtype(p), device=p.device)

        slots = {"hidden": {n: zeros(p) for n, p in params.items()}, "cell": {n: zeros(p) for n, p in params.items()}}
        slots.update({slot: {n: torch.zeros_like(p) for n, p in params.items()} for slot in self._accumulator_names()})
        if self.loss_features:  # Celo's loss buffer, one small copy per tensor so the state splits per parameter
            slots[LOSS_MEANS] = {n: torch.zeros(LOSS_BUFFER_SIZE, device=p.device) for n, p in params.items()}
            slots[LOSS_MIN] = {n: torch.full((LOSS_BUFFER_SIZE,), 1e12, device=p.device) for n, p in params.items()}
            slots[LOSS_COUNT] = {n: torch.zeros(1, device=p.device) for n, p in params.items()}
        return OptimizerState(num_steps=self.resolve_num_steps(num_steps), slots=slots)

    def _accumulator_names(self) -> tuple[str, ...]:
        return ("rms",) * self.preconditioning + ("momentum",) * (self.momentum_decay > 0)

    def _slot_names(self) -> tuple[str, ...]:
        return ("hidden", "cell", *self._accumulator_names(), *LOSS_SLOTS * self.loss_features)

    def _features(
        self, grad: Tensor, rms: Tensor | None, momentum: Tensor | None, step: int, grad_scale: Tensor | None = None
    ) -> Tensor:
        """Per-coordinate direction inputs of flat tensors, shape (coordinates, direction features);
        ``grad_scale`` is the inverse root mean square of the whole tensor's gradient (``'tensor_rms'``)."""
        if self.preprocessing == "log_sign":
            parts = [log_sign_preprocess(grad, self.preprocess_p)]
        else:
            parts = [(grad if grad_scale is None else grad * grad_scale)[:, None]]
        if rms is not None:
            scale = torch.rsqrt(rms / (1.0 - self.rms_decay**step) + 1e-8)
            parts.append((grad * scale)[:, None])
            if momentum is not None:
                parts.append((momentum / (1.0 - self.momentum_decay**step) * scale)[:, None])
        return torch.cat(parts, dim=-1)

    def _weights(self, dtype: torch.dtype) -> dict[str, Any]:
        """The meta-parameters in the compute dtype, cast once per update (differentiable).

        Each layer's input and hidden weights are stacked into one ``(inputs + H, 4H)`` matrix, so
        a layer is one matrix product over ``[x, h]``, with the gate columns reordered to
        (input, forget, output | cell): the three sigmoid gates are one contiguous block.
        """
        H = self.hidden_size
        order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
        cast = lambda t: t.to(dtype)  # noqa: E731
        return {
            "layers": [
                (cast(torch.cat([w_x, w_h])[:, order]), cast(b[order]))
                for w_x, w_h, b in zip(self.input_weights, self.hidden_weights, self.biases, strict=True)
            ],
            "head_weight": cast(self.head.weight.reshape(-1)),
            "head_bias": cast(self.head.bias),
            "skip": cast(self.skip),
        }

    def _cells(
        self, directions: Tensor, hidden: Tensor, cell: Tensor, context: Tensor | None, weights: dict[str, Any]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The stacked cells on a batch of coordinates, out of place: (output, new hidden, new cell),
        the states of shape (layers, batch, H) in the compute dtype. ``context`` (the run's inputs
        shared by every coordinate: training fraction, loss features) is None or a 1-D tensor.
        One ``addmm`` per layer over ``[x, h]`` and the stacked weights, one sigmoid over the three
        sigmoid gates."""
        H, dtype = self.hidden_size, directions.dtype
        x = directions
        if context is not None:
            x = torch.cat([directions, context.to(dtype).expand(directions.shape[0], -1)], dim=-1)
        new_h, new_c = [], []
        for layer, (weight, bias) in enumerate(weights["layers"]):
            gates = torch.addmm(bias, torch.cat([x, hidden[layer].to(dtype)], dim=-1), weight)
            sigmoids, candidate = gates[:, : 3 * H].sigmoid(), gates[:, 3 * H :].tanh()  # see _weights
            c = torch.addcmul(sigmoids[:, H : 2 * H] * cell[layer].to(dtype), sigmoids[:, :H], candidate)
            x = sigmoids[:, 2 * H :] * torch.tanh(c)
            new_h.append(x)
            new_c.append(c)
        out = torch.addmv(weights["head_bias"], x, weights["head_weight"]) + directions @ weights["skip"]
        return out, torch.stack(new_h), torch.stack(new_c)

    def _cells_into(
        self, directions: Tensor, hidden: Tensor, cell: Tensor, new_hidden: Tensor, new_cell: Tensor,
        context: Tensor | None, weights: dict[str, Any],
    ) -> Tensor:
        """:meth:`_cells` writing the new state into ``new_hidden`` / ``new_cell`` (any dtype; they
        may be ``hidden`` / ``cell`` themselves: every read comes first); returns the output."""
        out, h, c = self._cells(directions, hidden, cell, context, weights)
        new_hidden.copy_(h)
        new_cell.copy_(c)
        return out

    def _chunk_size(self, numel: int, device: torch.device = torch.device("cpu")) -> int:
        default = DEFAULT_CHUNK_SIZE if device.type == "cpu" else ACCELERATOR_CHUNK_SIZE
        return min(numel, self.chunk_size or default)

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
        and writes the new hidden/cell state and accumulators into ``state``'s tensors (the
        returned state shares them; the caller gives up the old one). No full-size temporary:
        every chunk's state is overwritten where it lies. The same numbers as ``update`` then
        ``params + lr * updates`` (tests pin it)."""
        check_deployment_call(self, grads, params)
        _, state = self._step(grads, state, params, loss, lr=lr)
        return state

    def _step(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor],
        loss: Tensor | float | None, lr: float | None,
    ) -> tuple[Params, OptimizerState]:
        """``update`` (``lr`` None: new state tensors) or ``update_in_place`` (``lr`` its factor)."""
        step, state = self.begin_update(grads, state, params, loss)
        check_slots(self, state, grads, self._slot_names())
        slots = {slot: dict(state.slots[slot]) for slot in self._slot_names()}
        if self.budget_aware and state.num_steps is None:
            raise ValueError(
                "this LSTM reads the training fraction or the loss trend: build its state with init(params, num_steps=N)"
            )
        fraction = [min(state.schedule_step() / state.num_steps, 1.0)] if self.training_fraction else []
        if self.loss_features:
            loss = scalar_loss(loss)
        weights: dict[torch.dtype, dict[str, Any]] = {}
        updates: Params = {}
        for name, grad in grads.items():
            dtype = compute_dtype(grad.dtype)
            if dtype not in weights:
                weights[dtype] = self._weights(dtype)
            g = grad.reshape(-1).to(dtype)
            accumulators = {}
            if self.preconditioning:
                old = slots["rms"][name].reshape(-1).to(dtype)
                accumulators["rms"] = self.rms_decay * old + (1.0 - self.rms_decay) * g * g
            if self.momentum_decay > 0:
                old = slots["momentum"][name].reshape(-1).to(dtype)
                accumulators["momentum"] = self.momentum_decay * old + (1.0 - self.momentum_decay) * g
            rms, momentum = accumulators.get("rms"), accumulators.get("momentum")
            context, loss_slots = self._context(fraction, state, name, loss, dtype)
            accumulators.update(loss_slots)
            grad_scale = torch.rsqrt(g.square().mean() + GRAD_SCALE_EPS) if self.preprocessing == "tensor_rms" else None
            param_scale = (
                torch.sqrt(params[name].to(dtype).square().mean() + PARAM_SCALE_FLOOR**2) if self.relative_step else None
            )
            hidden, cell = state.slots["hidden"][name], state.slots["cell"][name]
            size = self._chunk_size(g.shape[0], g.device)
            chunks = (  # a generator: one chunk's features at a time
                (start, start + size, self._features(
                    g[start : start + size], None if rms is None else rms[start : start + size],
                    None if momentum is None else momentum[start : start + size], step, grad_scale,
                ))
                for start in range(0, g.shape[0], size)
            )
            fast = self.backend == "auto" and g.shape[0] >= COMPILE_MIN_NUMEL and not autograd_needed(self, grads, params)
            if lr is None and not fast:  # out of place, what autograd and vmap need
                results = [
                    self._cells(x, hidden[:, a:b], cell[:, a:b], context, weights[dtype]) for a, b, x in chunks
                ]
                out, new_hidden, new_cell = (
                    parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)
                    for parts, axis in zip(zip(*results), (0, 1, 1), strict=True)
                )
                new_hidden, new_cell = new_hidden.to(hidden.dtype), new_cell.to(cell.dtype)
            else:  # chunks written where they lie: in place, or into one new tensor per slot
                cells = compiled(type(self)._cells_into) if fast else type(self)._cells_into
                new_hidden, new_cell = (hidden, cell) if lr is not None else (torch.empty_like(hidden), torch.empty_like(cell))
                out = g.new_empty(g.shape[0])
                for a, b, x in chunks:
                    out[a:b] = cells(
                        self, x, hidden[:, a:b], cell[:, a:b], new_hidden[:, a:b], new_cell[:, a:b], context, weights[dtype]
                    )
            slots["hidden"][name], slots["cell"][name] = new_hidden, new_cell
            step_size = self.output_scale if param_scale is None else self.output_scale * param_scale
            update = (step_size * out).reshape(grad.shape).to(grad.dtype)
            for slot, value in accumulators.items():
                stored = state.slots[slot][name]
                if lr is not None:
                    stored.copy_(value.reshape(stored.shape))
                else:
                    slots[slot][name] = value.reshape(stored.shape).to(stored.dtype)
            if lr is not None:
                params[name].add_(update, alpha=lr)
            else:
                updates[name] = update
        return updates, state.replace(slots={**state.slots, **slots}, step_count=step)

    def _context(
        self, fraction: list[float], state: OptimizerState, name: str, loss: Tensor | None, dtype: torch.dtype
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The run-level inputs of tensor ``name``'s cells (training fraction, then the loss
        features; None when the rule reads neither) and its advanced loss slots."""
        parts = [torch.tensor(fraction, dtype=dtype, device=state.slots["hidden"][name].device)] if fraction else []
        loss_slots: dict[str, Tensor] = {}
        if self.loss_features:
            means, minima, count = (state.slots[slot][name] for slot in LOSS_SLOTS)
            decays = loss_buffer_decays(state.num_steps, means.device)
            means, minima = update_loss_buffer(means, minima, decays, loss.to(means.device), count)
            loss_slots = {LOSS_MEANS: means, LOSS_MIN: minima, LOSS_COUNT: count + 1}
            parts.append(loss_buffer_features(means, minima, decays, count + 1).to(dtype))
        return (torch.cat(parts) if parts else None), loss_slots


def budget_aware_lstm(
    num_steps: int, *, schedule_knots: int = 20, warmup_fraction: float = 0.05, **lstm_options: Any
) -> NamedChain:
    """``named_chain(lstm=..., schedule=...)``: an LSTM that reads the training fraction, its updates
    scaled by a :class:`~metaoptimizer.schedules.LearnedSchedule` of ``schedule_knots`` knots laid
    over ``num_steps`` (the default budget) and initialised as linear warmup over
    ``warmup_fraction`` of the run then cosine decay, floored at 1%."""
    check_positive("num_steps", num_steps, integer=True)
    check_positive("schedule_knots", schedule_knots, integer=True)
    schedule = LearnedSchedule(num_steps, schedule_knots, warmup_fraction=warmup_fraction)
    return named_chain(lstm=LSTMRule(training_fraction=True, **lstm_options), schedule=scale_by_schedule(schedule))
