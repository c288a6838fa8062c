"""The on-disk cache of tuned baselines: hits reproduce the computed results exactly, misses and
unreadable entries recompute."""

import numpy as np
import pytest

from metaoptimizer.evaluate.baselines import Baseline
from metaoptimizer.checkpoint import load_checkpoint, save_checkpoint
from metaoptimizer.evaluate.cache import KIND, BaselineCache
from metaoptimizer.evaluate.runner import run_suite
from metaoptimizer.evaluate.suites import Suite, SuiteEntry
from metaoptimizer.rules.hand import SGD, Adam
from metaoptimizer.tasks import QuadraticFamily

SUITE = Suite("quad", "quadratics", (SuiteEntry("quadratic", "quadratic", (0, 1), 12, (0, 1)),))


def _family(name, **kwargs):
    return QuadraticFamily(dim=4)


def _run(cache, baselines=None, tuner="grid"):
    baselines = baselines or [Baseline("adam", lambda lr: Adam(lr=lr), (1e-2, 1e-1))]
    return run_suite(SUITE, {"sgd": lambda: SGD(lr=1e-2)}, baselines=baselines, family_factory=_family,
                     cache=cache, tuner=tuner, trials=2)


def _assert_same(a, b):
    for task_a, task_b in zip(a.tasks, b.tasks, strict=True):
        for name, tuned in task_a.baselines.items():
            other = task_b.baselines[name]
            assert tuned.lrs == other.lrs
            for lr in tuned.lrs:
                for ca, cb in zip(tuned.runs[lr], other.runs[lr], strict=True):
                    np.testing.assert_array_equal(ca.train_loss, cb.train_loss)
                    np.testing.assert_array_equal(ca.eval_steps, cb.eval_steps)
                    assert ca.eval_metrics.keys() == cb.eval_metrics.keys()
                    assert ca.diverged_at == cb.diverged_at
        ca, cb = task_a.comparisons["sgd"], task_b.comparisons["sgd"]
        assert ca.speedup == cb.speedup
        np.testing.assert_array_equal([ca.train_loss_ratio, ca.valid_loss_ratio, ca.accuracy_ratio],
                                      [cb.train_loss_ratio, cb.valid_loss_ratio, cb.accuracy_ratio])


@pytest.mark.parametrize("tuner", ["grid", "optuna"])
def test_second_run_hits_the_cache_and_reproduces_the_first(tmp_path, tuner):
    cache = BaselineCache(tmp_path / "cache")
    first = _run(cache, tuner=tuner)
    assert (cache.hits, cache.misses) == (0, 2)
    second = _run(tmp_path / "cache", tuner=tuner)  # a folder path works as well
    _assert_same(first, second)
    again = BaselineCache(tmp_path / "cache")
    _run(again, tuner=tuner)
    assert (again.hits, again.misses) == (2, 0)


def test_another_grid_or_budget_is_a_miss(tmp_path):
    cache = BaselineCache(tmp_path)
    _run(cache)
    _run(cache, baselines=[Baseline("adam", lambda lr: Adam(lr=lr), (1e-2,))])
    assert cache.misses == 4 and cache.hits == 0
    assert len(list(tmp_path.glob("adam-*.pt"))) == 4


def test_unreadable_entry_is_recomputed_with_a_warning(tmp_path):
    cache = BaselineCache(tmp_path)
    first = _run(cache)
    for entry in tmp_path.glob("*.pt"):
        entry.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable baseline cache entry"):
        second = _run(cache)
    _assert_same(first, second)
    assert cache.misses == 4


class BudgetSpy(SGD):
    """SGD that records the budget each run's state carries."""

    budget_aware = True

    def __init__(self):
        super().__init__(lr=0.01)
        self.budgets = []

    def init(self, params, *, num_steps=None):
        self.budgets.append(num_steps)
        return super().init(params, num_steps=num_steps)


def test_runs_tell_budget_aware_rules_the_budget(tmp_path):
    rule = BudgetSpy()
    run_suite(SUITE, {"spy": lambda: rule}, baselines=[Baseline("adam", lambda lr: Adam(lr=lr), (1e-2,)),
                                                        Baseline("sgd", lambda lr: SGD(lr=lr), (1e-2,))],
              family_factory=_family)
    assert rule.budgets and set(rule.budgets) == {12}


def test_entry_holding_another_key_is_recomputed(tmp_path):
    cache = BaselineCache(tmp_path)
    first = _run(cache)
    for entry in tmp_path.glob("*.pt"):
        stored = load_checkpoint(entry, expected_kind=KIND)
        payload = {k: v for k, v in stored.items() if k not in ("format", "kind", "version", "config")}
        payload["key"]["task"] = "another task"
        save_checkpoint(entry, kind=KIND, payload=payload)
    with pytest.warns(UserWarning, match="holds another key"):
        second = _run(cache)
    _assert_same(first, second)
