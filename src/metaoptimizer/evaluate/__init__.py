"""Evaluation against tuned baselines: runs, learning-rate tuning, steps-to-target metrics,
suites and reports (markdown, JSON, PNG).

``metaopt eval`` (:mod:`metaoptimizer.cli.eval`) runs a suite and writes its report; optimizers named
by a string (pretrained names, checkpoint files, ``adam:lr=0.001``) are loaded by
:func:`metaoptimizer.evaluate.loading.load_optimizer`.
"""

from __future__ import annotations

from metaoptimizer.evaluate.baselines import Baseline, TuningResult, default_baselines, log_grid, tune_lr
from metaoptimizer.evaluate.metrics import (
    Speedup,
    Summary,
    interquartile_mean,
    lower_envelope,
    ratio,
    seed_mean,
    smooth,
    smoothing_window,
    speedup,
    steps_to_target,
    summarize,
)
from metaoptimizer.evaluate.report import ReportFiles, write_report
from metaoptimizer.evaluate.runner import (
    Comparison,
    Curve,
    SuiteResult,
    TaskResult,
    compare,
    run_rule,
    run_seeds,
    run_suite,
)
from metaoptimizer.evaluate.suites import SUITES, Suite, SuiteEntry, make_suite

__all__ = [
    "SUITES",
    "Baseline",
    "Comparison",
    "Curve",
    "ReportFiles",
    "Speedup",
    "Suite",
    "SuiteEntry",
    "SuiteResult",
    "Summary",
    "TaskResult",
    "TuningResult",
    "compare",
    "default_baselines",
    "interquartile_mean",
    "log_grid",
    "lower_envelope",
    "make_suite",
    "ratio",
    "run_rule",
    "run_seeds",
    "run_suite",
    "seed_mean",
    "smooth",
    "smoothing_window",
    "speedup",
    "steps_to_target",
    "summarize",
    "tune_lr",
    "write_report",
]
