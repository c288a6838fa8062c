"""torch.optim optimizers as deployment-only rules: same trajectories as their own loop, the
schedule-free evaluation point, no mutated inputs, clear errors; the warmup-cosine wrapper."""

import pytest
import torch
from prodigyopt import Prodigy
from schedulefree import AdamWScheduleFree

from metaoptimizer.evaluate.baselines import ScaleByWarmupCosine, general_baselines
from metaoptimizer.evaluate.runner import run_rule
from metaoptimizer.evaluate.torch_rule import TorchOptimizerRule
from metaoptimizer.rules import AdamW, chain
from metaoptimizer.rules.base import apply_updates, from_spec, to_spec
from metaoptimizer.rules.hand import Adam
from metaoptimizer.rules.state import OptimizerState
from metaoptimizer.schedules import warmup_cosine
from metaoptimizer.tasks.quadratic import QuadraticFamily

TARGET = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]]), "b": torch.tensor([0.3, -0.7, 2.0])}


def loss_of(params):
    return sum(((params[name] - TARGET[name]) ** 2 * (1 + i)).sum() for i, name in enumerate(sorted(params)))


def initial():
    return {"w": torch.zeros(2, 2), "b": torch.ones(3)}


def native_run(optimizer_class, steps, **options):
    leaves = {name: torch.nn.Parameter(p.clone()) for name, p in initial().items()}
    optimizer = optimizer_class(list(leaves.values()), **options)
    if hasattr(optimizer, "train"):
        optimizer.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(leaves).backward()
        optimizer.step()
    trained = {name: p.detach().clone() for name, p in leaves.items()}
    if hasattr(optimizer, "eval"):
        optimizer.eval()
    return trained, {name: p.detach().clone() for name, p in leaves.items()}


def rule_run(rule, steps):
    params = initial()
    state = rule.init(params)
    for step in range(1, steps + 1):
        leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
        grads = dict(zip(leaves, torch.autograd.grad(loss_of(leaves), list(leaves.values())), strict=True))
        frozen = {name: g.clone() for name, g in grads.items()}
        updates, state = rule.update(grads, state, params)
        assert all(torch.equal(grads[name], frozen[name]) for name in grads)  # inputs are not mutated
        assert state.step_count == step
        params = apply_updates(params, updates)
    return params


@pytest.mark.parametrize("optimizer_class, options", [(Prodigy, {}), (AdamWScheduleFree, {}),
                                                      (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})])
def test_the_adapter_follows_the_optimizers_own_loop(optimizer_class, options):
    trained, evaluated = native_run(optimizer_class, 30, **options)
    rule = TorchOptimizerRule(optimizer_class, **options)
    params = rule_run(rule, 30)
    for name in trained:
        assert torch.allclose(params[name], trained[name], rtol=1e-5, atol=1e-6)
        assert torch.allclose(rule.evaluation_params(params)[name], evaluated[name], rtol=1e-5, atol=1e-6)
    moved = {name: not torch.allclose(trained[name], evaluated[name]) for name in trained}
    assert rule.switches_modes == any(moved.values())  # only schedule-free evaluates elsewhere


def test_init_starts_a_new_run():
    rule = TorchOptimizerRule(Prodigy)
    first = rule_run(rule, 10)
    again = rule_run(rule, 10)
    assert all(torch.equal(first[name], again[name]) for name in first)


def test_parameters_without_gradients_are_left_alone():
    rule = TorchOptimizerRule(torch.optim.Adam, lr=0.1)
    params = initial()
    state = rule.init(params)
    updates, _ = rule.update({"w": torch.ones(2, 2)}, state, params)
    assert set(updates) == {"w"} and torch.allclose(updates["w"], torch.full((2, 2), -0.1))


def test_the_runner_evaluates_at_the_rules_evaluation_point():
    class ZeroEvaluation(TorchOptimizerRule):
        def evaluation_params(self, params):
            return {name: torch.zeros_like(p) for name, p in params.items()}

    task = QuadraticFamily(dim=4).task(0)
    curve = run_rule(ZeroEvaluation(torch.optim.SGD, lr=0.01), task, steps=5, seed=0, eval_batches=1)
    zero = {name: torch.zeros_like(p) for name, p in task.init_params(0).items()}
    expected = task.metrics(zero, next(iter(task.valid_batches(0))))["loss"]
    assert curve.eval_metrics["loss"] == pytest.approx([expected, expected])


def test_adapter_errors_are_clear():
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        TorchOptimizerRule(Adam)
    rule = TorchOptimizerRule(Prodigy)
    started = OptimizerState(step_count=1)
    with pytest.raises(ValueError, match="call init"):
        rule.update({"w": torch.ones(2)}, started, {"w": torch.zeros(2)})
    rule.init({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="call init"):  # another model's parameters
        rule.update({"v": torch.ones(2)}, started, {"v": torch.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        rule.update({"w": torch.ones(3)}, started, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="not a registered rule"):
        to_spec(rule)


def test_warmup_cosine_scales_adamw_like_a_torch_scheduler_over_the_budget():
    rule = chain(AdamW(lr=0.1), ScaleByWarmupCosine(warmup_fraction=0.2))
    leaves = {name: torch.nn.Parameter(p.clone()) for name, p in initial().items()}
    optimizer = torch.optim.AdamW(list(leaves.values()), lr=0.1)
    schedule = warmup_cosine(2, 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: float(schedule(step)))
    params = initial()
    state = rule.init(params, num_steps=10)
    for _ in range(10):
        optimizer.zero_grad()
        loss_of(leaves).backward()
        optimizer.step()
        scheduler.step()
        tracked = {name: p.clone().requires_grad_(True) for name, p in params.items()}
        grads = dict(zip(tracked, torch.autograd.grad(loss_of(tracked), list(tracked.values())), strict=True))
        updates, state = rule.update(grads, state, params)
        params = apply_updates(params, updates)
    for name in params:
        assert torch.allclose(params[name], leaves[name].detach(), atol=1e-6)


def test_warmup_cosine_needs_its_budget():
    with pytest.raises(ValueError, match="warmup_fraction"):
        ScaleByWarmupCosine(warmup_fraction=1.0)
    rule = chain(Adam(), ScaleByWarmupCosine())
    with pytest.raises(ValueError, match="budget-aware: pass the run's length"):
        rule.init({"w": torch.ones(1)})
    with pytest.raises(ValueError, match="at least 2 steps"):
        rule.init({"w": torch.ones(1)}, num_steps=1)
    assert from_spec(to_spec(rule)).members["1"].warmup_fraction == 0.05


def test_general_baselines_are_the_users_alternatives():
    baselines = {b.name: b for b in general_baselines()}
    assert list(baselines) == ["adam", "adam-default", "adamw-warmup-cosine", "prodigy", "schedule-free-adamw"]
    assert len(baselines["adam"].lrs) == 8 and baselines["adamw-warmup-cosine"].lrs == baselines["adam"].lrs
    assert baselines["adam-default"].lrs == (1e-3,) and baselines["prodigy"].lrs == (1.0,)
    assert baselines["schedule-free-adamw"].lrs == (0.0025,)
    assert isinstance(baselines["prodigy"].make_rule(1.0), TorchOptimizerRule)
