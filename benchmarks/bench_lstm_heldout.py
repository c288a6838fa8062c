"""Issue 16 item 5: learned optimizers on digits MLPs outside the shipped LSTM's meta-training family.

Runs the ``outside_family`` suite (:func:`metaoptimizer.evaluate.suites.outside_family_suite`:
torch's default initialisation, sigmoid/tanh/ELU, batches of 32/64/128, 2 held-out task seeds
each, 200 steps, every optimizer told the budget) against Adam with its learning rate tuned per
task on the default grid (1e-4 .. 0.32, 8 points), and prints, per task-seed, tuned Adam's
learning rate, its steps to its best (smoothed) loss, the optimizer's steps to that loss, the
speedup (:mod:`metaoptimizer.evaluate.metrics`) and both final smoothed training losses; then the
median speedup and how many task-seeds reached the target.

    python benchmarks/bench_lstm_heldout.py [--optimizer lstm-digits-mlp] [--optimizer runs/x/snapshots/step_000100.pt]
        [--seeds 1] [--baseline-cache DIR] [--json FILE]

An optimizer is anything ``metaopt eval --optimizer`` takes (a pretrained name or a saved
``MetaOptimizer`` file). One thread, seeded: the figures repeat exactly on one machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from metaoptimizer.evaluate.baselines import default_baselines
from metaoptimizer.evaluate.loading import load_optimizer
from metaoptimizer.evaluate.runner import SuiteResult, run_suite
from metaoptimizer.evaluate.suites import make_suite


def rows(result: SuiteResult, name: str) -> list[dict]:
    """One row per task-seed: the comparison of ``name`` with tuned Adam."""
    table = []
    for task in result.tasks:
        comparison, adam = task.comparisons[name], task.baselines["adam"]
        table.append({
            "entry": task.entry.label, "task": task.index, "adam_lr": adam.best_lr,
            "adam_steps": comparison.speedup.baseline_steps, "steps": comparison.speedup.rule_steps,
            "speedup": comparison.speedup.value, "reached": comparison.speedup.reached,
            "final_loss": comparison.final_train_loss, "adam_final_loss": task.final_loss("adam", "train"),
            "final_loss_ratio": comparison.train_loss_ratio,
        })
    return table


def print_table(name: str, table: list[dict], result: SuiteResult) -> None:
    print(f"\n{name}")
    print(f"{'task-seed':<22}{'adam lr':>9}{'adam steps':>11}{'steps':>7}{'speedup':>9}"
          f"{'final loss':>12}{'adam final':>12}{'ratio':>7}")
    for r in table:
        steps = str(r["steps"]) if r["reached"] else "never"
        print(f"{r['entry'] + ' #' + str(r['task']):<22}{r['adam_lr']:>9.3g}{r['adam_steps']:>11}{steps:>7}"
              f"{r['speedup']:>9.3f}{r['final_loss']:>12.4f}{r['adam_final_loss']:>12.4f}{r['final_loss_ratio']:>7.2f}")
    h = result.headline(name)
    ratios = sorted(r["final_loss_ratio"] for r in table)
    print(f"median speedup {h['median']:.3f} (IQM {h['iqm']:.3f}); target reached on {h['reached']}/{h['tasks']} "
          f"task-seeds; final loss / tuned Adam's: median {h['final_train_loss_ratio_median']:.2f}, "
          f"range {ratios[0]:.2f}..{ratios[-1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", action="append", help="Pretrained name or MetaOptimizer file (repeatable).")
    parser.add_argument("--seeds", type=int, default=1, help="Run seeds per task (default 1).")
    parser.add_argument("--baseline-cache", default=None, help="Folder reusing tuned Adam's runs across calls.")
    parser.add_argument("--json", default=None, help="Write the per-task-seed rows here.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    specs = args.optimizer or ["lstm-digits-mlp"]
    rules = {(Path(s).stem if Path(s).is_file() else s): load_optimizer(s) for s in specs}
    suite = make_suite("outside_family", seeds=tuple(range(args.seeds)))
    adam = [b for b in default_baselines() if b.name == "adam"]
    started = time.perf_counter()
    result = run_suite(suite, {name: (lambda rule=rule: rule) for name, rule in rules.items()}, baselines=adam,
                       cache=args.baseline_cache)
    print(f"suite {suite.name}: {suite.description}; {time.perf_counter() - started:.0f} s, one thread")
    tables = {name: rows(result, name) for name in rules}
    for name, table in tables.items():
        print_table(name, table, result)
    if args.json:
        summary = {name: result.headline(name) for name in rules}
        Path(args.json).write_text(json.dumps({"rows": tables, "headline": summary}, indent=1, default=float))


if __name__ == "__main__":
    main()
