"""Stability of unrolled meta-training at unroll lengths 20, 50 and 100: meta-gradient norm
distribution (before clipping) and the fraction of skipped (non-finite) meta-steps.

    python benchmarks/bench_unroll_stability.py [--meta-steps 20]

The LSTM is the shipped recipe's (``pretrained.recipe("lstm-digits-mlp")``) on the digits-MLP family, from the
same initialisation for every unroll length.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from metaoptimizer import pretrained
from metaoptimizer.meta.loop import build_config_rule
from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.tasks import make_family

RECIPE = pretrained.recipe("lstm-digits-mlp")
FAMILY = RECIPE.family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-steps", type=int, default=20)
    parser.add_argument("--unrolls", type=int, nargs="+", default=[20, 50, 100])
    args = parser.parse_args()
    torch.set_num_threads(1)
    family = make_family(FAMILY)
    print(f"LSTM (shipped recipe) on {FAMILY}, {args.meta_steps} meta-steps per unroll length, runs 2x unroll")
    print("| unroll | median norm | p90 norm | max norm | clipped (> 1.0) | skipped |\n|---|---|---|---|---|---|")
    for unroll_steps in args.unrolls:
        torch.manual_seed(0)
        trainer = MetaTrainer(
            build_config_rule(RECIPE), family, meta_lr=RECIPE.optimizer.meta_lr, unroll_steps=unroll_steps,
            run_steps=2 * unroll_steps, gradient_clipping=RECIPE.optimizer.gradient_clipping,
            meta_objective=RECIPE.optimizer.meta_objective, seed=0,
        )
        results = trainer.train(args.meta_steps)
        norms = np.array([r.meta_grad_norm for r in results])
        finite = norms[np.isfinite(norms)]
        skipped = sum(r.skipped for r in results) / len(results)
        print(f"| {unroll_steps} | {np.median(finite):.3g} | {np.percentile(finite, 90):.3g} | {finite.max():.3g} "
              f"| {np.mean(finite > 1.0):.0%} | {skipped:.0%} |")


if __name__ == "__main__":
    main()
