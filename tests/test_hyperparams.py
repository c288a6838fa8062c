"""Meta-learned hand-rule hyperparameters: equivalence with the hand rules, meta-gradients against
finite differences, per-tensor rates, the optax line-fit example's direction of travel, errors."""

from __future__ import annotations

import json
import math
import runpy
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaoptimizer.meta.hyperparams import (
    LearnedHyperparameters,
    NoisyLineFamily,
    NoisyLineTask,
    lr_example_command,
    meta_learn_line_fit,
)
from metaoptimizer.meta.unroll import detach_params, unroll
from metaoptimizer.rules.base import apply_updates
from metaoptimizer.rules.hand import Adam, Momentum, RMSProp
from metaoptimizer.tasks.quadratic import QuadraticTask

DTYPE = torch.float64


def params64(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 2, generator=g, dtype=DTYPE), "b": torch.randn(2, generator=g, dtype=DTYPE)}


def loss_fn(params) -> torch.Tensor:
    return (params["w"].sin().sum(0) * params["b"]).square().sum() + params["w"].square().sum()


def run(rule, params, steps: int, loss=loss_fn):
    state = rule.init(params)
    trajectory = []
    for step in range(1, steps + 1):
        grads = dict(zip(params, torch.autograd.grad(loss(params), list(params.values())), strict=True))
        updates, state = rule.update(grads, state, params)
        params = apply_updates(params, updates)
        trajectory.append(params)
    return trajectory


def leaves(params):
    return {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}


@pytest.mark.parametrize(
    "learned,hand",
    [
        (dict(rule="adam", lr=0.01, learn=("lr", "momentum", "eps"), betas=(0.8, 0.99)), Adam(0.01, betas=(0.8, 0.99))),
        (dict(rule="rmsprop", lr=0.01, learn=("lr", "momentum"), momentum=0.5), RMSProp(0.01, momentum=0.5)),
        (dict(rule="momentum", lr=0.05, learn=("lr", "momentum"), lr_parametrisation="sigmoid"), Momentum(0.05)),
    ],
)
def test_initial_values_reproduce_the_hand_rule(learned, hand):
    rule = LearnedHyperparameters(**learned, dtype=DTYPE)
    start = params64()
    for a, b in zip(run(rule, leaves(start), 5), run(hand, leaves(start), 5), strict=True):
        for name in start:
            torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=1e-12)


def test_per_tensor_rates_apply_each_tensor_its_own_hand_rule():
    """On a loss that separates over tensors, each tensor follows Adam with its own rate."""
    rule = LearnedHyperparameters("adam", 0.01, learn=("lr", "eps"), param_names=["w", "b"], per_tensor=True, dtype=DTYPE)
    with torch.no_grad():
        rule.raw["lr"].copy_(torch.tensor([math.log(0.02), math.log(0.005)], dtype=DTYPE))
    start = params64()
    separable = lambda params: sum((p.sin() + p.square()).sum() for p in params.values())  # noqa: E731
    ours = run(rule, leaves(start), 4, separable)[-1]
    for name, lr in (("w", 0.02), ("b", 0.005)):
        reference = run(Adam(lr), leaves(start), 4, separable)[-1]
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-12, atol=1e-12)
    assert rule.learned_lr() == pytest.approx({"w": 0.02, "b": 0.005})
    assert rule.learned_values()["eps"] == pytest.approx({"w": 1e-8, "b": 1e-8})


def unrolled_meta_loss(rule, task, steps=4) -> torch.Tensor:
    params = detach_params(task.init_params(3))
    result = unroll(rule, task, params, rule.init(params), task.train_batches(0), steps, second_order=True)
    return result.meta_loss


@pytest.mark.parametrize("hyper", ["lr", "momentum"])
def test_meta_gradient_matches_finite_differences(hyper):
    task = QuadraticTask(seed=1, dim=4)
    task.w, task.y = task.w.double(), task.y.double()
    task.init_params = lambda seed: {"theta": torch.linspace(-1, 1, 4, dtype=DTYPE)}
    rule = LearnedHyperparameters("momentum", 0.01, learn=("lr", "momentum"), dtype=DTYPE)
    (grad,) = torch.autograd.grad(unrolled_meta_loss(rule, task), rule.raw[hyper])
    eps = 1e-6
    raw = rule.raw[hyper].data  # shifted in place; the unrolls themselves need autograd
    raw += eps
    up = float(unrolled_meta_loss(rule, task).detach())
    raw -= 2 * eps
    down = float(unrolled_meta_loss(rule, task).detach())
    raw += eps
    assert float(grad) == pytest.approx((up - down) / (2 * eps), rel=1e-6)
    assert abs(float(grad)) > 1e-3


def test_learned_lr_reports_global_and_fixed_rates():
    assert LearnedHyperparameters("sgd", 0.1).learned_lr() == pytest.approx({"global": 0.1})
    named = LearnedHyperparameters("adam", 0.1, learn=("eps",), param_names=["a", "b"])
    assert named.learned_lr() == {"a": 0.1, "b": 0.1}
    assert named.learned_values()["eps"] == pytest.approx({"a": 1e-8, "b": 1e-8})


