"""Summarise a recipe run's ``log.csv``: the meta-loss per block of meta-steps.

Each meta-step's meta-loss is the mean normalised training loss (cross-entropy / 3.45 in the
recipe) over one truncation of the cohort's tasks; it depends on where the cohort stands in its
run (a fresh task starts near 2.3 / 3.45 = 0.67), so single values are noisy and the block means
are what to read.

    python benchmarks/recipe_log_summary.py runs/celo_recipe/log.csv --block 50
"""

from __future__ import annotations

import argparse
import csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log")
    parser.add_argument("--block", type=int, default=50)
    args = parser.parse_args()
    with open(args.log, newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(row["meta_loss"]) for row in rows]
    seconds = sum(float(row["seconds"]) for row in rows)
    print(f"{len(rows)} meta-steps, {sum(int(r['skipped']) for r in rows)} skipped, "
          f"{seconds / 3600:.2f} wall-hours of steps")
    print("steps        mean meta-loss    min     max")
    for start in range(0, len(losses), args.block):
        part = losses[start : start + args.block]
        print(f"{start + 1:>5}-{start + len(part):<6} {sum(part) / len(part):9.4f} {min(part):9.4f} {max(part):7.4f}")


if __name__ == "__main__":
    main()
