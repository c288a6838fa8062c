"""Cost of ``LearnedOptimizer.step`` with hand-designed rules against ``torch.optim``, same kernels.

For each model shape and rule (SGD, momentum, RMSProp, Adam, AdamW) it times one optimizer step
(gradients fixed, so only the step is timed) of

* ``torch.optim`` with ``foreach=True``, and ``LearnedOptimizer(rule)`` on its default foreach
  kernels: with the rule's default ``eps_root`` (1e-16, one extra pass for Adam/RMSProp) and with
  ``eps_root=0`` (the same arithmetic as torch's);
* ``torch.optim`` with ``fused=True`` and ``LearnedOptimizer(rule, fused=True)`` (SGD, momentum,
  Adam/AdamW at ``eps_root=0``; torch has no fused RMSprop);
* ``LearnedOptimizer(rule, foreach=False)``: the rule's functional (differentiable) update;
* the adapter's NaN/Inf check of the gradients alone (``optim._nonfinite_names``: one reading pass
  that ``torch.optim`` does not make), the floor of what the adapter adds to torch's step.

and prints each adapter time as a ratio to torch's with the same implementation (target: at
most 1.1). Methods are interleaved in rounds and the best round is kept, so load changes on a
shared machine hit all of them alike.

    python benchmarks/bench_optim_adapter.py [--device cpu|cuda] [--repeats 30] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from metaoptimizer import optim
from metaoptimizer.optim import LearnedOptimizer
from metaoptimizer.rules import hand

#: rule name -> (hand rule with keyword overrides, torch.optim optimizer with keyword overrides)
RULES = {
    "sgd": (lambda **k: hand.SGD(lr=1e-2, **k), lambda ps, **k: torch.optim.SGD(ps, lr=1e-2, **k)),
    "momentum": (lambda **k: hand.Momentum(lr=1e-2, momentum=0.9, **k),
                 lambda ps, **k: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, **k)),
    "rmsprop": (lambda **k: hand.RMSProp(lr=1e-3, **k), lambda ps, **k: torch.optim.RMSprop(ps, lr=1e-3, **k)),
    "adam": (lambda **k: hand.Adam(lr=1e-3, **k), lambda ps, **k: torch.optim.Adam(ps, lr=1e-3, **k)),
    "adamw": (lambda **k: hand.AdamW(lr=1e-3, **k), lambda ps, **k: torch.optim.AdamW(ps, lr=1e-3, **k)),
}
HAS_EPS_ROOT = ("rmsprop", "adam", "adamw")
FUSED = ("sgd", "momentum", "adam", "adamw")

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
    load changes on a shared machine hit all of them alike. On CPU the clock is this process's
    CPU time (one thread), so time the process spends preempted by other jobs is not counted."""
    clock = time.process_time if device == "cpu" else time.perf_counter
    for fn in steps.values():
        for _ in range(5):
            fn()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, fn in steps.items():
            sync(device)
            start = clock()
            for _ in range(repeats):
                fn()
            sync(device)
            best[name] = min(best[name], (clock() - start) / repeats)
    return best


def steps_for(rule: str, params: list[nn.Parameter]) -> dict[str, object]:
    """Step functions to time for one rule, by label."""
    make_rule, make_torch = RULES[rule]
    zero_root = {"eps_root": 0.0} if rule in HAS_EPS_ROOT else {}
    steps = {
        "torch foreach": make_torch(params, foreach=True).step,
        "adapter foreach": LearnedOptimizer(params, make_rule()).step,
        "adapter foreach eps_root=0": LearnedOptimizer(params, make_rule(**zero_root)).step,
        "adapter functional": LearnedOptimizer(params, make_rule(), foreach=False).step,
        "NaN check": lambda: optim._nonfinite_names({str(i): p.grad for i, p in enumerate(params)}),
    }
    if rule in FUSED:
        steps["torch fused"] = make_torch(params, fused=True).step
        steps["adapter fused"] = LearnedOptimizer(params, make_rule(**zero_root), fused=True).step
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30, help="calls per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks per method (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}\n")
    print("| model | rule | torch foreach | adapter foreach / torch foreach | same, eps_root=0 | torch fused | "
          "adapter fused / torch fused | functional / torch foreach | NaN check alone / torch foreach |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, widths in SHAPES.items():
        params = build(widths, args.device)
        for rule in RULES:
            t = best_times(steps_for(rule, params), args.device, args.repeats, args.rounds)
            foreach = t["torch foreach"]
            fused = (f"{t['torch fused'] * 1e3:.3f} ms | {t['adapter fused'] / t['torch fused']:.2f}"
                     if "torch fused" in t else "- | -")
            print(f"| {name} | {rule} | {foreach * 1e3:.3f} ms | {t['adapter foreach'] / foreach:.2f} | "
                  f"{t['adapter foreach eps_root=0'] / foreach:.2f} | {fused} | "
                  f"{t['adapter functional'] / foreach:.2f} | {t['NaN check'] / foreach:.2f} |", flush=True)


if __name__ == "__main__":
    main()
