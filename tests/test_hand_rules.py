"""Hand-designed rules: torch.optim trajectories, differentiable hyperparameters, input checks."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from metaoptimizer.rules import hand
from metaoptimizer.rules.base import apply_updates
from metaoptimizer.rules.hand import HAND_RULES, SGD, Adam, AdamW, Momentum, RMSProp, make_hand_rule

DTYPE = torch.float64

# (rule, torch.optim class, torch.optim kwargs): every variant the rules support.
CASES = {
    "sgd": (SGD(lr=0.1), torch.optim.SGD, dict(lr=0.1)),
    "sgd_wd": (SGD(lr=0.1, weight_decay=0.01), torch.optim.SGD, dict(lr=0.1, weight_decay=0.01)),
    "momentum": (Momentum(lr=0.05), torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "nesterov": (
        Momentum(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
    ),
    "dampening": (
        Momentum(lr=0.05, momentum=0.9, dampening=0.5),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, dampening=0.5),
    ),
    "rmsprop": (RMSProp(lr=1e-2), torch.optim.RMSprop, dict(lr=1e-2)),
    "rmsprop_momentum": (RMSProp(lr=1e-3, momentum=0.9), torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9)),
    "rmsprop_centered": (
        RMSProp(lr=1e-3, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.01),
        torch.optim.RMSprop,
        dict(lr=1e-3, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.01),
    ),
    "adam": (Adam(lr=1e-2), torch.optim.Adam, dict(lr=1e-2)),
    "adam_amsgrad_wd": (
        Adam(lr=1e-2, betas=(0.8, 0.99), amsgrad=True, weight_decay=0.01),
        torch.optim.Adam,
        dict(lr=1e-2, betas=(0.8, 0.99), amsgrad=True, weight_decay=0.01),
    ),
    "adam_decoupled": (
        Adam(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
        torch.optim.Adam,
        dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    ),
    "adamw": (AdamW(lr=1e-2, weight_decay=0.1), torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}


def init_params(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small conv net's parameters: rank-4 kernel, vector, matrix and scalar."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": 0.5 * torch.randn(3, 1, 3, 3, generator=g, dtype=DTYPE),
        "conv.bias": 0.1 * torch.randn(3, generator=g, dtype=DTYPE),
        "fc.weight": 0.2 * torch.randn(2, 48, generator=g, dtype=DTYPE),
        "scale": torch.tensor(1.0, dtype=DTYPE),
    }


def batches(n: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 1, 6, 6, generator=g, dtype=DTYPE), torch.randint(0, 2, (8,), generator=g)) for _ in range(n)
    ]


def loss_fn(params, batch) -> torch.Tensor:
    x, y = batch
    h = torch.tanh(F.conv2d(x, params["conv.weight"], params["conv.bias"]))
    logits = params["scale"] * h.flatten(1) @ params["fc.weight"].T
    return F.cross_entropy(logits, y)


def functional_trajectory(rule, params, data, steps: int, create_graph: bool = False):
    """Run ``rule`` for ``steps`` steps; differentiable end to end when ``create_graph``."""
    state = rule.init(params)
    trajectory = []
    for step in range(1, steps + 1):
        if step == 1 or not create_graph:
            params = {name: p.detach().requires_grad_() for name, p in params.items()}
        loss = loss_fn(params, data[(step - 1) % len(data)])
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)))
        updates, state = rule.update(grads, state, params)
        assert state.step_count == step
        params = apply_updates(params, updates)
        trajectory.append(params)
    return trajectory


def torch_trajectory(optim_cls, kwargs, params, data, steps: int):
    leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
    optimizer = optim_cls(list(leaves.values()), **kwargs)
    trajectory = []
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(leaves, data[step % len(data)]).backward()
        optimizer.step()
        trajectory.append({name: p.detach().clone() for name, p in leaves.items()})
    return trajectory


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_optim_trajectory(case):
    rule, optim_cls, kwargs = CASES[case]
    params, data = init_params(), batches()
    ours = functional_trajectory(rule, params, data, steps=100)
    reference = torch_trajectory(optim_cls, kwargs, params, data, steps=100)
    moved = max((reference[-1][n] - params[n]).abs().max().item() for n in params)
    assert moved > 1e-2, "the reference barely moved; the comparison would be vacuous"
    for step, (a, b) in enumerate(zip(ours, reference), start=1):
        for name in params:
            torch.testing.assert_close(a[name].detach(), b[name], atol=1e-6, rtol=0, msg=f"{case} step {step} {name}")


# Every float hyperparameter that can be learned, away from its bounds so finite differences stay valid.
TENSOR_HYPERS = {
    "sgd": dict(lr=0.1, weight_decay=0.01),
    "momentum": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "rmsprop": dict(lr=1e-2, alpha=0.9, momentum=0.5, weight_decay=0.01),
    "adam": dict(lr=1e-2, weight_decay=0.01),
    "adamw": dict(lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(TENSOR_HYPERS))
def test_gradient_through_tensor_hyperparameters_matches_finite_differences(name):
    names = sorted(TENSOR_HYPERS[name])
    values = tuple(torch.tensor(TENSOR_HYPERS[name][k], dtype=DTYPE, requires_grad=True) for k in names)
    beta_values = tuple(torch.tensor(b, dtype=DTYPE, requires_grad=True) for b in (0.8, 0.95))
    params, data = init_params(), batches(2)
    extra = {"centered": True} if name == "rmsprop" else {}

    def final_loss(*tensors):
        hypers = dict(zip(names, tensors[: len(names)]), **extra)
        if name.startswith("adam"):
            hypers["betas"] = tensors[len(names) :]
        trajectory = functional_trajectory(make_hand_rule(name, **hypers), params, data, steps=4, create_graph=True)
        return loss_fn(trajectory[-1], data[0])

    inputs = values + (beta_values if name.startswith("adam") else ())
    assert torch.autograd.gradcheck(final_loss, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def masked_loss(params, batch=None):
    """A loss whose third coordinate has an exactly zero gradient, through a differentiable graph."""
    return (torch.tensor([1.0, 1.0, 0.0], dtype=DTYPE) * (params["w"] - 1) ** 2).sum()


def meta_gradients(rule, lr):
    params = {"w": torch.zeros(3, dtype=DTYPE, requires_grad=True)}
    state, current = rule.init(params), params
    for step in range(1, 4):
        (grad,) = torch.autograd.grad(masked_loss(current), current["w"], create_graph=True)
        updates, state = rule.update({"w": grad}, state, current)
        current = apply_updates(current, updates)
    return torch.autograd.grad(masked_loss(current), (lr, params["w"]))


SECOND_MOMENT_RULES = {
    "adam": lambda lr, **kw: Adam(lr=lr, **kw),
    "amsgrad": lambda lr, **kw: Adam(lr=lr, amsgrad=True, **kw),
    "rmsprop": lambda lr, **kw: RMSProp(lr=lr, **kw),
    "rmsprop_centered": lambda lr, **kw: RMSProp(lr=lr, centered=True, momentum=0.5, **kw),
}


@pytest.mark.parametrize("kind", sorted(SECOND_MOMENT_RULES))
def test_meta_gradients_finite_at_zero_second_moment(kind):
    lr = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    d_lr, d_w = meta_gradients(SECOND_MOMENT_RULES[kind](lr), lr)
    assert torch.isfinite(d_lr) and torch.isfinite(d_w).all()
    assert d_lr != 0 and d_w[2] == 0
    # The trap the default avoids: without eps_root the same meta-gradient is NaN.
    d_lr, d_w = meta_gradients(SECOND_MOMENT_RULES[kind](lr, eps_root=0.0), lr)
    assert torch.isnan(d_w).any()


@pytest.mark.parametrize("name", ["momentum", "rmsprop", "adam"])
def test_update_works_under_vmap(name):
    rule = make_hand_rule(name, lr=0.1)
    params = {"w": torch.randn(4, 3, dtype=DTYPE), "b": torch.randn(4, dtype=DTYPE)}
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(2)]

    def two_steps(p, g1, g2):
        updates, state = rule.update(g1, rule.init(p), p)
        p = apply_updates(p, updates)
        return apply_updates(p, rule.update(g2, state, p)[0])

    batched = torch.func.vmap(two_steps)(params, *grads)
    for i in range(4):
        one = two_steps(*({k: v[i] for k, v in d.items()} for d in (params, *grads)))
        for k in params:
            torch.testing.assert_close(batched[k][i], one[k])


def test_tensor_hyperparameters_are_not_meta_parameters():
    lr = torch.tensor(0.1, requires_grad=True)
    for cls in HAND_RULES.values():
        assert list(cls(lr=lr).parameters()) == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_hyperparameters_rebuild_the_same_rule(case):
    rule = CASES[case][0]
    rebuilt = type(rule)(**rule.hyperparameters())
    params, data = init_params(), batches(1)
    a = functional_trajectory(rule, params, data, steps=3)[-1]
    b = functional_trajectory(rebuilt, params, data, steps=3)[-1]
    for name in params:
        assert torch.equal(a[name], b[name])
    assert f"lr={rule.lr!r}" in repr(rule)


def test_adamw_hyperparameters_and_registry():
    assert AdamW().hyperparameters() == dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, eps_root=hand.EPS_ROOT
    )
    assert set(HAND_RULES) == {"sgd", "momentum", "rmsprop", "adam", "adamw"}
    assert all(cls.name == name for name, cls in HAND_RULES.items())
    rule = make_hand_rule("momentum", lr=0.5, nesterov=True)
    assert isinstance(rule, Momentum) and rule.lr == 0.5 and rule.nesterov
    with pytest.raises(ValueError, match="accepted names: 'sgd', 'momentum', 'rmsprop', 'adam', 'adamw'"):
        make_hand_rule("lion")


def test_momentum_buffer_does_not_alias_the_gradient():
    rule, grad, params = Momentum(lr=0.1), torch.ones(2), {"w": torch.zeros(2)}
    _, state = rule.update({"w": grad}, rule.init(params), params)
    grad.zero_()  # an adapter reusing .grad buffers must not corrupt the state
    assert torch.equal(state.slots["momentum_buffer"]["w"], torch.ones(2))


not_numbers = st.one_of(st.booleans(), st.none(), st.text(max_size=3), st.lists(st.floats(), max_size=2))
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])
non_positive = st.one_of(st.floats(max_value=0.0, allow_nan=False), st.integers(max_value=0), not_numbers, not_finite)
negative = st.one_of(st.floats(max_value=-1e-300, allow_nan=False), st.integers(max_value=-1), not_numbers, not_finite)
outside_unit = st.one_of(
    st.floats(max_value=-1e-300, allow_nan=False), st.floats(min_value=1.0, allow_nan=False), not_numbers, not_finite
)
bad_tensors = st.sampled_from([torch.ones(2), torch.ones(1, 1), torch.tensor(1), torch.tensor(-0.5)])
not_bools = st.one_of(st.integers(), st.none(), st.text(max_size=3), st.floats(allow_nan=False))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(HAND_RULES)), lr=st.one_of(non_positive, bad_tensors))
def test_bad_learning_rate_is_rejected(name, lr):
    with pytest.raises(ValueError, match="lr must be"):
        make_hand_rule(name, lr=lr)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(HAND_RULES)), weight_decay=negative)
def test_bad_weight_decay_is_rejected(name, weight_decay):
    with pytest.raises(ValueError, match="weight_decay must be"):
        make_hand_rule(name, lr=0.1, weight_decay=weight_decay)


@settings(max_examples=60, deadline=None)
@given(
    target=st.sampled_from(
        [("momentum", "momentum"), ("momentum", "dampening"), ("rmsprop", "alpha"), ("rmsprop", "momentum")]
    ),
    value=outside_unit,
)
def test_bad_decay_rates_are_rejected(target, value):
    name, key = target
    with pytest.raises(ValueError, match=f"{key} must"):
        make_hand_rule(name, lr=0.1, **{key: value})


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["adam", "adamw"]), beta=outside_unit, index=st.integers(0, 1))
def test_bad_betas_are_rejected(name, beta, index):
    betas = [0.9, 0.999]
    betas[index] = beta
    with pytest.raises(ValueError, match=rf"betas\[{index}\] must"):
        make_hand_rule(name, betas=tuple(betas))


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["rmsprop", "adam", "adamw"]), key=st.sampled_from(["eps", "eps_root"]), value=negative)
def test_bad_eps_is_rejected(name, key, value):
    with pytest.raises(ValueError, match=f"{key} must be"):
        make_hand_rule(name, **{key: value})


@settings(max_examples=30, deadline=None)
@given(
    target=st.sampled_from(
        [("momentum", "nesterov"), ("rmsprop", "centered"), ("adam", "amsgrad"), ("adam", "decoupled_weight_decay")]
    ),
    value=not_bools,
)
def test_non_boolean_flags_are_rejected(target, value):
    name, key = target
    with pytest.raises(ValueError, match=f"{key} must be True or False"):
        make_hand_rule(name, lr=0.1, **{key: value})


@pytest.mark.parametrize("betas", [(0.9,), (0.9, 0.99, 0.999), 0.9, "ab"])
def test_betas_must_be_a_pair(betas):
    with pytest.raises(ValueError, match="betas must be a pair"):
        Adam(betas=betas)


@pytest.mark.parametrize("kwargs", [dict(momentum=0.0), dict(momentum=0.9, dampening=0.1)])
def test_nesterov_needs_momentum_without_dampening(kwargs):
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0 and dampening = 0"):
        Momentum(lr=0.1, nesterov=True, **kwargs)


@pytest.mark.parametrize("cls", [RMSProp, Adam, AdamW])
def test_eps_and_eps_root_cannot_both_be_zero(cls):
    with pytest.raises(ValueError, match="eps and eps_root cannot both be 0"):
        cls(eps=0.0, eps_root=0.0)
    cls(eps=0.0)  # eps_root alone keeps the update finite


def test_module_docstring_example_runs():
    assert doctest.testmod(hand, raise_on_error=True).attempted > 0
