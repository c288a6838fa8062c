"""Peak memory of the chunked coordinatewise LSTM step, relative to the size of its state.

A functional ``update`` returns a new state while the old one is alive, so 1x the state is the
floor; the rest is temporaries. Each configuration runs in a fresh process (peak RSS is per
process) and prints the growth of peak RSS over two updates, in MiB and as a multiple of the
hidden + cell state.

    python benchmarks/bench_lstm_memory.py [--coordinates 1000000] [--chunk-size 65536]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import torch

from metaoptimizer.rules.lstm import LSTMRule


def measure(coordinates: int, chunk_size: int, state_dtype: str) -> str:
    torch.set_num_threads(1)
    params = {"w": torch.randn(coordinates)}
    rule = LSTMRule(chunk_size=chunk_size, state_dtype=state_dtype)
    state = rule.init(params)
    state_mib = sum(t.numel() * t.element_size() for t in [*state.hidden.values(), *state.cell.values()]) / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        for _ in range(2):
            _, state = rule.update({"w": torch.randn(coordinates)}, state, params)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return (f"{state_dtype:8s} state {state_mib:6.0f} MiB  peak RSS growth {growth:6.0f} MiB  "
            f"= {growth / state_mib:.2f}x state")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinates", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=65536)
    parser.add_argument("--state-dtype", default=None, help=argparse.SUPPRESS)  # one measurement (child)
    args = parser.parse_args()
    if args.state_dtype:
        print(measure(args.coordinates, args.chunk_size, args.state_dtype))
        return
    print(f"LSTM (2 x 20) step on {args.coordinates:,} coordinates, chunks of {args.chunk_size:,}:")
    for dtype in ("float32", "bfloat16"):
        command = [sys.executable, __file__, "--coordinates", str(args.coordinates),
                   "--chunk-size", str(args.chunk_size), "--state-dtype", dtype]
        print("  " + subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
