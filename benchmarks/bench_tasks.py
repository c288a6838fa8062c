"""Cost of 100 training steps on one task of each family, against the same model in plain PyTorch.

For each family it times 100 steps of ``task.loss`` + ``torch.autograd.grad`` + an SGD update on
the task's own batches, both first-order and with ``create_graph=True`` (as a second-order
unroll needs), and as a reference 100 steps of the equivalent plain-PyTorch model trained with
``torch.optim.SGD`` on the same batches (``nn.GRU`` on one-hot inputs for the char RNN). It
prints seconds per 100 steps and the ratios to the reference. The target for the char RNN is
about 1 s per 100 steps on one CPU thread.

    python benchmarks/bench_tasks.py [--device cpu|cuda] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F
from torch import nn

from metaoptimizer.tasks import make_family
from metaoptimizer.tasks.sequence import RecurrentLM

STEPS = 100
LR = 0.01
FAMILIES = {
    "quadratic (d=10)": ("quadratic", {}),
    "digits_mlp (64x64 relu)": ("digits_mlp", {"widths": 64, "depths": 2, "activations": "relu"}),
    "digits_cnn (8x16 relu)": ("digits_cnn", {"widths": (8, 16), "depths": 2, "activations": "relu"}),
    "char_rnn (gru h=64, T=16, B=16)": ("char_rnn", {"cells": "gru", "hidden_sizes": 64}),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def task_steps(task, batches, device: str, create_graph: bool) -> None:
    params = {k: v.requires_grad_() for k, v in task.init_params(0).items()}
    for batch in batches:
        grads = torch.autograd.grad(task.loss(params, batch), list(params.values()), create_graph=create_graph)
        params = {k: (v - LR * g).detach().requires_grad_() for (k, v), g in zip(params.items(), grads)}
    sync(device)


class GRUReference(nn.Module):
    """``nn.GRU`` on one-hot tokens with a linear read-out: the plain-PyTorch char RNN."""

    def __init__(self, model: RecurrentLM) -> None:
        super().__init__()
        self.vocab_size = model.readout.out_features
        self.gru = nn.GRU(self.vocab_size, model.hidden_size, batch_first=True)
        self.readout = nn.Linear(model.hidden_size, self.vocab_size)

    def forward(self, tokens):
        states, _ = self.gru(F.one_hot(tokens, self.vocab_size).float())
        return self.readout(states).flatten(0, 1)


def reference_steps(name: str, task, batches, device: str) -> None:
    if name == "quadratic":
        theta = nn.Parameter(task.init_params(0)["theta"])
        optimizer = torch.optim.SGD([theta], lr=LR)
        loss_of = lambda batch: (batch[0] @ theta - batch[1]).square().sum()  # noqa: E731
    else:
        model = GRUReference(task.model).to(device) if name == "char_rnn" else task.model_factory()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        loss_of = lambda batch: F.cross_entropy(model(batch[0]), batch[1].flatten())  # noqa: E731
    for batch in batches:
        optimizer.zero_grad()
        loss_of(batch).backward()
        optimizer.step()
    sync(device)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={args.threads} steps={STEPS} (best of {args.repeats})")
    print(f"{'task':34s} {'reference s':>11s} {'task s':>8s} {'ratio':>6s} {'2nd-order s':>11s} {'ratio':>6s}")
    for label, (name, options) in FAMILIES.items():
        task = make_family(name, device=args.device, **options).sample(0)
        batches = list(itertools.islice(task.train_batches(0), STEPS))
        reference = best_time(lambda: reference_steps(name, task, batches, args.device), args.repeats)
        first = best_time(lambda: task_steps(task, batches, args.device, False), args.repeats)
        second = best_time(lambda: task_steps(task, batches, args.device, True), args.repeats)
        print(
            f"{label:34s} {reference:11.3f} {first:8.3f} {first / reference:6.2f} "
            f"{second:11.3f} {second / reference:6.2f}"
        )


if __name__ == "__main__":
    main()
