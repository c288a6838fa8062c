"""Issue 3's headline with its ablations: where the shipped LSTM's speedup over tuned Adam comes from.

Runs a suite (default: ``heldout``) with, side by side and against the same tuned baselines:

* ``shipped``: ``metaoptimizer.pretrained.load('lstm-digits-mlp')``;
* ``shipped-no-lstm``: the shipped rule with its LSTM head zeroed (learned skip path and schedule);
* ``untrained``: the demo configuration as initialised (seed 0), before meta-training;
* ``prior``: the untrained rule with its LSTM head zeroed (Adam-like skip path, warmup + cosine);
* ``adam-warmup-cosine``: hand-designed Adam at the prior's learning rate with a warmup over 5% of
  the budget then cosine decay to 0 (``metaoptimizer.schedules.warmup_cosine``);
* with ``--tuned-schedule``, one more baseline, ``tuned-adam-warmup-cosine``: the same schedule with
  Adam's learning rate tuned per task on Adam's grid, the fairer hand-designed competitor of a
  budget-aware rule (its speedup is also against tuned constant-lr Adam).

    python benchmarks/bench_headline.py [--suite heldout] [--baseline-cache DIR] [--out DIR] [--tuned-schedule]

``--baseline-cache`` reuses tuned baselines from earlier runs (e.g. ``metaopt eval --baseline-cache``).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from metaoptimizer import pretrained
from metaoptimizer.meta.loop import build_config_rule
from metaoptimizer.evaluate.baselines import Baseline, default_baselines
from metaoptimizer.evaluate.report import write_report
from metaoptimizer.evaluate.runner import run_suite
from metaoptimizer.evaluate.suites import SUITES, make_suite
from metaoptimizer.rules import Adam, NamedChain, named_chain, scale_by_schedule
from metaoptimizer.schedules import warmup_cosine


def without_lstm(rule: NamedChain) -> NamedChain:
    """A copy of the budget-aware LSTM chain whose LSTM head outputs zero: the skip path under the
    schedule alone."""
    rule = copy.deepcopy(rule)
    with torch.no_grad():
        rule.members["lstm"].head.weight.zero_()
        rule.members["lstm"].head.bias.zero_()
    return rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="heldout", choices=sorted(SUITES))
    parser.add_argument("--baseline-cache", default=None)
    parser.add_argument("--out", default=None, help="Folder for the full report (optional).")
    parser.add_argument("--data-dir", default=None, help="Tiny Shakespeare folder (architectures suite).")
    parser.add_argument("--tuned-schedule", action="store_true", help="Add Adam + warmup-cosine, lr tuned per task.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shipped = pretrained.load("lstm-digits-mlp").rule
    recipe = pretrained.recipe("lstm-digits-mlp")
    torch.manual_seed(recipe.optimizer.seed)
    untrained = build_config_rule(recipe)
    lr = recipe.rule["lstm"]["init_lr"]

    def adam_warmup_cosine(lr: float = lr) -> NamedChain:
        return named_chain(adam=Adam(lr), schedule=scale_by_schedule(warmup_cosine(max(1, round(0.05 * steps)), steps)))

    optimizers = {
        "shipped": lambda: shipped,
        "shipped-no-lstm": lambda: without_lstm(shipped),
        "untrained": lambda: untrained,
        "prior": lambda: without_lstm(untrained),
        "adam-warmup-cosine": adam_warmup_cosine,
    }
    kwargs = {"data_dir": args.data_dir} if args.suite == "architectures" and args.data_dir else {}
    suite = make_suite(args.suite, **kwargs)
    (steps,) = {entry.steps for entry in suite.entries}
    started = time.perf_counter()
    baselines = default_baselines()
    if args.tuned_schedule:
        adam_grid = next(b.lrs for b in baselines if b.name == "adam")
        baselines.append(Baseline("tuned-adam-warmup-cosine", adam_warmup_cosine, adam_grid))
    result = run_suite(suite, optimizers, baselines=baselines, cache=args.baseline_cache)
    print(f"suite {args.suite} ({suite.description}); {time.perf_counter() - started:.0f} s; "
          f"speedup over tuned Adam (constant lr, tuned per task):")
    for name in [*optimizers, *(["tuned-adam-warmup-cosine"] if args.tuned_schedule else [])]:
        print("  " + result.headline_line(name))
    if args.tuned_schedule:
        tuned = [t.baselines["tuned-adam-warmup-cosine"].best_lr for t in result.tasks]
        print(f"  tuned-adam-warmup-cosine learning rates per task: {tuned}")
    if args.out:
        print(f"report: {write_report(result, args.out).markdown}")


if __name__ == "__main__":
    main()
