"""The rule contract, tested generically over every rule and composite in ``rule_db.RULE_DB``."""

from __future__ import annotations

import io

import pytest
import torch

from metaoptimizer.optim import LearnedOptimizer
from metaoptimizer.rules import OptimizerState, apply_updates, from_spec, to_spec
from rule_db import RULE_DB, SHAPES, RuleInfo

NUM_STEPS = 20
RULES = pytest.mark.parametrize("info", RULE_DB, ids=[info.id for info in RULE_DB])
LEARNED = [info for info in RULE_DB if info.meta_parameters]
LEARNED_RULES = pytest.mark.parametrize("info", LEARNED, ids=[info.id for info in LEARNED])


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for name, shape in SHAPES.items()}


def make_grads(params, t):
    g = torch.Generator().manual_seed(100 + t)
    return {name: (torch.randn(p.shape, generator=g, dtype=torch.float64) / (1 + t)).to(p.dtype) for name, p in params.items()}


def quadratic_loss(params):
    return sum(((p.float() - 0.5) ** 2).sum() * (i + 1) for i, p in enumerate(params.values()))


def run(rule, params, steps, *, state=None, num_steps=NUM_STEPS, start=0):
    """``steps`` updates with fixed synthetic gradients and losses; returns (params, state, updates)."""
    state = rule.init(params, num_steps=num_steps) if state is None else state
    history = []
    for t in range(start, start + steps):
        with torch.no_grad():
            updates, state = rule.update(make_grads(params, t), state, params, loss=torch.tensor(2.0 / (1 + t)))
        params = apply_updates(params, updates)
        history.append(updates)
    return params, state, history


def assert_same(a, b, **tol):
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], **(tol or {"rtol": 0, "atol": 0}))


@RULES
def test_update_contract(info: RuleInfo):
    rule = info.make()
    assert rule.budget_aware == info.budget_aware and rule.reads_loss == info.reads_loss
    assert any(p.requires_grad for p in rule.parameters()) == info.meta_parameters
    params = make_params()
    state = rule.init(params, num_steps=NUM_STEPS)
    assert state.step_count == 0 and state.num_steps == NUM_STEPS
    for step in (1, 2, 3):
        grads = make_grads(params, step)
        updates, state = rule.update(grads, state, params, loss=1.0)
        assert set(updates) == set(grads) and state.step_count == step and state.num_steps == NUM_STEPS
        for name, u in updates.items():
            assert u.shape == params[name].shape and u.dtype == params[name].dtype and torch.isfinite(u).all()
        params = apply_updates(params, updates)


@RULES
def test_inputs_are_never_mutated(info: RuleInfo):
    rule = info.make()
    params = make_params()
    _, state, _ = run(rule, params, 2)
    grads = make_grads(params, 5)
    copies = [{k: v.clone() for k, v in d.items()} for d in (params, grads)]
    state_copy = state.map_tensors(torch.clone)
    with torch.no_grad():
        rule.update(grads, state, params, loss=1.0)
    assert_same(params, copies[0])
    assert_same(grads, copies[1])
    for slot, values in state.slots.items():
        assert_same(values, state_copy.slots[slot])


@RULES
def test_a_subset_of_gradients_updates_only_those_parameters(info: RuleInfo):
    rule = info.make()
    params = make_params()
    _, state, _ = run(rule, params, 2)
    with torch.no_grad():
        updates, new_state = rule.update({"w": make_grads(params, 3)["w"]}, state, params, loss=1.0)
    assert set(updates) == {"w"} and new_state.step_count == 3
    for slot, values in new_state.slots.items():
        for name in ("b", "s"):
            if name in values:
                assert values[name] is state.slots[slot][name]


@RULES
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
def test_every_parameter_dtype(info: RuleInfo, dtype: str):
    rule = info.make()
    params = make_params(getattr(torch, dtype))
    new_params, state, history = run(rule, params, 3)
    for updates in history:
        for name, u in updates.items():
            assert u.dtype == params[name].dtype and torch.isfinite(u).all()
    assert state.step_count == 3


@RULES
def test_a_fresh_default_state_is_initialised_by_update(info: RuleInfo):
    """The spec's usage: ``update(grads, OptimizerState(), params)`` starts a run."""
    rule = info.make()
    params = make_params()
    grads = make_grads(params, 0)
    with torch.no_grad():
        expected, expected_state = rule.update(grads, rule.init(params, num_steps=NUM_STEPS), params, loss=1.0)
        got, state = rule.update(grads, OptimizerState(num_steps=NUM_STEPS), params, loss=1.0)
    assert_same(got, expected)
    assert state.step_count == 1 and set(state.slots) == set(expected_state.slots)


