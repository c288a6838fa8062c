"""The per-parameter MLP rule (method 'l2o') and the hierarchical rule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from metaoptimizer.meta.estimators import TruncatedBPTT
from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.rules.base import apply_updates
from metaoptimizer.rules.features import FeatureConfig, matrix_shape, state_numel
from metaoptimizer.rules.hierarchical import HierarchicalRule
from metaoptimizer.rules.mlp import MAX_LOG_MAGNITUDE, MLPRule, StepScale, prior_index
from metaoptimizer.tasks import make_family

FACTORED = FeatureConfig(
    momentum_decays=(0.9, 0.99), rms_decays=(), factored_decays=(0.999,),
    features=("grad", "param", "momentum", "factored", "mom_ratio", "grad_ratio"),
)
EVERYTHING = FeatureConfig(
    momentum_decays=(0.9, 0.5), rms_decays=(0.99,), factored_decays=(0.999, 0.9),
    features=("grad", "param", "momentum", "rms", "factored", "mom_ratio", "grad_ratio"), training_fraction=True,
)
RULES = [MLPRule, HierarchicalRule]


def _params(dtype=torch.float64):
    generator = torch.Generator().manual_seed(5)
    shapes = {"w": (6, 4), "b": (4,), "conv": (3, 2, 2, 2), "s": ()}
    return {name: torch.randn(shape, generator=generator, dtype=dtype) for name, shape in shapes.items()}


def _loss(params):
    """A separable quadratic with a different curvature per tensor."""
    return sum((i + 1.0) * ((p - 0.5) ** 2).sum() for i, p in enumerate(params.values()))


def _train(rule, params, steps, create_graph=False):
    state = rule.init(params, num_steps=50)
    for step in range(1, steps + 1):
        loss = _loss(params)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        updates, state = rule.update(dict(zip(params, grads, strict=True)), state, params)
        params = apply_updates(params, updates)
    return params, state


def _leaves(params):
    return {name: p.clone().requires_grad_() for name, p in params.items()}


def test_untrained_l2o_first_step_is_a_normalised_adam_step():
    rule = MLPRule(output_init=1e-12).double()
    params = _params()
    grads = {name: torch.sin(3 * p) for name, p in params.items()}
    updates, state = rule.update(grads, rule.init(params, num_steps=50), params)
    eps = rule.features.eps
    for name, g in grads.items():
        m, v = 0.1 * g, 0.001 * (g**2 + eps)
        ratio = m / torch.sqrt(v + eps)
        direction = -ratio / torch.sqrt((ratio**2).mean() + eps)
        size = 0.01 * math.sqrt(float((params[name] ** 2).mean()) + 1e-6)
        torch.testing.assert_close(updates[name], direction * size, rtol=1e-6, atol=1e-12)
    assert state.step_count == 1


@pytest.mark.parametrize("cls", RULES)
@pytest.mark.parametrize("features", [None, FACTORED, EVERYTHING])
def test_backends_agree(cls, features):
    results = {}
    for backend in ("matmul", "pointwise", "compiled"):  # 'compiled' under autograd runs eagerly
        rule = cls(features=features, backend=backend, seed=3).double()
        params, _ = _train(rule, _leaves(_params()), steps=4)
        results[backend] = params
    for name in results["matmul"]:
        torch.testing.assert_close(results["pointwise"][name], results["matmul"][name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(results["compiled"][name], results["matmul"][name], rtol=0, atol=0)


@pytest.mark.parametrize("cls", RULES)
def test_untrained_rules_optimise(cls):
    params = _leaves(_params(torch.float32))
    trained, _ = _train(cls(step_mult=0.05), params, steps=60)
    assert float(_loss(trained).detach()) < 0.5 * float(_loss(params).detach())


@pytest.mark.parametrize("cls", RULES)
@settings(max_examples=10, deadline=None)
@given(scale=st.floats(1e-2, 1e3))
def test_updates_do_not_depend_on_the_gradient_scale(cls, scale):
    """Every gradient feature is normalised per tensor, so only ``eps`` breaks the invariance."""
    rule = cls(features=EVERYTHING).double()
    params = _params()
    generator = torch.Generator().manual_seed(6)
    grads = {n: 0.5 + torch.rand(p.shape, generator=generator, dtype=p.dtype) for n, p in params.items()}
    state = rule.init(params, num_steps=50)
    with torch.no_grad():
        base, _ = rule.update(grads, state, params)
        scaled, _ = rule.update({n: g * scale for n, g in grads.items()}, state, params)
    for name in base:
        torch.testing.assert_close(scaled[name], base[name], rtol=1e-4, atol=1e-12)


class _Update(nn.Module):
    """Lets ``functional_call`` run ``rule.update`` with substituted meta-parameters."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def forward(self, grads, state, params, step):
        return self.rule.update(grads, state, params)


