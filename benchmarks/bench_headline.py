"""Issue 3's headline with its ablations: where the shipped LSTM's speedup over tuned Adam comes from.

Runs a suite (default: ``heldout``) with, side by side and against the same tuned baselines:

* ``shipped``: ``metaoptimizer.pretrained.load('lstm-digits-mlp')``;
* ``shipped-no-lstm``: the shipped rule with its LSTM head zeroed (learned skip path and schedule);
* ``untrained``: the demo configuration as initialised (seed 0), before meta-training;
* ``prior``: the untrained rule with its LSTM head zeroed (Adam-like skip path, warmup + cosine);
* ``adam-warmup-cosine``: hand-designed Adam at the prior's learning rate with a warmup over 5% of
  the budget then cosine decay to 0 (``metaoptimizer.schedules.warmup_cosine``).

    python benchmarks/bench_headline.py [--suite heldout] [--baseline-cache DIR] [--out DIR]

``--baseline-cache`` reuses tuned baselines from earlier runs (e.g. ``metaopt eval --baseline-cache``).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from metaoptimizer import pretrained
from metaoptimizer.demo import DEMO_CONFIG
from metaoptimizer.evaluate.report import write_report
from metaoptimizer.evaluate.runner import run_suite
from metaoptimizer.evaluate.suites import SUITES, make_suite
from metaoptimizer.facade import MetaOptimizer
from metaoptimizer.rules.hand import Adam
from metaoptimizer.rules.lstm import LSTMRule
from metaoptimizer.schedules import ScheduledRule, warmup_cosine


def without_lstm(rule: LSTMRule) -> LSTMRule:
    """A copy of ``rule`` whose LSTM head outputs zero: the skip path under the schedule alone."""
    rule = copy.deepcopy(rule)
    with torch.no_grad():
        rule.head.weight.zero_()
        rule.head.bias.zero_()
    return rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="heldout", choices=sorted(SUITES))
    parser.add_argument("--baseline-cache", default=None)
    parser.add_argument("--out", default=None, help="Folder for the full report (optional).")
    parser.add_argument("--data-dir", default=None, help="Tiny Shakespeare folder (architectures suite).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shipped = pretrained.load("lstm-digits-mlp").rule
    torch.manual_seed(DEMO_CONFIG.seed)
    untrained = MetaOptimizer(None, DEMO_CONFIG).rule
    lr = DEMO_CONFIG.rule_options["init_lr"]

    def adam_warmup_cosine() -> ScheduledRule:
        # run_rule tells budget-aware rules the budget; this hand rule reads it from the suite.
        return ScheduledRule(Adam(lr), warmup_cosine(max(1, round(0.05 * steps)), steps))

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
    result = run_suite(suite, optimizers, cache=args.baseline_cache, progress=False)
    print(f"suite {args.suite} ({suite.description}); {time.perf_counter() - started:.0f} s; "
          f"speedup over tuned Adam (constant lr, tuned per task):")
    for name in optimizers:
        print("  " + result.headline_line(name))
    if args.out:
        print(f"report: {write_report(result, args.out).markdown}")


if __name__ == "__main__":
    main()
