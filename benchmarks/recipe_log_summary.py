"""Summarise a recipe run's ``log.csv``: how the meta-loss moves *within* cohorts, per block of steps.

With ``sync_runs`` all tasks of a meta-step belong to one cohort that advances by one truncation
per meta-step, so consecutive meta-losses follow the same inner runs: a positive change means the
rule made the tasks' loss rise over those 50 inner steps, a negative one that it made it fall. A
change larger than ``--restart-jump`` in size is taken as a cohort restart (new tasks) and left out.

    python benchmarks/recipe_log_summary.py runs/celo_recipe/log.csv --block 20
"""

from __future__ import annotations

import argparse
import csv
from itertools import pairwise


def within_cohort_slopes(losses: list[float], block: int, restart_jump: float) -> list[tuple[int, int, float, int]]:
    """(first step, last step, mean change per meta-step, changes counted) per block of steps."""
    changes = [(i + 2, b - a) for i, (a, b) in enumerate(pairwise(losses))]
    rows = []
    for start in range(0, len(changes), block):
        part = changes[start : start + block]
        kept = [delta for _, delta in part if abs(delta) < restart_jump]
        mean = sum(kept) / len(kept) if kept else float("nan")
        rows.append((part[0][0], part[-1][0], mean, len(kept)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log")
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--restart-jump", type=float, default=0.005)
    args = parser.parse_args()
    with open(args.log, newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(row["meta_loss"]) for row in rows]
    seconds = sum(float(row["seconds"]) for row in rows)
    print(f"{len(rows)} meta-steps, {sum(int(r['skipped']) for r in rows)} skipped, "
          f"{seconds / 3600:.2f} wall-hours of steps; meta-loss first {losses[0]:.4f}, last {losses[-1]:.4f}")
    print("steps      mean change of the meta-loss per meta-step within a cohort (x1e-4)  changes")
    for first, last, mean, kept in within_cohort_slopes(losses, args.block, args.restart_jump):
        print(f"{first:>4}-{last:<5} {mean * 1e4:+8.2f} {kept:>4}")


if __name__ == "__main__":
    main()