@pytest.mark.parametrize("cls", RULES)
def test_meta_gradient_matches_finite_differences(cls):
    rule = cls(features=FACTORED, hidden_size=3, seed=1).double()
    update = _Update(rule)
    names = [f"rule.{n}" for n, _ in rule.named_parameters()]
    params = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}

    def loss_after_training(*meta):
        weights = dict(zip(names, meta, strict=True))
        p, state = _leaves(params), rule.init(params, num_steps=50)
        for step in (1, 2, 3):
            grads = torch.autograd.grad(_loss(p), list(p.values()), create_graph=True)
            updates, state = functional_call(update, weights, (dict(zip(p, grads, strict=True)), state, p, step))
            p = apply_updates(p, updates)
        return _loss(p)

    # A generic point: zero biases put ReLUs exactly at their kink, where the derivative is one-sided.
    generator = torch.Generator().manual_seed(8)
    inputs = tuple(
        (p.detach() + 0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype)).requires_grad_()
        for p in rule.parameters()
    )
    assert torch.autograd.gradcheck(loss_after_training, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("cls", RULES)
def test_second_order_meta_gradients_are_finite(cls):
    rule = cls()
    params, _ = _train(rule, _leaves(_params(torch.float32)), steps=3, create_graph=True)
    meta_grads = torch.autograd.grad(_loss(params), list(rule.parameters()))
    assert all(torch.isfinite(g).all() for g in meta_grads)
    assert any(g.abs().sum() > 0 for g in meta_grads)


@pytest.mark.parametrize("cls", RULES)
def test_meta_trainable_through_the_meta_trainer(cls):
    rule = cls()
    before = [p.detach().clone() for p in rule.parameters()]
    trainer = MetaTrainer(
        rule, make_family("quadratic", dim=4), unroll_steps=4, run_steps=8, tasks_per_step=2,
        estimator=TruncatedBPTT(vectorize=cls is MLPRule),
    )
    results = trainer.train(3)
    assert not any(r.skipped for r in results)
    assert all(math.isfinite(r.meta_loss) and r.meta_grad_norm > 0 for r in results)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, rule.parameters(), strict=True))


def test_hierarchical_state_is_adams_per_coordinate_plus_per_tensor_lstm():
    params = _params(torch.float32)
    numel = sum(p.numel() for p in params.values())
    state = HierarchicalRule().init(params, num_steps=50)
    assert state_numel(state) == {"per_coordinate": 2 * numel, "factored": 0, "recurrent": 2 * 16 * len(params)}
    state = HierarchicalRule(features=FACTORED, tensor_hidden_size=8).init(params, num_steps=50)
    factored = sum(sum(matrix_shape(p.shape)) for p in params.values())
    assert state_numel(state) == {"per_coordinate": 2 * numel, "factored": factored, "recurrent": 2 * 8 * len(params)}
    _, state = _train(HierarchicalRule(features=FACTORED), _leaves(params), steps=2)
    assert state_numel(state)["per_coordinate"] == 2 * numel


def test_hierarchical_with_one_network_and_a_silent_lstm_is_the_mlp_rule():
    mlp = MLPRule(hidden_size=3, num_layers=1, features=FACTORED, seed=2)
    hierarchical = HierarchicalRule(hidden_size=3, num_layers=1, bank_size=1, features=FACTORED, seed=7)
    with torch.no_grad():
        hierarchical.bank.load_state_dict(mlp.mlp.state_dict())
        hierarchical.head_weight.zero_()
        hierarchical.head_bias.zero_()
    params = _params(torch.float32)
    grads = {name: torch.cos(p) for name, p in params.items()}
    expected, _ = mlp.update(grads, mlp.init(params, num_steps=50).replace(step_count=3), params)
    got, state = hierarchical.update(grads, hierarchical.init(params, num_steps=50).replace(step_count=3), params)
    for name in params:
        torch.testing.assert_close(got[name], expected[name])
    assert state.slots["tensor_hidden"]["w"].shape == (16,) and torch.any(state.slots["tensor_hidden"]["w"] != 0)


@pytest.mark.parametrize("cls", RULES)
def test_parameters_without_gradients_keep_their_state(cls):
    rule = cls()
    params = _params(torch.float32)
    _, state = _train(rule, _leaves(params), steps=2)
    updates, new_state = rule.update({"w": torch.ones(6, 4)}, state, params)
    assert set(updates) == {"w"} and new_state.step_count == 3
    for slot, values in new_state.slots.items():
        assert values["b"] is state.slots[slot]["b"]
        assert not torch.equal(values["w"], state.slots[slot]["w"])
    empty, same = rule.update({}, state, params)
    assert empty == {} and same.step_count == 3


