"""Evaluation against tuned baselines: runs, learning-rate tuning, steps-to-target metrics,
suites and reports (markdown, JSON, PNG).

``metaopt eval`` (:mod:`metaoptimizer.cli.eval`) runs a suite and writes its report; optimizers named
by a string (pretrained names, checkpoint files, ``adam:lr=0.001``) are loaded by
:func:`metaoptimizer.evaluate.loading.load_optimizer`.
"""

from __future__ import annotations

from metaoptimizer.evaluate.baselines import (
    BASELINE_SETS,
    Baseline,
    TuningResult,
    ScaleByWarmupCosine,
    default_baselines,
    general_baselines,
    log_grid,
    make_baselines,
    tune_lr,
)
from metaoptimizer.evaluate.metrics import (
    Speedup,
    Summary,
    bootstrap_iqm_interval,
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
from metaoptimizer.evaluate.torch_rule import TorchOptimizerRule

__all__ = [
    "BASELINE_SETS",
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
    "TorchOptimizerRule",
    "TuningResult",
    "ScaleByWarmupCosine",
    "bootstrap_iqm_interval",
    "compare",
    "default_baselines",
    "general_baselines",
    "interquartile_mean",
    "log_grid",
    "lower_envelope",
    "make_baselines",
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