def test_hyperparameters_rebuild_an_equivalent_rule():
    rule = LearnedHyperparameters("rmsprop", 0.05, learn=("lr", "momentum"), momentum=0.3, alpha=0.9)
    rebuilt = LearnedHyperparameters(**rule.hyperparameters())
    rebuilt.load_state_dict(rule.state_dict())
    assert rebuilt.hyperparameters() == rule.hyperparameters()
    assert rebuilt.learned_values() == rule.learned_values()


def test_per_tensor_rule_refuses_unknown_parameters():
    rule = LearnedHyperparameters("sgd", 0.1, param_names=["a"], per_tensor=True)
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match="no learned hyperparameters for \\['b'\\]"):
        rule.update({"b": torch.ones(2)}, rule.init(params), params)


def test_noisy_line_task_loss_and_batches():
    task = NoisyLineTask(samples_per_batch=5)
    x, y = next(task.train_batches(0))
    assert x.shape == (5,) and bool((x >= 0).all() and (x <= 10).all())
    assert float((y - 10 * x).abs().max()) < 5.0
    loss = task.loss({"theta": torch.tensor(10.0)}, (x, y))
    assert float(loss) == pytest.approx(float(0.5 * (10 * x - y).square().mean()))
    again = next(task.train_batches(0))
    assert torch.equal(again[0], x)
    assert not torch.equal(next(task.valid_batches(0))[0], x)
    assert isinstance(NoisyLineFamily(noise_std=0.5).task(3), NoisyLineTask)


def test_line_fit_lr_rises_then_decays_while_theta_reaches_ten():
    """Direction of travel of optax's example over 150 outer steps (the docs run 2000)."""
    trace = meta_learn_line_fit(outer_steps=150)
    peak = max(range(len(trace.lrs)), key=trace.lrs.__getitem__)
    assert trace.lrs[peak] > trace.lrs[0]  # far from the answer, larger steps help
    assert peak < 100 and trace.lrs[-1] < trace.lrs[peak]  # once there, the noise calls for smaller ones
    summary = trace.summary(window=50)
    assert abs(summary["theta_mean_last_50"] - 10.0) < 0.5
    assert trace.thetas[0] < 5.0
    assert not any(r.skipped for r in trace.results)


def test_lr_example_command_writes_plot_and_numbers(tmp_path, capsys):
    summary = lr_example_command(out_dir=tmp_path, outer_steps=5)
    assert (tmp_path / "lr_example.png").stat().st_size > 1000
    assert json.loads((tmp_path / "lr_example.json").read_text()) == summary
    assert '"outer_steps": 5' in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:'metaoptimizer.meta.hyperparams' found in sys.modules:RuntimeWarning")
def test_module_runs_the_example_from_the_command_line(tmp_path, monkeypatch, capsys):
    argv = ["hyperparams", "--out-dir", str(tmp_path), "--outer-steps", "3", "--seed", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("metaoptimizer.meta.hyperparams", run_name="__main__")
    assert exit_info.value.code == 0
    assert json.loads((tmp_path / "lr_example.json").read_text())["outer_steps"] == 3
    assert "lr_final" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rule="lbfgs"), "unknown hand-designed rule"),
        (dict(lr=0.0), "lr"),
        (dict(learn=()), "learn"),
        (dict(learn=("lr", "lr")), "learn"),
        (dict(learn=("beta2",)), "learn"),
        (dict(rule="sgd", learn=("momentum",)), "has no momentum"),
        (dict(rule="momentum", learn=("eps",)), "has no eps"),
        (dict(lr_parametrisation="softplus"), "lr_parametrisation"),
        (dict(lr=1.5, lr_parametrisation="sigmoid"), "start in \\(0, 1\\)"),
        (dict(rule="rmsprop", learn=("momentum",)), "start in \\(0, 1\\)"),
        (dict(rule="adam", learn=("eps",), eps=0.0), "start > 0"),
        (dict(per_tensor=True), "param_names"),
        (dict(param_names=["a", "a"]), "distinct"),
        (dict(per_tensor="yes", param_names=["a"]), "per_tensor"),
        (dict(alpha=1.0), "alpha"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LearnedHyperparameters(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(outer_steps=0), "outer_steps"),
        (dict(samples_per_step=1), "samples_per_step"),
        (dict(meta_lr=-0.1), "meta_lr"),
    ],
)
def test_line_fit_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        meta_learn_line_fit(**kwargs)


@settings(max_examples=25, deadline=None)
@given(lr=st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0 < v < 1))
def test_sigmoid_rates_must_start_in_the_unit_interval(lr):
    with pytest.raises(ValueError):
        LearnedHyperparameters("sgd", lr, lr_parametrisation="sigmoid")


def test_noisy_line_bad_arguments():
    with pytest.raises(ValueError, match="noise_std"):
        NoisyLineFamily(noise_std=-1.0)
    with pytest.raises(ValueError, match="samples_per_batch"):
        NoisyLineTask(samples_per_batch=0)
