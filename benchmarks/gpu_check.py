"""One short GPU measurement (issue 17, item 5): learned steps against fused AdamW, and a meta-step.

    bash benchmarks/gpu_check.sh          # picks the Python (see there), then runs this file

Prints one compact table: seconds per step and the ratio to fused ``torch.optim.AdamW`` at 10M and
100M parameters for the default ``l2o`` rule (through the torch adapter, and ``update_in_place``),
the coordinatewise LSTM (``update`` and ``update_in_place``; at 100M only in place, and only when
its 32 GB of state fit) and Celo (when this checkout has it), then one meta-training truncation
(learned Adam learning rate, second order, K=20, digits MLP 64-32-10, batch 128) on the GPU and on
the CPU. First calls (compilation) are timed apart. Falls back to the CPU, saying so, without CUDA.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_fast_steps import best_times, functional_step, make_params  # noqa: E402
from bench_vs_torchopt import MetaoptimizerSide, batch_stream, digits  # noqa: E402

from metaoptimizer.optim import LearnedOptimizer  # noqa: E402
from metaoptimizer.rules import RULES  # noqa: E402
from metaoptimizer.rules.fused import COMPILE_SECONDS  # noqa: E402
from metaoptimizer.rules.lstm import LSTMRule  # noqa: E402
from metaoptimizer.rules.mlp import MLPRule  # noqa: E402

LSTM_BYTES_PER_PARAM = 2 * 2 * 20 * 4 + 4 * 4  # hidden + cell (2 layers x 20 units, fp32), rms, param, grad


def free_bytes(device: str) -> int:
    return torch.cuda.mem_get_info()[0] if device == "cuda" else 1 << 62


def steps_for(numel: int, device: str) -> dict:
    make = lambda: make_params(numel, device)  # noqa: E731
    steps = {
        "fused AdamW": torch.optim.AdamW(make(), lr=1e-3, fused=True).step,
        "l2o via torch adapter": LearnedOptimizer(make(), MLPRule().to(device)).step,
        "l2o update_in_place": functional_step(MLPRule().to(device), make(), in_place=True),
    }
    if numel <= 20_000_000:
        steps["lstm update + add"] = functional_step(LSTMRule().to(device), make(), in_place=False)
    if numel * LSTM_BYTES_PER_PARAM < 0.8 * free_bytes(device):
        steps["lstm update_in_place"] = functional_step(LSTMRule().to(device), make(), in_place=True)
    if "celo" in RULES:
        try:
            celo = LearnedOptimizer(make(), RULES["celo"]().to(device), total_steps=10_000)
            celo.step(loss=1.0)
            steps["celo via torch adapter"] = functools.partial(celo.step, loss=1.0)
        except Exception as error:  # noqa: BLE001 - report and measure the rest
            print(f"celo skipped: {type(error).__name__}: {error}")
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000000,100000000", help="parameter counts (CPU: the first only)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "CPU (no CUDA: torch.cuda.is_available() is False)"
    print(f"device: {name}; torch {torch.__version__}; celo {'present' if 'celo' in RULES else 'not in this checkout'}")
    rows = []
    for numel in sizes if cuda else sizes[:1]:
        steps = steps_for(numel, device)
        start = time.perf_counter()
        for fn in steps.values():
            fn()
            fn()
        first = time.perf_counter() - start
        times = best_times(steps, device, repeats=3, rounds=3)
        reference = times["fused AdamW"]
        rows += [(f"{numel / 1e6:g}M", method, seconds, seconds / reference) for method, seconds in times.items()]
        print(f"{numel / 1e6:g}M: first calls {first:.1f} s (compile {sum(COMPILE_SECONDS.values()):.1f} s so far)")
        del steps
        torch.cuda.empty_cache() if cuda else None
    x, y = digits()
    batches = batch_stream(x, y, 256)
    for where in (device, "cpu") if cuda else ("cpu",):
        side = MetaoptimizerSide([(bx.to(where), by.to(where)) for bx, by in batches], device=where)
        side.truncation()
        seconds = best_times({"meta": side.truncation}, where, repeats=3, rounds=3)["meta"]
        rows.append(("meta", f"truncation K=20 on {where}", seconds, float("nan")))
    print(f"\n{'size':5s} {'method':34s} {'ms/step':>10s} {'x AdamW':>8s}")
    for size, method, seconds, ratio in rows:
        print(f"{size:5s} {method:34s} {seconds * 1e3:10.2f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
