"""Runs against torch.optim, divergence, comparisons on hand-made curves, and small suites."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metaoptimizer.evaluate.baselines import Baseline, TuningResult
from metaoptimizer.evaluate.runner import Curve, compare, run_rule, run_seeds, run_suite
from metaoptimizer.evaluate.suites import Suite, SuiteEntry, make_suite
from metaoptimizer.rules.hand import SGD, Adam, Momentum
from metaoptimizer.tasks import QuadraticFamily, QuadraticTask, make_family


@pytest.fixture(scope="module")
def digits_task():
    return make_family("digits_mlp", widths=16, depths=1, activations="relu", n_examples=200).task(0, "heldout")


def test_run_rule_matches_a_torch_optim_adam_loop(digits_task):
    steps, seed = 25, 4
    curve = run_rule(Adam(lr=0.01), digits_task, steps=steps, seed=seed, eval_every=10, eval_batches=2)

    model = digits_task.model_factory()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(digits_task.init_params(seed)[name])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    batches = digits_task.train_batches(seed)
    expected = []
    for _ in range(steps):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        expected.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    np.testing.assert_allclose(curve.train_loss, expected, rtol=1e-5)

    valid = list(itertools.islice(digits_task.valid_batches(seed), 2))
    with torch.no_grad():
        final_loss = np.mean([F.cross_entropy(model(x), y).item() for x, y in valid])
        final_accuracy = np.mean([(model(x).argmax(-1) == y).float().mean().item() for x, y in valid])
    assert curve.final("loss") == pytest.approx(final_loss, rel=1e-5)
    assert curve.final("accuracy") == pytest.approx(final_accuracy)
    assert curve.eval_steps.tolist() == [0, 10, 20, 25]
    assert not curve.diverged and curve.seconds > 0
    assert math.isnan(curve.final("perplexity"))


def test_runs_are_deterministic_in_the_seed(digits_task):
    first, second = run_seeds(lambda: Adam(lr=0.01), digits_task, steps=8, seeds=(1, 1))
    other = run_rule(Adam(lr=0.01), digits_task, steps=8, seed=2)
    np.testing.assert_array_equal(first.train_loss, second.train_loss)
    assert not np.array_equal(first.train_loss, other.train_loss)


def test_a_diverging_run_is_recorded_not_raised(digits_task):
    curve = run_rule(SGD(lr=1e30), digits_task, steps=20, seed=0, eval_every=5)
    assert curve.diverged
    k = curve.diverged_at
    assert 1 < k <= 20
    assert np.isfinite(curve.train_loss[: k - 1]).all() and np.isinf(curve.train_loss[k - 1 :]).all()
    after = curve.eval_steps >= k
    assert np.isinf(curve.eval_metrics["loss"][after]).all()
    assert (curve.eval_metrics["accuracy"][after] == 0).all()
    assert curve.eval_metrics["loss"][0] == pytest.approx(curve.train_loss[0], rel=0.5)


class PartlyUnusedQuadratic(QuadraticTask):
    """A quadratic with an extra parameter that the loss never touches."""

    def init_params(self, seed):
        return {**super().init_params(seed), "unused": torch.ones(2)}


def test_parameters_the_loss_does_not_use_get_zero_gradients():
    curve = run_rule(Adam(lr=0.1), PartlyUnusedQuadratic(0, dim=3), steps=5, seed=0)
    assert np.isfinite(curve.train_loss).all() and curve.train_loss[-1] < curve.train_loss[0]


def test_run_on_an_explicit_device_and_default_eval_schedule(digits_task):
    curve = run_rule(Adam(lr=0.01), digits_task, steps=3, seed=0, device="cpu")
    assert curve.eval_steps.tolist() == [0, 3]
    assert set(curve.eval_metrics) == {"loss", "accuracy"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"steps": 0}, "steps"), ({"seed": -1}, "seed"), ({"eval_every": 0}, "eval_every"),
     ({"eval_batches": 0}, "eval_batches")],
)
def test_run_rule_rejects_bad_arguments(digits_task, kwargs, match):
    options = {"steps": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        run_rule(Adam(), digits_task, **options)


def test_run_seeds_needs_seeds_and_reports_each_run(digits_task):
    with pytest.raises(ValueError, match="at least one seed"):
        run_seeds(Adam, digits_task, steps=2, seeds=())
    calls = []
    run_seeds(Adam, digits_task, steps=2, seeds=(0, 1, 2), on_run=lambda: calls.append(1))
    assert len(calls) == 3


def hand_curve(train_loss, loss=1.0, accuracy=0.5):
    train = np.asarray(train_loss, dtype=float)
    diverged = np.flatnonzero(~np.isfinite(train))
    evaluations = {"loss": np.array([2.0, loss]), "accuracy": np.array([0.1, accuracy])}
    return Curve(train, np.array([0, train.size]), evaluations, int(diverged[0]) + 1 if diverged.size else None, 0.0)


def test_compare_on_hand_made_curves_gives_closed_form_numbers():
    t = np.arange(1, 61, dtype=float)
    reference = TuningResult("adam", window=1)
    reference.add(0.1, [hand_curve(1 / t, loss=0.4, accuracy=0.8), hand_curve(1 / t, loss=0.6, accuracy=0.6)])
    reference.add(0.01, [hand_curve(2 / t, loss=1.0, accuracy=0.5)] * 2)
    fast = [hand_curve(1 / (2 * t), loss=0.25, accuracy=0.9), hand_curve(1 / (2 * t), loss=0.25, accuracy=0.7)]
    result = compare(fast, reference, window=1)
    assert (result.speedup.value, result.speedup.rule_steps, result.speedup.baseline_steps) == (2.0, 30, 60)
    assert result.final_train_loss == pytest.approx(1 / 120)
    assert result.train_loss_ratio == pytest.approx(0.5)
    assert result.valid_loss_ratio == pytest.approx(0.25 / 0.5)
    assert result.accuracy_ratio == pytest.approx(0.8 / 0.7)
    assert result.diverged_seeds == 0

    half_diverged = [hand_curve(1 / (2 * t)), hand_curve(np.r_[1 / (2 * t[:10]), np.full(50, np.nan)])]
    broken = compare(half_diverged, reference, window=1)
    assert broken.diverged_seeds == 1 and not broken.speedup.reached
    assert broken.train_loss_ratio == math.inf


def small_suite(steps=12, seeds=(0, 1), num_tasks=1):
    return make_suite("smoke", steps=steps, seeds=seeds, num_tasks=num_tasks)


def test_a_rule_identical_to_the_tuned_reference_has_speedup_one():
    baselines = [Baseline("adam", lambda lr: Adam(lr=lr), (0.05,)),
                 Baseline("momentum", lambda lr: Momentum(lr=lr), (0.1, 0.3))]
    result = run_suite(small_suite(), {"same": lambda: Adam(lr=0.05)}, baselines=baselines)
    (task,) = result.tasks
    same = task.comparisons["same"]
    assert same.speedup.reached and same.speedup.value == 1.0
    assert same.train_loss_ratio == same.valid_loss_ratio == same.accuracy_ratio == 1.0
    assert set(task.comparisons) == {"same", "momentum"}
    assert task.baselines["momentum"].lrs == [0.1, 0.3]
    assert task.window == 1 and result.seconds > 0
    assert result.compared() == ["same", "momentum"]
    summary = result.summary()
    assert summary["same"]["speedup"].median == 1.0
    assert result.summary("digits_mlp_tiny") == summary
    headline = result.headline("same")
    assert headline == {"median": 1.0, "iqm": 1.0, "per_task": [1.0], "reached": 1, "tasks": 1,
                        "final_train_loss_ratio_median": 1.0}
    assert result.headline_line("same").startswith("same: speedup median 1.000")
    assert result.groups() == ["digits_mlp_tiny"]


def test_run_suite_with_an_injected_family_and_optuna_tuner():
    """Quadratics report no accuracy: accuracy ratios are NaN and left out of the summary."""
    suite = Suite("quad", "quadratics", (SuiteEntry("quadratic", "quadratic", (0, 1), 10, (0,)),))
    made = []

    def family_factory(name, **kwargs):
        made.append(name)
        return QuadraticFamily(dim=4)

    baselines = [Baseline("adam", lambda lr: Adam(lr=lr), (1e-2, 1.0))]
    reports = []
    result = run_suite(suite, {"sgd": lambda: SGD(lr=1e-3)}, baselines=baselines, tuner="optuna", trials=3,
                       family_factory=family_factory, progress=reports.append)
    assert made == ["quadratic"]
    # one report per run (2 tasks x (3 trials + 1 optimizer) x 1 seed), counting up to the total
    assert [r.done for r in reports] == list(range(1, 9)) and {r.total for r in reports} == {8}
    assert reports[0].label == "quad: quadratic #0" and reports[-1].label == "quad: quadratic #1"
    assert len(result.tasks) == 2 and result.tuner == "optuna"
    assert all(len(t.baselines["adam"].lrs) <= 3 for t in result.tasks)
    accuracy = result.summary()["sgd"]["accuracy_ratio"]
    assert accuracy.count == 0 and accuracy.excluded == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"reference": "sgd"}, "not among the baselines"), ({"tuner": "random"}, "tuner"),
     ({"window_fraction": 0.0}, "fraction"), ({"optimizers": {"adam": Adam}}, "clash"),
     ({"optimizers": {}, "baselines": [Baseline("adam", Adam, (0.1,))]}, "nothing to compare")],
)
def test_run_suite_rejects_bad_options(kwargs, match):
    options = {"optimizers": {"mine": Adam}, **kwargs}
    with pytest.raises(ValueError, match=match):
        run_suite(small_suite(), options.pop("optimizers"), **options)
