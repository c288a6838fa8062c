"""Shared by the benchmarks that meta-train rules and then score them: speedups over tuned Adam."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from metaoptimizer.evaluate.baselines import default_baselines
from metaoptimizer.evaluate.runner import run_suite
from metaoptimizer.evaluate.suites import Suite
from metaoptimizer.rules.base import UpdateRule


def speedups_over_tuned_adam(trained: Mapping[str, UpdateRule], suite: Suite, header: str) -> dict[str, Any]:
    """Run ``suite`` with a copy of each trained rule against tuned Adam only, print ``header`` and
    one line per rule, and return :meth:`SuiteResult.headline` per rule."""
    adam = [b for b in default_baselines() if b.name == "adam"]
    factories = {name: (lambda rule=rule: copy.deepcopy(rule)) for name, rule in trained.items()}
    result = run_suite(suite, factories, baselines=adam)
    print(header)
    for name in trained:
        print("  " + result.headline_line(name))
    return {name: result.headline(name) for name in trained}