@RULES
def test_the_budget_is_honoured(info: RuleInfo):
    rule = info.make()
    params = make_params()
    _, _, short = run(rule, params, 6, num_steps=8)
    _, _, long = run(rule, params, 6, num_steps=8000)
    differs = any(not torch.equal(short[-1][n], long[-1][n]) for n in params)
    assert differs == info.budget_aware
    if info.budget_aware and rule.default_num_steps is None:
        with pytest.raises(ValueError, match="budget-aware: pass the run's length"):
            rule.init(params)


@RULES
def test_adapter_matches_direct_updates_and_resumes_bit_exactly(info: RuleInfo):
    rule = info.make()
    params = make_params()
    expected, _, _ = run(rule, params, 6)

    def make_optimizer(tensors):  # foreach=False: the rule's own update (torch kernels: test_optim)
        return LearnedOptimizer(tensors, rule, total_steps=NUM_STEPS, foreach=False)

    tensors = [p.clone().requires_grad_(True) for p in params.values()]
    optimizer = make_optimizer(tensors)

    def step(t):
        for p, g in zip(tensors, make_grads(params, t).values(), strict=True):
            p.grad = g.clone()
        optimizer.step(loss=torch.tensor(2.0 / (1 + t)))

    for t in range(3):
        step(t)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    for key, value in optimizer.state[tensors[0]].items():
        assert isinstance(key, str) and isinstance(value, torch.Tensor)
    saved = [p.detach().clone() for p in tensors]
    for t in range(3, 6):
        step(t)
    torch.testing.assert_close(dict(zip(params, tensors, strict=True)), expected, rtol=0, atol=0)

    tensors = [p.clone().requires_grad_(True) for p in saved]
    optimizer = make_optimizer(tensors)
    buffer.seek(0)
    optimizer.load_state_dict(torch.load(buffer, weights_only=True))
    for t in range(3, 6):
        step(t)
    torch.testing.assert_close(dict(zip(params, tensors, strict=True)), expected, rtol=0, atol=0)


@RULES
def test_rebuilt_from_spec_gives_identical_updates(info: RuleInfo):
    rule = info.make()
    copy = from_spec(to_spec(rule))
    assert type(copy) is type(rule) and to_spec(copy) == to_spec(rule)
    copy.load_state_dict(rule.state_dict())
    params = make_params()
    _, _, a = run(rule, params, 3)
    _, _, b = run(copy, params, 3)
    for x, y in zip(a, b, strict=True):
        assert_same(x, y)


@LEARNED_RULES
def test_meta_gradients_are_finite_through_a_short_unroll(info: RuleInfo):
    rule = info.make()
    meta = [p for p in rule.parameters() if p.requires_grad]
    params = {n: p.requires_grad_(True) for n, p in make_params().items()}
    state = rule.init(params, num_steps=NUM_STEPS)
    for _ in range(3):
        loss = quadratic_loss(params)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        updates, state = rule.update(grads, state, params, loss=loss.detach())
        params = apply_updates(params, updates)
    meta_grads = torch.autograd.grad(quadratic_loss(params), meta, allow_unused=True)
    flat = torch.cat([g.reshape(-1) for g in meta_grads if g is not None])
    assert torch.isfinite(flat).all() and flat.abs().sum() > 0


@RULES
def test_a_rule_that_reads_the_loss_refuses_to_update_without_it(info: RuleInfo):
    rule = info.make()
    params = make_params()
    state = rule.init(params, num_steps=NUM_STEPS)
    if info.reads_loss:
        with pytest.raises(ValueError, match="reads the training loss"):
            rule.update(make_grads(params, 0), state, params)
    else:
        with torch.no_grad():
            rule.update(make_grads(params, 0), state, params)


@RULES
def test_bad_calls_name_the_problem(info: RuleInfo):
    rule = info.make()
    params = make_params()
    state = rule.init(params, num_steps=NUM_STEPS)
    with pytest.raises(ValueError, match="unknown parameter 'v'"):
        rule.update({"v": torch.zeros(2)}, state, params, loss=1.0)
    with pytest.raises(ValueError, match=r"shape \(3, 4\) but the parameter has shape \(4, 3\)"):
        rule.update({"w": torch.zeros(3, 4)}, state, params, loss=1.0)
    with pytest.raises(TypeError, match="floating-point"):
        rule.update({"b": torch.zeros(3, dtype=torch.int64)}, state, params, loss=1.0)
    with pytest.raises(TypeError, match="must be an OptimizerState"):
        rule.update(make_grads(params, 0), {}, params, loss=1.0)
    with pytest.raises(ValueError, match="num_steps must be an integer > 0"):
        rule.init(params, num_steps=0)
    if state.slots:  # a state advanced without the slots the rule keeps
        emptied = rule.init({}, num_steps=NUM_STEPS).replace(step_count=1)
        with pytest.raises(ValueError, match="build the state with"):
            rule.update(make_grads(params, 0), emptied, params, loss=1.0)
