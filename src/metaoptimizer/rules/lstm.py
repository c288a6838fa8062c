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
from metaoptimizer.rules.base import Params, UpdateRule, check_unit_interval

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
    Adam/RMSProp-like normalised direction the LSTM can learn to use). The top layer's hidden state
    goes through a linear head, plus a learned linear skip path from the inputs; the update is
    ``output_scale`` times the sum. ``init_lr > 0`` initialises the skip path so that the untrained
    rule already descends (RMSProp-like with ``preconditioning``, sign descent without) and
    meta-training learns a correction; ``init_lr=0`` is the paper's pure LSTM.

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

        input_size = (2 if preprocessing == "log_sign" else 1) + (1 if preconditioning else 0)
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.input_weights = nn.ParameterList(nn.Parameter(torch.empty(n, 4 * hidden_size)) for n in sizes)
        self.hidden_weights = nn.ParameterList(
            nn.Parameter(torch.empty(hidden_size, 4 * hidden_size)) for _ in range(num_layers)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(4 * hidden_size)) for _ in range(num_layers))
        self.head = nn.Linear(hidden_size, 1)
        self.skip = nn.Parameter(torch.zeros(input_size))
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
            # The skip path starts the rule as a simple baseline: RMSProp-like with preconditioning,
            # sign descent without, each with step size ``init_lr``; 0 gives the paper's pure LSTM.
            self.skip.zero_()
            self.skip[-1] = -self.init_lr / self.output_scale

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
        }

    def _stored_dtype(self, param: Tensor) -> torch.dtype:
        return STATE_DTYPES[self.state_dtype] if self.state_dtype else param.dtype

    def init(self, params: Mapping[str, Tensor]) -> OptimizerState:
        shape = lambda p: (self.num_layers, p.numel(), self.hidden_size)  # noqa: E731
        hidden = {n: torch.zeros(shape(p), dtype=self._stored_dtype(p), device=p.device) for n, p in params.items()}
        cell = {n: torch.zeros(shape(p), dtype=self._stored_dtype(p), device=p.device) for n, p in params.items()}
        slots = {"rms": {n: torch.zeros_like(p) for n, p in params.items()}} if self.preconditioning else {}
        return OptimizerState(hidden=hidden, cell=cell, slots=slots)

    def _features(self, grad: Tensor, rms: Tensor | None, step: int) -> Tensor:
        """Per-coordinate inputs, shape (numel, input_size)."""
        flat = grad.reshape(-1)
        if self.preprocessing == "log_sign":
            parts = [log_sign_preprocess(flat, self.preprocess_p)]
        else:
            parts = [flat.unsqueeze(-1)]
        if rms is not None:
            corrected = rms.reshape(-1) / (1.0 - self.rms_decay**step)
            parts.append((flat / torch.sqrt(corrected + 1e-8)).unsqueeze(-1))
        return torch.cat(parts, dim=-1)

    def _cells(self, x: Tensor, hidden: Tensor, cell: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run the stacked cells on a batch of coordinates; returns (output, new hidden, new cell)."""
        inputs = x
        new_h, new_c = [], []
        for layer in range(self.num_layers):
            gates = x @ self.input_weights[layer] + hidden[layer] @ self.hidden_weights[layer] + self.biases[layer]
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * cell[layer] + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            new_h.append(h)
            new_c.append(c)
            x = h
        return self.head(x).squeeze(-1) + inputs @ self.skip, torch.stack(new_h), torch.stack(new_c)

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], step: int
    ) -> tuple[Params, OptimizerState]:
        updates: Params = {}
        hidden, cell = dict(state.hidden), dict(state.cell)
        rms_slot = dict(state.slots.get("rms", {}))
        for name, grad in grads.items():
            rms = None
            if self.preconditioning:
                rms = self.rms_decay * rms_slot[name] + (1.0 - self.rms_decay) * grad * grad
                rms_slot[name] = rms
            features = self._features(grad, rms, step)
            h0 = state.hidden[name].to(grad.dtype)
            c0 = state.cell[name].to(grad.dtype)
            size = self.chunk_size or features.shape[0]
            outs, hs, cs = [], [], []
            for start in range(0, features.shape[0], size):
                end = start + size
                out, h, c = self._cells(features[start:end], h0[:, start:end], c0[:, start:end])
                outs.append(out)
                hs.append(h)
                cs.append(c)
            stored = self._stored_dtype(grad)
            hidden[name] = (hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)).to(stored)
            cell[name] = (cs[0] if len(cs) == 1 else torch.cat(cs, dim=1)).to(stored)
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            updates[name] = (self.output_scale * out).reshape(grad.shape)
        slots = {**state.slots, "rms": rms_slot} if self.preconditioning else state.slots
        return updates, state.replace(hidden=hidden, cell=cell, slots=slots, step_count=step)
