"""Which torch intra-op thread count suits metaopt's workloads: the measurement behind ``metaopt --threads``'s default.

Times four workloads at each thread count in one process, the thread counts interleaved within
each repeat so that a change in machine load hits them alike; prints the median seconds and the
ratio to one thread:

* ``smoke eval``: ``metaopt eval --suite smoke``'s runs (tuned baselines on tiny digits MLPs);
* ``meta-training``: 5 meta-steps of the shipped LSTM's recipe (digits MLPs, truncations of 20);
* ``LSTM step 100k``: one ``LearnedOptimizer`` step of the LSTM rule on a 784-128-10 MLP;
* ``Adam step 1M``: one ``torch.optim.Adam`` step on a 784-1024-256-10 MLP (large tensors).

    python benchmarks/bench_threads.py [--threads 1,2,4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from metaoptimizer.evaluate.runner import run_suite
from metaoptimizer.evaluate.suites import make_suite
from metaoptimizer.optim import LearnedOptimizer
from metaoptimizer import pretrained
from metaoptimizer.meta.loop import build_trainer
from metaoptimizer.rules.lstm import LSTMRule


def smoke_eval() -> None:
    run_suite(make_suite("smoke"), {})


def meta_training() -> None:
    trainer = build_trainer(pretrained.recipe("lstm-digits-mlp"))
    for _ in range(5):
        trainer.step()


def optimizer_step(widths: list[int], make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> Callable[[], None]:
    """One step of the optimizer ``make`` builds, on an MLP of ``widths``, gradients fixed and state allocated."""
    torch.manual_seed(0)
    params = [p for a, b in zip(widths[:-1], widths[1:], strict=False) for p in nn.Linear(a, b).parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = make(params)
    optimizer.step()
    return optimizer.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="Comma-separated thread counts.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    default = torch.get_num_threads()
    workloads = {
        "smoke eval": smoke_eval,
        "meta-training (5 steps)": meta_training,
        "LSTM step 100k": optimizer_step([784, 128, 10], lambda ps: LearnedOptimizer(ps, LSTMRule())),
        "Adam step 1M": optimizer_step([784, 1024, 256, 10], lambda ps: torch.optim.Adam(ps, lr=1e-3)),
    }
    seconds: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for threads in counts:
            torch.set_num_threads(threads)
            for name, work in workloads.items():
                started = time.perf_counter()
                work()
                seconds.setdefault((name, threads), []).append(time.perf_counter() - started)
    print(f"torch {torch.__version__}, torch's default here: {default} threads; median of {args.repeats} repeats")
    print("| workload | " + " | ".join(f"{t} thread(s): s (ratio to {counts[0]})" for t in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name in workloads:
        base = statistics.median(seconds[(name, counts[0])])
        cells = [f"{statistics.median(seconds[(name, t)]):.3f} ({statistics.median(seconds[(name, t)]) / base:.2f})"
                 for t in counts]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
