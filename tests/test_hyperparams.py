"""Meta-learned hand-rule hyperparameters: equivalence with the hand rules, meta-gradients against
finite differences, per-tensor rates, errors (the optax line-fit example: test_cli_lr_example.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaoptimizer.meta.hyperparams import LearnedHyperparameters
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


@settings(max_examples=25, deadline=None)
@given(lr=st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0 < v < 1))
def test_sigmoid_rates_must_start_in_the_unit_interval(lr):
    with pytest.raises(ValueError):
        LearnedHyperparameters("sgd", lr, lr_parametrisation="sigmoid")
