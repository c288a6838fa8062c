"""Learning-rate tuning: grids, the best lr on a quadratic (closed form), divergence, Optuna."""

import itertools
import math

import numpy as np
import pytest
import torch

from metaoptimizer.evaluate.baselines import Baseline, TuningResult, default_baselines, log_grid, tune_lr
from metaoptimizer.evaluate.runner import run_seeds
from metaoptimizer.rules.hand import SGD, Adam, Momentum, RMSProp
from metaoptimizer.tasks.base import Task

CURVATURE = 4.0


class IsotropicQuadratic(Task):
    """loss = h/2 * ||theta||^2 with theta0 = ones(3): SGD multiplies theta by (1 - lr h) per step."""

    name = "isotropic_quadratic"

    def init_params(self, seed):
        return {"theta": torch.ones(3, dtype=torch.float64)}

    def loss(self, params, batch):
        return 0.5 * CURVATURE * params["theta"].square().sum()

    def train_batches(self, seed):
        return itertools.repeat((torch.zeros(1), torch.zeros(1)))

    valid_batches = train_batches


def closed_form_losses(lr, steps):
    """Loss at step k (before update k): 3h/2 * (1 - lr h)^(2(k-1))."""
    k = np.arange(1, steps + 1)
    return 1.5 * CURVATURE * (1 - lr * CURVATURE) ** (2 * (k - 1))


def quadratic_run(steps=6, seeds=(0,)):
    task = IsotropicQuadratic()
    return lambda factory: run_seeds(factory, task, steps=steps, seeds=seeds)


SGD_GRID = tuple(x / CURVATURE for x in (0.1, 0.5, 1.0, 1.5, 1.9))


def test_log_grid_is_log_spaced_and_inclusive():
    grid = log_grid(1e-4, 10**-0.5)
    assert len(grid) == 8
    assert grid[0] == pytest.approx(1e-4) and grid[-1] == pytest.approx(10**-0.5)
    np.testing.assert_allclose(np.diff(np.log10(grid)), 0.5)
    assert log_grid(0.1, 0.1) == (0.1,)
    assert len(log_grid(1e-3, 1.0, per_decade=3)) == 10


@pytest.mark.parametrize(
    ("low", "high", "per_decade", "match"),
    [(0.0, 1.0, 2, "low"), (1.0, -1.0, 2, "high"), (1.0, 0.1, 2, "high must be >= low"), (0.1, 1.0, 0, "per_decade")],
)
def test_log_grid_rejects_bad_bounds(low, high, per_decade, match):
    with pytest.raises(ValueError, match=match):
        log_grid(low, high, per_decade)


def test_default_baselines_are_adam_momentum_rmsprop_on_eight_point_grids():
    baselines = {b.name: b for b in default_baselines()}
    assert list(baselines) == ["adam", "momentum", "rmsprop"]
    assert all(len(b.lrs) == 8 for b in baselines.values())
    assert isinstance(baselines["adam"].make_rule(1e-3), Adam)
    momentum = baselines["momentum"].make_rule(0.1)
    assert isinstance(momentum, Momentum) and momentum.momentum == 0.9 and momentum.lr == 0.1
    assert isinstance(baselines["rmsprop"].make_rule(1e-2), RMSProp)


@pytest.mark.parametrize("lrs", [(), (0.1, -1.0), (0.1, math.nan)])
def test_baseline_rejects_empty_or_non_positive_grids(lrs):
    with pytest.raises(ValueError, match="learning rate"):
        Baseline("sgd", lambda lr: SGD(lr=lr), lrs)


def test_grid_tuning_picks_the_exact_newton_step_on_a_quadratic():
    """lr = 1/h solves the quadratic in one step; every grid point's losses match the closed form."""
    result = tune_lr(Baseline("sgd", lambda lr: SGD(lr=lr), SGD_GRID), quadratic_run(), window=1)
    assert result.best_lr == 1.0 / CURVATURE
    assert result.lrs == sorted(SGD_GRID)
    for lr in SGD_GRID:
        np.testing.assert_allclose(result.runs[lr][0].train_loss, closed_form_losses(lr, 6), rtol=1e-12, atol=1e-300)
        assert result.objective(lr) == pytest.approx(closed_form_losses(lr, 6).min(), rel=1e-12, abs=1e-300)
    np.testing.assert_allclose(result.envelope(), np.minimum.reduce([closed_form_losses(lr, 6) for lr in SGD_GRID]))


def test_tuning_records_diverged_learning_rates_without_crashing():
    """lr h = 1e120: the loss is 6e240 at step 2 and overflows float64 at step 3 (diverged)."""
    grid = (1e120 / CURVATURE, 0.5 / CURVATURE)
    result = tune_lr(Baseline("sgd", lambda lr: SGD(lr=lr), grid), quadratic_run(steps=5), window=2)
    diverged = result.runs[grid[0]][0]
    assert diverged.diverged and diverged.diverged_at == 3
    assert np.isinf(diverged.train_loss[2:]).all() and np.isfinite(diverged.train_loss[:2]).all()
    assert diverged.train_loss[1] == pytest.approx(6e240, rel=1e-9)
    assert result.objective(grid[0]) == 6.0  # smoothed: [6, 3e240, inf, inf, inf]
    assert result.best_lr == grid[1]


def test_optuna_tuning_searches_the_grid_range_reproducibly():
    baseline = Baseline("sgd", lambda lr: SGD(lr=lr), (0.05 / CURVATURE, 1.9 / CURVATURE))
    first = tune_lr(baseline, quadratic_run(), window=1, method="optuna", trials=8, seed=3)
    second = tune_lr(baseline, quadratic_run(), window=1, method="optuna", trials=8, seed=3)
    assert first.lrs == second.lrs
    assert 1 <= len(first.lrs) <= 8
    assert all(0.05 / CURVATURE <= lr <= 1.9 / CURVATURE for lr in first.lrs)
    best = first.best_lr
    assert first.objective(best) == min(first.objective(lr) for lr in first.lrs)
    # the best trial beats the grid's own end points
    assert first.objective(best) <= closed_form_losses(1.9 / CURVATURE, 6).min()


def test_optuna_needs_a_range():
    with pytest.raises(ValueError, match="range"):
        tune_lr(Baseline("sgd", lambda lr: SGD(lr=lr), (0.1,)), quadratic_run(), window=1, method="optuna")


@pytest.mark.parametrize(("kwargs", "match"), [({"method": "bayes"}, "method"), ({"window": 0}, "window"),
                                               ({"method": "optuna", "trials": 0}, "trials")])
def test_tune_lr_rejects_bad_options(kwargs, match):
    options = {"window": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        tune_lr(Baseline("sgd", lambda lr: SGD(lr=lr), (0.1, 0.2)), quadratic_run(), **options)


def test_an_empty_tuning_result_has_no_best_lr():
    with pytest.raises(ValueError, match="no learning rate"):
        TuningResult("adam", window=1).best_lr  # noqa: B018