@pytest.mark.parametrize("cls", RULES)
def test_rebuilt_from_hyperparameters_gives_the_same_updates(cls):
    rule = cls(features=EVERYTHING, step_mult=0.02, seed=4)
    copy = cls(**rule.hyperparameters())
    copy.load_state_dict(rule.state_dict())
    params = _params(torch.float32)
    grads = {name: torch.sin(p) for name, p in params.items()}
    for a, b in zip(rule.update(grads, rule.init(params, num_steps=50).replace(step_count=1), params)[0].values(),
                    copy.update(grads, copy.init(params, num_steps=50).replace(step_count=1), params)[0].values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_linear_rule_and_zero_tensors_move():
    rule = MLPRule(num_layers=0)
    params = {"bias": torch.zeros(5)}
    updates, _ = rule.update({"bias": torch.ones(5)}, rule.init(params, num_steps=50), params)
    assert torch.all(updates["bias"] < 0)  # the floor of the relative step size moves zero tensors
    torch.testing.assert_close(updates["bias"].abs().mean(), torch.tensor(0.01 * 1e-3), rtol=0.05, atol=0)


def test_absolute_step_size_and_bounded_magnitude():
    rule = MLPRule(param_relative=False, step_mult=0.1, output_init=1e-9)
    params = {"w": torch.randn(8, 8) * 100}
    updates, _ = rule.update({"w": torch.randn(8, 8)}, rule.init(params, num_steps=50), params)
    torch.testing.assert_close(updates["w"].square().mean().sqrt(), torch.tensor(0.1), rtol=1e-4, atol=0)
    with torch.no_grad():
        rule.mlp.biases[-1][0, 1] = 1e6  # a huge log-magnitude is clamped, not inf
    updates, _ = rule.update({"w": torch.randn(8, 8)}, rule.init(params, num_steps=50), params)
    assert torch.isfinite(updates["w"]).all()
    assert updates["w"].abs().max() <= 0.1 * math.exp(MAX_LOG_MAGNITUDE) * 10


def test_bfloat16_state_end_to_end():
    rule = HierarchicalRule(features={"state_dtype": "bfloat16"})
    _, state = _train(rule, _leaves(_params(torch.float32)), steps=2)
    dtypes = {slot: {t.dtype for t in values.values()} for slot, values in state.slots.items()}
    assert dtypes.pop("tensor_hidden") == dtypes.pop("tensor_cell") == {torch.float32}  # the LSTM's own state
    assert all(kinds == {torch.bfloat16} for kinds in dtypes.values())


def test_prior_feature_choice():
    assert FeatureConfig().feature_names[prior_index(FeatureConfig())] == "mom_ratio_0.9"
    only_grad = FeatureConfig(momentum_decays=(), rms_decays=(), features=("grad", "param"))
    assert prior_index(only_grad) == 0
    assert prior_index(FeatureConfig(momentum_decays=(), rms_decays=(), features=("param",))) is None
    rule = MLPRule(features=FeatureConfig(momentum_decays=(), rms_decays=(), features=("param",)))
    assert torch.count_nonzero(rule.mlp.skip) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"hidden_size": 0}, ValueError, "hidden_size must be an integer > 0"),
        ({"num_layers": -1}, ValueError, "num_layers must be an integer >= 0"),
        ({"output_init": 0.0}, ValueError, "output_init must be a number > 0"),
        ({"step_mult": -1.0}, ValueError, "step_mult must be a number > 0"),
        ({"magnitude_scale": float("nan")}, ValueError, "magnitude_scale must be a number >= 0"),
        ({"param_relative": 1}, ValueError, "param_relative must be True or False"),
        ({"param_scale_floor": 0.0}, ValueError, "param_scale_floor > 0"),
        ({"backend": "cuda"}, ValueError, "backend='cuda' is not supported"),
        ({"features": [0.9]}, TypeError, "features must be a FeatureConfig"),
    ],
)
@pytest.mark.parametrize("cls", RULES)
def test_bad_constructor_arguments(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(**kwargs)


@settings(max_examples=20, deadline=None)
@given(st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=3)))
def test_hierarchical_sizes_must_be_positive_integers(value):
    for name in ("bank_size", "tensor_hidden_size"):
        with pytest.raises(ValueError, match=f"{name} must be an integer"):
            HierarchicalRule(**{name: value})


def test_step_scale_without_floor_when_absolute():
    assert StepScale(param_relative=False, param_scale_floor=0.0).param_scale_floor == 0.0


def test_a_bank_needs_mixture_coefficients():
    bank = HierarchicalRule(bank_size=3).bank
    with pytest.raises(ValueError, match="a bank of 3 networks needs mixture coefficients"):
        bank.layers(torch.zeros(5))
    layers, skip = bank.layers(torch.zeros(5), torch.full((2, 3), 1 / 3))
    assert skip.shape == (2, bank.num_features) and layers[0][0].shape[0] == 2
