"""Cost of ``LearnedOptimizer.step`` against torch.optim and against calling the rule directly.

For each model shape it times one optimizer step (gradients fixed, so only the step is timed):

* ``torch.optim.Adam`` (default foreach implementation): the reference;
* ``LearnedOptimizer(hand.Adam)``: the adapter;
* ``hand.Adam`` called directly (``update`` + in-place add): the rule without the adapter.

It prints the adapter's time per step as a ratio to each, so the adapter's own overhead
(bookkeeping per tensor, state split/merge, non-finite check) is separated from the rule's cost.

    python benchmarks/bench_optim_adapter.py [--device cpu|cuda] [--repeats 30] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from metaoptimizer.optim import LearnedOptimizer
from metaoptimizer.rules import hand

SHAPES = {
    # name: (layer widths) - many small tensors vs few large ones
    "mlp-40x64 (80 tensors, 0.17M)": [64] * 41,
    "mlp-4x512 (8 tensors, 1.1M)": [512] * 5,
}


def build(widths: list[int], device: str) -> list[nn.Parameter]:
    torch.manual_seed(0)
    layers = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
    params = [p for layer in layers for p in layer.parameters()]
    for p in params:
        p.data = p.data.to(device)
        p.grad = torch.randn_like(p)
    return params


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_times(steps: dict[str, object], device: str, repeats: int, rounds: int) -> dict[str, float]:
    """Best mean seconds per call of each step function; rounds interleave the methods so that
    load changes on a shared machine hit all of them alike."""
    for fn in steps.values():
        for _ in range(5):
            fn()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, fn in steps.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - start) / repeats)
    return best


def direct_rule_step(params: list[nn.Parameter], lr: float):
    """``hand.Adam`` applied without the adapter: one update call over all tensors, then add."""
    rule = hand.Adam(lr=lr)
    named = {f"p{i}": p for i, p in enumerate(params)}
    state = rule.init(named)

    @torch.no_grad()
    def step():
        nonlocal state
        updates, state = rule.update({n: p.grad for n, p in named.items()}, state, named, state.step_count + 1)
        torch._foreach_add_(list(named.values()), [updates[n] for n in named])

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30, help="calls per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks per method (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    header = ("model", "torch Adam", "adapter", "direct rule", "adapter/torch", "adapter/direct")
    print(f"{header[0]:32s} {header[1]:>11s} {header[2]:>11s} {header[3]:>11s} {header[4]:>14s} {header[5]:>15s}")
    for name, widths in SHAPES.items():
        params = build(widths, args.device)
        steps = {
            "torch": torch.optim.Adam(params, lr=1e-3).step,
            "adapter": LearnedOptimizer(params, hand.Adam(lr=1e-3)).step,
            "direct": direct_rule_step(params, 1e-3),
        }
        t = best_times(steps, args.device, args.repeats, args.rounds)
        print(
            f"{name:32s} {t['torch'] * 1e3:9.3f}ms {t['adapter'] * 1e3:9.3f}ms {t['direct'] * 1e3:9.3f}ms "
            f"{t['adapter'] / t['torch']:14.2f} {t['adapter'] / t['direct']:15.2f}"
        )

if __name__ == "__main__":
    main()
