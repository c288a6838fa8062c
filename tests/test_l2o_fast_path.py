"""The l2o and hierarchical rules' fast paths pinned to their reference forms.

``statistics='previous'`` (one pass per tensor) against a reference written with the two-pass
helpers and last update's statistics; every backend and ``update_in_place`` against the
functional update: 1e-12 in float64, 1e-6 in float32. The compiled kernels are checked in one
slow test (compiling takes a while on a small CPU).
"""

from __future__ import annotations

import pytest
import torch

from metaoptimizer.rules.base import apply_updates
from metaoptimizer.rules.features import FeatureConfig, global_features, tensor_accumulators
from metaoptimizer.rules.hierarchical import HierarchicalRule
from metaoptimizer.rules.lstm import LSTMRule
from metaoptimizer.rules.mlp import LAGGED_SLOTS, MLPRule, TensorPasses

FACTORED = FeatureConfig(
    momentum_decays=(0.9, 0.99), rms_decays=(), factored_decays=(0.999,),
    features=("grad", "param", "momentum", "factored", "mom_ratio", "grad_ratio"),
)
TOLERANCES = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-6, "atol": 1e-6}}


def _params(dtype, shapes=None):
    generator = torch.Generator().manual_seed(7)
    shapes = shapes or {"w": (6, 5), "b": (5,), "s": ()}
    return {name: torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for name, shape in shapes.items()}


def _grads(params, t):
    generator = torch.Generator().manual_seed(50 + t)
    return {n: (torch.randn(p.shape, generator=generator, dtype=torch.float64) / (1 + t)).to(p.dtype) for n, p in params.items()}


def _run(rule, params, steps):
    state, history = rule.init(params), []
    with torch.no_grad():
        for t in range(steps):
            updates, state = rule.update(_grads(params, t), state, params)
            params = apply_updates(params, updates)
            history.append(updates)
    return params, history


def _lagged_reference(rule, params, steps):
    """The lagged rule written with the reference passes: this update's features and
    accumulators, the previous update's per-tensor statistics (its own at a tensor's first)."""
    passes, config = TensorPasses.select("matmul", autograd=False), rule.features
    state, previous, history = rule.init(params), {}, []
    with torch.no_grad():
        for t in range(steps):
            layers, skip = rule.mlp.layers(global_features(t + 1, state, config, dtype=rule.mlp.skip.dtype))
            updates = {}
            for name, grad in _grads(params, t).items():
                reduced = passes.reduce(grad, params[name], tensor_accumulators(state.slots, name, config), config)
                mean_square, param_mean_square = previous.get(name, (reduced.mean_square, reduced.param_mean_square))
                updates[name] = passes.apply(
                    grad, params[name], reduced._replace(mean_square=mean_square), layers, skip,
                    rule.scale.step_size(param_mean_square), rule.scale.magnitude_scale, config,
                )
                previous[name] = (reduced.mean_square, reduced.param_mean_square)
                for slot, value in reduced.acc.items():
                    state.slots[slot][name] = value
            params = apply_updates(params, updates)
            history.append(updates)
    return params, history


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("features", [None, FACTORED], ids=["default", "factored"])
@pytest.mark.parametrize("backend", ["matmul", "pointwise", "auto"])
def test_one_pass_step_equals_the_lagged_two_pass_reference(dtype, features, backend):
    rule = MLPRule(features=features, backend=backend, seed=2).to(dtype)
    params = _params(dtype)
    _, got = _run(rule, params, 5)
    _, expected = _lagged_reference(rule, params, 5)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])


def test_the_first_update_is_the_same_in_both_modes_and_later_ones_lag():
    params = _params(torch.float64)
    _, lagged = _run(MLPRule(seed=2).double(), params, 3)
    _, current = _run(MLPRule(seed=2, statistics="current").double(), params, 3)
    torch.testing.assert_close(lagged[0], current[0], rtol=0, atol=0)
    assert any(not torch.allclose(lagged[2][n], current[2][n], rtol=1e-6) for n in params)


