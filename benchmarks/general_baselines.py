"""Fill a baseline cache with the `general` suite's tuned baselines, no optimizer evaluated.

    OMP_NUM_THREADS=1 python benchmarks/general_baselines.py --horizons 1000 --data-dir ../shared/data --cache DIR

A later `metaopt eval --suite general --baseline-cache DIR` then runs only its optimizers.
"""

from __future__ import annotations

import argparse

import torch

from metaoptimizer.evaluate.runner import run_suite
from metaoptimizer.evaluate.suites import make_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizons", default="300", help="comma-separated step budgets")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    horizons = tuple(int(h) for h in args.horizons.split(","))
    suite = make_suite("general", horizons=horizons, data_dir=args.data_dir)
    result = run_suite(suite, {}, cache=args.cache)
    print(f"baselines of {suite.description}: {result.seconds:.0f} s")


if __name__ == "__main__":
    main()
