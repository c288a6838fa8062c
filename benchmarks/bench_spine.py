"""Spine figures: LSTM optimizer step time vs fused torch.optim.Adam on a 1M-parameter model, and
meta-training throughput (inner steps per second) at several unroll lengths.

    python benchmarks/bench_spine.py [--repeats 20] [--threads 1] [--widths 784,1024,256,10] [--meta-steps 10]

``--widths`` sets the MLP of the step timing (784,128,10: 101,770 parameters); ``--meta-steps 0``
skips the throughput table.

Both figures are measured in the same run as their reference and printed as ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.optim import LearnedOptimizer
from metaoptimizer.rules.lstm import LSTMRule
from metaoptimizer.tasks import make_family


def mlp(widths: list[int]) -> nn.Module:
    """An MLP of ``widths`` (the default 784-1024-256-10: 1,068,810 parameters in 6 tensors)."""
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def step_time(model: nn.Module, optimizer: torch.optim.Optimizer, repeats: int) -> float:
    """Median seconds of ``optimizer.step()`` with fixed gradients (forward/backward excluded)."""
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # warm-up: state allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward_time(model: nn.Module, repeats: int) -> float:
    """Median seconds of the rest of a training step: forward and backward of a batch of 64."""
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def optimizer_step_ratios(repeats: int, widths: list[int]) -> None:
    torch.manual_seed(0)
    model = mlp(widths)
    n = sum(p.numel() for p in model.parameters())
    adam = step_time(model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True), repeats)
    rows = [("forward + backward, batch 64 (not an optimizer)", forward_backward_time(model, repeats)),
            ("torch.optim.Adam(fused=True)", adam)]
    for label, rule in [
        ("LSTM 2x20, fp32 state", LSTMRule()),
        ("LSTM 2x20, chunk 262144", LSTMRule(chunk_size=262144)),
        ("LSTM 2x20, bf16 state", LSTMRule(state_dtype="bfloat16")),
    ]:
        rows.append((label, step_time(model, LearnedOptimizer(model.parameters(), rule), repeats)))
    print(f"\noptimizer step on a {n:,}-parameter MLP, median of {repeats}")
    print("| optimizer | ms/step | ratio to fused Adam |\n|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds * 1e3:.1f} | {seconds / adam:.1f} |")


def meta_training_throughput(unrolls: list[int], meta_steps: int) -> None:
    """Inner steps/s of truncated-BPTT meta-training of the LSTM on digits MLPs."""
    family = make_family("digits_mlp")
    print(f"\nmeta-training throughput, LSTM 2x20 on digits_mlp, {meta_steps} meta-steps each, 1 task per step")
    print("| unroll steps | inner steps/s | meta-steps/s |\n|---|---|---|")
    for unroll_steps in unrolls:
        trainer = MetaTrainer(LSTMRule(init_lr=3e-3), family, meta_lr=3e-3, unroll_steps=unroll_steps,
                              run_steps=max(unrolls) * 2, meta_objective="log_train_loss", seed=0)
        trainer.step()  # warm-up
        start = time.perf_counter()
        inner = sum(trainer.step().inner_steps for _ in range(meta_steps))
        seconds = time.perf_counter() - start
        print(f"| {unroll_steps} | {inner / seconds:.0f} | {meta_steps / seconds:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--meta-steps", type=int, default=10)
    parser.add_argument("--widths", default="784,1024,256,10", help="MLP layer widths of the step timing.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    optimizer_step_ratios(args.repeats, [int(w) for w in args.widths.split(",")])
    if args.meta_steps > 0:
        meta_training_throughput([20, 50, 100], args.meta_steps)


if __name__ == "__main__":
    main()