def test_lagged_statistics_are_kept_per_tensor():
    rule = MLPRule()
    params = _params(torch.float32)
    with torch.no_grad():
        _, state = rule.update(_grads(params, 0), rule.init(params), params)
    assert set(LAGGED_SLOTS) <= set(state.slots)
    assert state.slots["feature_mean_square"]["w"].shape == (rule.features.num_features,)
    assert state.slots["param_mean_square"]["w"].shape == ()
    assert MLPRule(statistics="current").init(params).slots.keys().isdisjoint(LAGGED_SLOTS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("statistics", ["previous", "current"])
@pytest.mark.parametrize("backend", ["matmul", "pointwise"])
def test_update_in_place_equals_update_then_add(dtype, statistics, backend):
    rule = MLPRule(features=FACTORED, backend=backend, statistics=statistics, seed=1).to(dtype)
    expected = _params(dtype)
    params = {name: p.clone() for name, p in expected.items()}
    reference, state = rule.init(expected), rule.init(params)
    kept = {slot: dict(values) for slot, values in state.slots.items()}
    with torch.no_grad():
        for t in range(4):
            updates, reference = rule.update(_grads(expected, t), reference, expected)
            expected = {name: p + 0.5 * updates[name] for name, p in expected.items()}
            state = rule.update_in_place(_grads(params, t), state, params, lr=0.5)
    torch.testing.assert_close(params, expected, **TOLERANCES[dtype])
    for slot, values in kept.items():  # accumulators written into the tensors the caller gave
        for name, tensor in values.items():
            assert state.slots[slot][name] is tensor
            torch.testing.assert_close(tensor, reference.slots[slot][name], **TOLERANCES[dtype])


def test_update_in_place_refuses_an_autograd_graph():
    rule = MLPRule()
    params = {name: p.requires_grad_() for name, p in _params(torch.float32).items()}
    with pytest.raises(ValueError, match="update_in_place is for deployment"):
        rule.update_in_place(_grads(params, 0), rule.init(params), params)


def test_bad_statistics_option_names_the_accepted_values():
    with pytest.raises(ValueError, match="statistics='next' is not supported; accepted values: 'previous', 'current'"):
        MLPRule(statistics="next")


def test_auto_backend_compiles_only_large_tensors_without_autograd():
    small, large = TensorPasses.select("auto", False, 100), TensorPasses.select("auto", False, 1 << 20)
    assert small == TensorPasses.select("matmul", False)
    assert large == TensorPasses.select("compiled", False)
    assert TensorPasses.select("auto", True, 1 << 20) == TensorPasses.select("matmul", True)


@pytest.mark.slow
def test_compiled_kernels_match_the_eager_reference():
    """Large enough for ``backend='auto'`` to compile; float32 to 1e-6 (update and in place)."""
    shapes = {"w": (300, 250), "b": (70000,), "s": ()}
    params = _params(torch.float32, shapes)
    auto, eager = MLPRule(seed=4), MLPRule(seed=4, backend="matmul")
    got_params, got = _run(auto, params, 4)
    expected_params, expected = _run(eager, params, 4)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    in_place = {name: p.clone() for name, p in params.items()}
    state = auto.init(in_place)
    with torch.no_grad():
        for t in range(4):
            state = auto.update_in_place(_grads(in_place, t), state, in_place)
    torch.testing.assert_close(in_place, expected_params, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_hierarchical_auto_backend_matches_the_eager_reference():
    """The hierarchical rule's default ``backend='auto'`` compiles large tensors; float32 to 1e-6."""
    params = _params(torch.float32, {"w": (300, 250), "b": (250,)})
    auto, eager = HierarchicalRule(seed=1), HierarchicalRule(seed=1, backend="matmul")
    eager.load_state_dict(auto.state_dict())
    _, got = _run(auto, params, 3)
    _, expected = _run(eager, params, 3)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make_rule", [lambda: MLPRule(seed=1), lambda: LSTMRule(hidden_size=6, init_lr=0.01)],
                         ids=["l2o", "lstm"])
def test_the_torch_optimizer_runs_learned_rules_in_place_by_default(make_rule):
    """The adapter's default for a rule with ``update_in_place`` is that path; it matches the
    functional update (``foreach=False``) over groups with their own lr and weight decay, a
    parameter that joins late, and a state_dict round trip."""
    from metaoptimizer.optim import LearnedOptimizer

    torch.manual_seed(0)
    rule = make_rule()
    base = [torch.randn(5, 4), torch.randn(4), torch.randn(3, 3)]

    def run(foreach, steps=6, resume_at=None):
        tensors = [t.clone().requires_grad_(True) for t in base]
        groups = [{"params": tensors[:2]}, {"params": tensors[2:], "lr": 0.5, "weight_decay": 0.01}]
        make = lambda: LearnedOptimizer(groups[:1], rule, foreach=foreach)  # noqa: E731
        optimizer = make()
        for step in range(steps):
            if step == 2:
                optimizer.add_param_group(groups[1])
            if step == resume_at:
                saved = optimizer.state_dict()
                optimizer = make()
                optimizer.add_param_group(groups[1])
                optimizer.load_state_dict(saved)
            for i, t in enumerate(tensors):
                t.grad = torch.sin(t.detach() * (step + i + 1))
            optimizer.step()
        return optimizer, [t.detach() for t in tensors]

    fast, got = run(None)
    reference, want = run(False)
    assert fast.kernel == "in_place" and reference.kernel is None
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    _, resumed = run(None, resume_at=4)
    for a, b in zip(resumed, got, strict=True):
        assert torch.equal(a, b)
