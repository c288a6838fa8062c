"""Hypergradient descent: finite-difference hypergradients, torch.optim agreement, state dicts, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from metaoptimizer.hypergradient import HypergradientAdam, HypergradientSGD

DTYPE = torch.float64

VARIANTS = {
    "sgd": (HypergradientSGD, dict(lr=0.05), torch.optim.SGD, dict(lr=0.05)),
    "sgdn": (
        HypergradientSGD,
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    ),
    "momentum_dampening": (
        HypergradientSGD,
        dict(lr=0.05, momentum=0.8, dampening=0.3),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.8, dampening=0.3),
    ),
    "adam": (
        HypergradientAdam,
        dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.01),
        torch.optim.Adam,
        dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.01),
    ),
}


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DTYPE)


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 5, generator=g, dtype=DTYPE), torch.randint(0, 3, (32,), generator=g)


X, Y = data()


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(model(X), Y)


def train(model, opt, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_without_hypergradient_matches_torch_optim(variant):
    cls, kwargs, ref_cls, ref_kwargs = VARIANTS[variant]
    model, reference = make_model(), make_model()
    train(model, cls(model.parameters(), hypergrad_lr=0.0, **kwargs), 50)
    train(reference, ref_cls(reference.parameters(), **ref_kwargs), 50)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def loss_along_last_step(model, before, after, lr, trial_lr) -> float:
    """Loss at ``before + (trial_lr / lr) * (after - before)``: the last step taken with ``trial_lr``."""
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p, b, a in zip(probe.parameters(), before, after, strict=True):
            p.copy_(b + (trial_lr / lr) * (a - b))
        return float(loss_of(probe))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hypergradient_matches_finite_differences_of_the_loss_in_the_lr(variant):
    """h_t = d loss(theta_{t-1}) / d lr_{t-1}: sign and magnitude against central differences."""
    cls, kwargs, _, _ = VARIANTS[variant]
    model = make_model()
    opt = cls(model.parameters(), hypergrad_lr=1e-4, **kwargs)
    train(model, opt, 3)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1)
    after = [p.detach().clone() for p in model.parameters()]
    lr = opt.param_groups[0]["lr"]  # the lr that step used (adapted before the step was taken)
    delta = 1e-5 * lr
    expected = (
        loss_along_last_step(model, before, after, lr, lr + delta)
        - loss_along_last_step(model, before, after, lr, lr - delta)
    ) / (2 * delta)
    # The weight-decay term is part of the objective the hypergradient descends.
    decay = kwargs.get("weight_decay", 0.0)
    if decay:
        direction = [(b - a) / lr for b, a in zip(before, after, strict=True)]
        expected -= decay * sum(float((a * d).sum()) for a, d in zip(after, direction, strict=True))
    train(model, opt, 1)  # this step computes the hypergradient of the previous step's lr
    group = opt.param_groups[0]
    assert group["hypergradient"] == pytest.approx(expected, rel=1e-6, abs=1e-10)
    assert abs(expected) > 1e-6  # a test with a non-trivial hypergradient
    assert group["lr"] == pytest.approx(lr - 1e-4 * group["hypergradient"], rel=1e-12)


def test_first_step_has_no_hypergradient_and_keeps_the_lr():
    model = make_model()
    opt = HypergradientSGD(model.parameters(), lr=0.1, hypergrad_lr=0.01)
    train(model, opt, 1)
    assert opt.param_groups[0]["hypergradient"] is None
    assert opt.param_groups[0]["lr"] == 0.1


def test_sgd_hypergradient_is_minus_the_dot_product_of_consecutive_gradients():
    w = torch.tensor([1.0, -2.0], dtype=DTYPE, requires_grad=True)
    opt = HypergradientSGD([w], lr=0.1, hypergrad_lr=0.5)
    grads = []
    for _ in range(2):
        opt.zero_grad()
        (w**2).sum().backward()
        grads.append(w.grad.clone())
        opt.step()
    assert opt.param_groups[0]["hypergradient"] == pytest.approx(-float(grads[0] @ grads[1]))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 + 0.5 * float(grads[0] @ grads[1]))


@pytest.mark.parametrize("start", [1e-4, 1.0])
def test_adam_lr_moves_towards_a_better_rate(start):
    """On a smooth problem a tiny lr grows and a huge one shrinks."""
    torch.manual_seed(0)
    w = torch.randn(20, dtype=DTYPE, requires_grad=True)
    opt = HypergradientAdam([w], lr=start, hypergrad_lr=1e-3)
    for _ in range(30):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    lr = opt.param_groups[0]["lr"]
    assert lr > start if start < 0.01 else lr < start


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_round_trip_resumes_the_same_trajectory(variant):
    cls, kwargs, _, _ = VARIANTS[variant]
    model = make_model()
    opt = cls(model.parameters(), hypergrad_lr=1e-3, **kwargs)
    train(model, opt, 5)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    expected = train(model, opt, 5)

    resumed = make_model(seed=3)
    resumed.load_state_dict(saved_model)
    opt2 = cls(resumed.parameters(), hypergrad_lr=1e-3, **kwargs)
    opt2.load_state_dict(saved_opt)
    assert train(resumed, opt2, 5) == expected
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_closure_parameter_groups_and_parameters_without_grad():
    model = make_model()
    frozen = torch.zeros(3, dtype=DTYPE, requires_grad=True)
    opt = HypergradientAdam(
        [{"params": model[0].parameters(), "hypergrad_lr": 0.0}, {"params": [*model[2].parameters(), frozen]}],
        lr=0.01,
        hypergrad_lr=1e-4,
    )

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(3):
        last = opt.step(closure)
    assert float(last.detach()) < float(first.detach())
    assert opt.param_groups[0]["lr"] == 0.01  # hypergrad_lr 0 in that group
    assert opt.param_groups[1]["lr"] != 0.01
    assert torch.equal(frozen, torch.zeros(3, dtype=DTYPE))
    assert frozen not in opt.state


def test_sparse_gradients_are_refused():
    embedding = torch.nn.Embedding(4, 2, sparse=True)
    opt = HypergradientSGD(embedding.parameters(), lr=0.1)
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: HypergradientSGD(p, lr=-0.1), "lr"),
        (lambda p: HypergradientSGD(p, hypergrad_lr=-1e-3), "hypergrad_lr"),
        (lambda p: HypergradientSGD(p, momentum=1.0), "momentum"),
        (lambda p: HypergradientSGD(p, dampening=-0.1), "dampening"),
        (lambda p: HypergradientSGD(p, nesterov=True), "nesterov"),
        (lambda p: HypergradientSGD(p, weight_decay=float("nan")), "weight_decay"),
        (lambda p: HypergradientAdam(p, betas=(0.9,)), "betas"),
        (lambda p: HypergradientAdam(p, betas=(0.9, 1.0)), "betas"),
        (lambda p: HypergradientAdam(p, eps=0.0), "eps"),
        (lambda p: HypergradientAdam(p, lr="0.1"), "lr"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.zeros(2, requires_grad=True)])


@settings(max_examples=30, deadline=None)
@given(lr=st.floats(max_value=-1e-12, allow_nan=False) | st.just(float("nan")) | st.just(float("inf")))
def test_negative_or_non_finite_learning_rates_are_refused(lr):
    for cls in (HypergradientSGD, HypergradientAdam):
        with pytest.raises(ValueError, match="lr"):
            cls([torch.zeros(2, requires_grad=True)], lr=lr)
        with pytest.raises(ValueError, match="hypergrad_lr"):
            cls([torch.zeros(2, requires_grad=True)], hypergrad_lr=lr)
