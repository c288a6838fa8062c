"""Meta-validation of the demo configuration: how the shipped checkpoint's meta-training budget was chosen.

Meta-trains the shipped recipe (``pretrained.recipe("lstm-digits-mlp")``, seed 0, as ``metaopt pretrain``) for ``--steps``
meta-steps, keeps a snapshot every ``--every`` steps (and the untrained rule), then scores every
snapshot, with and without its LSTM output, against tuned Adam on *training-split* tasks of the
family (indices 0-9 by default; meta-training draws indices at random from 2**31, so these are
practically unseen, and the held-out split is never touched).

    python benchmarks/bench_meta_validation.py [--steps 1200] [--every 100] [--tasks-per-step 1]
        [--unroll-steps 20] [--lstm-meta-lr-scale 1.0] [--baseline-cache DIR]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch

from bench_headline import without_lstm
from metaoptimizer import pretrained
from metaoptimizer.evaluate.runner import run_suite
from metaoptimizer.evaluate.suites import Suite, SuiteEntry
from metaoptimizer.meta.loop import build_trainer
from metaoptimizer.tasks.base import TRAIN

RECIPE = pretrained.recipe("lstm-digits-mlp")
FAMILY, RUN_STEPS = RECIPE.family, RECIPE.run_steps


#: Name prefixes of the LSTM's own meta-parameters (the skip path and schedule are the rest).
LSTM_PARTS = ("input_weights", "hidden_weights", "biases", "head")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--tasks-per-step", type=int, default=1)
    parser.add_argument("--unroll-steps", type=int, default=RECIPE.optimizer.unroll_steps,
                        help=f"Truncation length (runs are {RUN_STEPS} steps; {RUN_STEPS} = whole runs, no truncation).")
    parser.add_argument("--lstm-meta-lr-scale", type=float, default=1.0,
                        help="Multiplier of the meta-lr for the LSTM's cells and head (not the skip path or schedule).")
    parser.add_argument("--num-tasks", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--baseline-cache", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = dataclasses.replace(
        RECIPE, optimizer=dataclasses.replace(RECIPE.optimizer, unroll_steps=args.unroll_steps),
        tasks_per_step=args.tasks_per_step,
        meta_lr_scales={f"members.lstm.{part}": args.lstm_meta_lr_scale for part in LSTM_PARTS},
    )
    trainer = build_trainer(settings)
    snapshots = {0: copy.deepcopy(trainer.rule)}
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        trainer.step()
        if step % args.every == 0:
            snapshots[step] = copy.deepcopy(trainer.rule)
    print(f"meta-trained {args.steps} steps ({args.tasks_per_step} task(s) per step, unroll {args.unroll_steps}, "
          f"LSTM meta-lr x{args.lstm_meta_lr_scale:g}) in "
          f"{time.perf_counter() - started:.0f} s, {trainer.skipped_steps} skipped")
    entry = SuiteEntry(FAMILY, FAMILY, tuple(range(args.num_tasks)), RUN_STEPS, tuple(range(args.seeds)), split=TRAIN)
    suite = Suite("meta-validation", f"training-split tasks of {FAMILY}", (entry,))
    optimizers = {}
    for step, rule in snapshots.items():
        optimizers[f"step{step}"] = lambda rule=rule: rule
        optimizers[f"step{step}-no-lstm"] = lambda rule=rule: without_lstm(rule)
    result = run_suite(suite, optimizers, cache=args.baseline_cache)
    print(f"speedup over tuned Adam on {args.num_tasks} training-split tasks x {args.seeds} seeds:")
    for name in optimizers:
        print("  " + result.headline_line(name))


if __name__ == "__main__":
    main()
