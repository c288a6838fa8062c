"""Character-level language modelling with a small recurrent network (an "unseen architecture"
for optimizers meta-trained on MLPs).

The GRU and tanh-RNN cells are written as plain matmuls, sigmoid and tanh, so double backward,
``torch.func`` transforms and any device work (cuDNN's fused RNN kernels have no double
backward). The text is tiny Shakespeare when a folder is given, else a synthetic seeded
Markov-chain text with a fresh transition matrix per task seed.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaoptimizer.config import check_positive
from metaoptimizer.tasks.base import Batch, ModuleTask, TaskFamily
from metaoptimizer.tasks.datasets import load_tiny_shakespeare
from metaoptimizer.tasks.sampling import (
    ARCHITECTURE_STREAM,
    DATA_STREAM,
    as_choices,
    check_fraction,
    pick,
    task_rng,
)

CELL_GATES = {"gru": 3, "rnn": 1}


class RecurrentLM(nn.Module):
    """Tokens ``(B, T)`` -> next-token logits ``(B, T, vocab_size)`` through a GRU or tanh-RNN.

    Gate order and equations follow ``nn.GRU`` / ``nn.RNN`` (r, z, n); ``w_in`` holds one row of
    input-to-gate weights per token, i.e. one-hot inputs times ``weight_ih.T``.
    """

    def __init__(self, vocab_size: int, hidden_size: int, cell: str = "gru") -> None:
        super().__init__()
        if cell not in CELL_GATES:
            raise ValueError(f"cell={cell!r} is not supported; accepted values: {tuple(CELL_GATES)}")
        check_positive("vocab_size", vocab_size, integer=True)
        check_positive("hidden_size", hidden_size, integer=True)
        self.cell = cell
        self.hidden_size = hidden_size
        gates = CELL_GATES[cell] * hidden_size
        bound = 1.0 / math.sqrt(hidden_size)
        uniform = lambda *shape: nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))  # noqa: E731
        self.w_in = uniform(vocab_size, gates)
        self.b_in = uniform(gates)
        self.w_h = uniform(hidden_size, gates)
        self.b_h = uniform(gates)
        self.readout = nn.Linear(hidden_size, vocab_size)

    def step(self, inputs: Tensor, h: Tensor) -> Tensor:
        """One recurrence step from input-gate pre-activations ``inputs`` and state ``h``."""
        recurrent = h @ self.w_h + self.b_h
        if self.cell == "rnn":
            return torch.tanh(inputs + recurrent)
        x_r, x_z, x_n = inputs.chunk(3, dim=-1)
        h_r, h_z, h_n = recurrent.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return n + z * (h - n)

    def forward(self, tokens: Tensor) -> Tensor:
        inputs = F.embedding(tokens, self.w_in) + self.b_in
        h = inputs.new_zeros(tokens.shape[0], self.hidden_size)
        states = []
        for t in range(tokens.shape[1]):
            h = self.step(inputs[:, t], h)
            states.append(h)
        return self.readout(torch.stack(states, dim=1))


class SequenceTask(ModuleTask):
    """Next-token prediction: batches are ``(tokens (B, T), targets (B, T))`` and the loss is
    the mean cross-entropy over all ``B * T`` positions."""

    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return super().forward(params, x).flatten(0, -2)

    def loss(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        x, y = batch
        return super().loss(params, (x, y.flatten()))

    def metrics(self, params: Mapping[str, Tensor], batch: Batch) -> dict[str, float]:
        x, y = batch
        return super().metrics(params, (x, y.flatten()))

    def loss_signature(self) -> Hashable | None:
        """The module's loss with the targets flattened: tasks of one architecture share it, so
        the vectorised estimators vmap them together."""
        return type(self), repr(self.model), self.loss_name


def markov_text(seed: int, length: int, vocab_size: int, concentration: float = 0.1) -> Tensor:
    """``length`` token ids from a Markov chain whose transition rows are Dirichlet(concentration)
    draws for ``seed`` (small concentrations give peaked, learnable transitions)."""
    check_positive("length", length, integer=True)
    check_positive("vocab_size", vocab_size, integer=True)
    check_positive("concentration", concentration)
    rng = task_rng(seed, DATA_STREAM)
    cumulative = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size).cumsum(axis=1).tolist()
    draws = rng.random(length).tolist()
    state = int(rng.integers(vocab_size))
    ids = []
    for u in draws:
        state = min(bisect.bisect_right(cumulative[state], u), vocab_size - 1)
        ids.append(state)
    return torch.tensor(ids, dtype=torch.long)


def next_token_windows(ids: Tensor, seq_len: int) -> Batch:
    """Non-overlapping ``(inputs, targets)`` windows of ``seq_len`` tokens, targets shifted by one."""
    windows = ids.unfold(0, seq_len + 1, seq_len)
    return windows[:, :-1], windows[:, 1:]


class CharRNNFamily(TaskFamily):
    """Recurrent character models; each task seed picks a cell, a hidden size and its text.

    With ``root`` (a folder holding tiny Shakespeare's ``input.txt``) a task trains on a random
    ``n_chars`` stretch of the play text; without it, on ``n_chars`` of a synthetic Markov text
    over ``vocab_size`` tokens (default 16). The last ``valid_fraction`` of the stretch is the
    task's validation text.
    """

    name = "char_rnn"

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        cells: str | tuple[str, ...] = ("gru",),
        hidden_sizes: int | tuple[int, ...] = (32, 64),
        seq_len: int = 16,
        batch_size: int = 16,
        n_chars: int = 8192,
        vocab_size: int | None = None,
        valid_fraction: float = 0.1,
        device: torch.device | str | None = None,
    ) -> None:
        self.cells = as_choices("cells", cells, tuple(CELL_GATES))
        self.hidden_sizes = as_choices("hidden_sizes", hidden_sizes, integer=True)
        for label, value in (("seq_len", seq_len), ("batch_size", batch_size), ("n_chars", n_chars)):
            check_positive(label, value, integer=True)
        check_fraction("valid_fraction", valid_fraction)
        n_valid = round(n_chars * valid_fraction)
        if min(n_valid, n_chars - n_valid) < seq_len + 1:
            raise ValueError(
                f"n_chars={n_chars} with valid_fraction={valid_fraction} leaves fewer than seq_len + 1 = "
                f"{seq_len + 1} characters for training or validation"
            )
        if root is not None and vocab_size is not None:
            raise ValueError("vocab_size applies to the synthetic text only; tiny Shakespeare fixes its own")
        self.text_ids: Tensor | None = None
        if root is None:
            self.vocab_size = 16 if vocab_size is None else vocab_size
            check_positive("vocab_size", self.vocab_size, integer=True)
        else:
            text = load_tiny_shakespeare(root)
            vocab = sorted(set(text))
            if len(text) < n_chars:
                raise ValueError(f"n_chars={n_chars} exceeds the {len(text)} characters of the text in {root!r}")
            index = {ch: i for i, ch in enumerate(vocab)}
            self.vocab_size = len(vocab)
            self.text_ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
        self.seq_len, self.batch_size, self.n_chars, self.n_valid = seq_len, batch_size, n_chars, n_valid
        self.device = device

    def _text(self, seed: int) -> Tensor:
        if self.text_ids is None:
            return markov_text(seed, self.n_chars, self.vocab_size)
        start = int(task_rng(seed, DATA_STREAM).integers(len(self.text_ids) - self.n_chars + 1))
        return self.text_ids[start : start + self.n_chars]

    def sample(self, seed: int) -> SequenceTask:
        rng = task_rng(seed, ARCHITECTURE_STREAM)
        cell, hidden = pick(rng, self.cells), pick(rng, self.hidden_sizes)
        ids = self._text(seed).to(self.device)
        split = self.n_chars - self.n_valid
        vocab_size, device = self.vocab_size, self.device
        source = "synthetic" if self.text_ids is None else "shakespeare"
        return SequenceTask(
            name=f"{self.name}:{cell}[h={hidden}]:{source}:seed={seed}",
            model_factory=lambda: RecurrentLM(vocab_size, hidden, cell).to(device),
            train_data=next_token_windows(ids[:split], self.seq_len),
            valid_data=next_token_windows(ids[split:], self.seq_len),
            batch_size=self.batch_size,
        )

