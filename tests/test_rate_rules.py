"""Online per-coordinate rates: the hypergradient rule (SGD reference, rate gradient against
autograd, clamping, reset) and the seed's documented rule (against a hand computation)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from metaoptimizer.optim import LearnedOptimizer
from metaoptimizer.rules.base import apply_updates
from metaoptimizer.rules.rates import HypergradientRule, ShrinkingRatesRule
from metaoptimizer.rules.state import OptimizerState


def quartic_loss(params):
    """A non-quadratic loss, so consecutive gradients are not simply proportional."""
    w, b = params["w"], params["b"]
    return ((w - 1.0) ** 4).sum() + (w**2).sum() * (b**2).sum() + ((b + 0.5) ** 2).sum()


def gradients(params):
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    grads = torch.autograd.grad(quartic_loss(leaves), list(leaves.values()))
    return dict(zip(leaves, grads))


def start_params():
    torch.manual_seed(0)
    return {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}


def run(rule, params, steps, state=None):
    state = rule.init(params) if state is None else state
    history = []
    for _ in range(steps):
        grads = gradients(params)
        updates, state = rule.update(grads, state, params)
        params = apply_updates(params, updates)
        history.append((grads, state))
    return params, state, history


def test_init_shapes_and_values():
    params = start_params()
    state = HypergradientRule(base_lr=0.02).init(params)
    assert state.step_count == 0
    for name, p in params.items():
        assert torch.equal(state.per_param_lr[name], torch.full_like(p, 0.02))
        for slot in ("update_sum", "alpha_grad"):
            assert torch.equal(state.slots[slot][name], torch.zeros_like(p))


def test_zero_alpha_lr_is_torch_sgd():
    model = nn.Linear(4, 3)
    reference = nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    ours = LearnedOptimizer(model.parameters(), HypergradientRule(base_lr=0.05, alpha_lr=0.0))
    torch_sgd = torch.optim.SGD(reference.parameters(), lr=0.05)
    for _ in range(100):
        for net, optimizer in ((model, ours), (reference, torch_sgd)):
            optimizer.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_one_step_meta_gradient_matches_autograd():
    """alpha_3 = alpha_2 - alpha_lr * d L(theta_2) / d alpha_2 with theta_2 = theta_1 - alpha_2 * g_2."""
    rule = HypergradientRule(base_lr=0.01, alpha_lr=1e-5, clamp=(1e-8, 10.0))
    _, _, history = run(rule, start_params(), 3)
    theta_1, _, _ = run(rule, start_params(), 1)
    (grads_2, state_2), (_, state_3) = history[1], history[2]
    alpha = {n: a.clone().requires_grad_() for n, a in state_2.per_param_lr.items()}
    theta_2 = {n: theta_1[n] - alpha[n] * grads_2[n] for n in alpha}
    meta_grads = torch.autograd.grad(quartic_loss(theta_2), list(alpha.values()))
    for (name, a), meta_grad in zip(alpha.items(), meta_grads):
        torch.testing.assert_close(state_3.per_param_lr[name], a.detach() - 1e-5 * meta_grad)
        assert (state_3.per_param_lr[name] > 1e-8).all() and (state_3.per_param_lr[name] < 10).all()  # unclamped
        assert not torch.allclose(meta_grad, torch.zeros_like(meta_grad))


@pytest.mark.parametrize("window", [2, 3])
def test_windowed_meta_gradient_matches_autograd_with_constant_gradients(window):
    """Over a window, alpha moves by -alpha_lr * d(sum of the window's losses)/d alpha, with the
    applied gradients held constant (first order)."""
    rule = HypergradientRule(base_lr=0.01, alpha_lr=1e-5, inner_steps=window)
    params = start_params()
    _, state, history = run(rule, params, 2 * window)
    # Second window: alpha_1 (set at step `window`) is applied at steps window .. 2*window-1
    # and its meta-gradient collects the losses at steps window+1 .. 2*window.
    theta_start, _, _ = run(rule, start_params(), window - 1)
    alpha = {n: a.clone().requires_grad_() for n, a in history[window - 1][1].per_param_lr.items()}
    applied = [history[t][0] for t in range(window - 1, 2 * window - 1)]
    theta, total = dict(theta_start), 0.0
    for grads in applied:
        theta = {n: theta[n] - alpha[n] * grads[n] for n in theta}
        total = total + quartic_loss(theta)
    meta_grads = torch.autograd.grad(total, list(alpha.values()))
    for (name, a), meta_grad in zip(alpha.items(), meta_grads):
        torch.testing.assert_close(state.per_param_lr[name], a.detach() - 1e-5 * meta_grad, rtol=1e-9, atol=1e-12)
        assert (state.per_param_lr[name] > 1e-8).all() and (state.per_param_lr[name] < 10).all()  # unclamped
    # alpha is constant inside a window
    for t in range(window, 2 * window - 1):
        torch.testing.assert_close(history[t][1].per_param_lr["w"], history[window - 1][1].per_param_lr["w"])


def test_alpha_is_clamped():
    rule = HypergradientRule(base_lr=0.5, alpha_lr=1e6, clamp=(1e-3, 2.0))
    params = {"p": torch.tensor([1.0, -1.0])}
    state = rule.init(params)
    aligned = {"p": torch.tensor([1.0, 1.0])}
    _, state = rule.update(aligned, state, params)
    _, state = rule.update({"p": torch.tensor([1.0, -1.0])}, state, params)
    clamped = torch.tensor([2.0, 1e-3])
    torch.testing.assert_close(state.per_param_lr["p"], clamped)  # +g*g pushes up, -g*g pushes down
    updates, state = rule.update({"p": torch.tensor([3.0, 3.0])}, state, params)
    torch.testing.assert_close(state.per_param_lr["p"], clamped)
    assert state.step_count == 3
    torch.testing.assert_close(updates["p"], torch.tensor([-6.0, -3e-3]))


def test_reset_per_param_lr_keeps_the_step_count():
    rule = HypergradientRule(base_lr=0.01, alpha_lr=1.0, inner_steps=2)
    _, state, _ = run(rule, start_params(), 3)
    assert not torch.allclose(state.per_param_lr["w"], torch.full_like(state.per_param_lr["w"], 0.01))
    reset = rule.reset_per_param_lr(state)
    assert reset.step_count == 3
    fresh = rule.init(start_params())
    for name in fresh.per_param_lr:
        assert torch.equal(reset.per_param_lr[name], fresh.per_param_lr[name])
        for slot in ("update_sum", "alpha_grad"):
            assert torch.equal(reset.slots[slot][name], fresh.slots[slot][name])
    assert state.per_param_lr["w"] is not reset.per_param_lr["w"]  # pure: the input is unchanged
    with pytest.raises(ValueError, match="no 'alpha' slot"):
        rule.reset_per_param_lr(OptimizerState())


def test_rule_is_differentiable_in_its_inputs():
    rule = HypergradientRule(base_lr=0.1, alpha_lr=0.5)
    params = {"p": torch.tensor([0.5, -0.25], requires_grad=True)}
    state = rule.init(params)
    grads = {"p": 2 * params["p"]}
    updates, state = rule.update(grads, state, params)
    new_params = apply_updates(params, updates)
    updates, state = rule.update({"p": 2 * new_params["p"]}, state, new_params)
    (gradient,) = torch.autograd.grad(apply_updates(new_params, updates)["p"].sum(), params["p"])
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_learned_optimizer_state_dict_round_trip():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randn(32, 1)

    def train(model, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()

    model = nn.Linear(3, 1)
    clone = nn.Linear(3, 1)
    rule = HypergradientRule(base_lr=0.05, alpha_lr=0.1, inner_steps=2)
    optimizer = LearnedOptimizer(model.parameters(), rule)
    train(model, optimizer, 5)
    clone.load_state_dict(model.state_dict())
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = LearnedOptimizer(clone.parameters(), HypergradientRule(base_lr=0.05, alpha_lr=0.1, inner_steps=2))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    train(model, optimizer, 5)
    train(clone, resumed, 5)
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    rates = [optimizer.state[p]["alpha"] for p in model.parameters()]
    assert any(not torch.allclose(r, torch.full_like(r, 0.05)) for r in rates)


def test_hyperparameters_rebuild_the_rule():
    rule = HypergradientRule(base_lr=0.02, alpha_lr=0.3, clamp=(1e-6, 1.0), inner_steps=4)
    assert rule.hyperparameters() == {"base_lr": 0.02, "alpha_lr": 0.3, "clamp": (1e-6, 1.0), "inner_steps": 4}
    assert HypergradientRule(**rule.hyperparameters()).hyperparameters() == rule.hyperparameters()
    assert list(rule.parameters()) == []


@settings(max_examples=40, deadline=None)
@given(
    clamp=st.one_of(
        st.tuples(st.floats(-1, 0), st.floats(1, 2)),
        st.tuples(st.floats(2, 3), st.floats(0.5, 1)),  # low above high
        st.tuples(st.just(1e-8), st.just(math.inf)),
        st.just((1e-8,)),
        st.just("1e-8,10"),
    )
)
def test_bad_clamp_is_rejected(clamp):
    with pytest.raises(ValueError, match="clamp must be"):
        HypergradientRule(base_lr=0.01, clamp=clamp)


@pytest.mark.parametrize("clamp", [(0.5, 1.0), (1e-8, 1e-3)])
def test_base_lr_outside_the_clamp_is_rejected(clamp):
    with pytest.raises(ValueError, match="base_lr must lie within clamp"):
        HypergradientRule(base_lr=0.01, clamp=clamp)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(base_lr=0.0), "base_lr"),
        (dict(alpha_lr=-1.0), "alpha_lr"),
        (dict(alpha_lr=math.nan), "alpha_lr"),
        (dict(inner_steps=0), "inner_steps"),
        (dict(inner_steps=1.5), "inner_steps"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HypergradientRule(**kwargs)


def test_bad_updates_are_rejected():
    rule = HypergradientRule()
    params = {"p": torch.zeros(2)}
    state = rule.init(params)
    with pytest.raises(ValueError, match="unknown parameter 'q'"):
        rule.update({"q": torch.zeros(2)}, state, params)
    with pytest.raises(ValueError, match="has shape \\(3,\\)"):
        rule.update({"p": torch.zeros(3)}, state, params)
    advanced = state.replace(step_count=1)
    with pytest.raises(ValueError, match=r"no \['alpha'\] entry for 'p'; build the state with HypergradientRule.init"):
        rule.update({"p": torch.zeros(2)}, advanced.replace(slots={**state.slots, "alpha": {}}), params)


# --- the seed's documented rule ----------------------------------------------------------------

def test_shrinking_rates_rule_has_the_documented_defaults_and_accessors():
    rule = ShrinkingRatesRule()
    assert (rule.alpha_lr, rule.inner_steps, rule.clamp) == (1e-3, 5, (1e-8, 10.0))
    assert rule.get_learning_rate() == rule.base_lr == HypergradientRule().base_lr
    params = start_params()
    _, state, _ = run(rule, params, 7)
    assert state.step_count == 7 and set(rule.get_per_param_lr(state)) == set(params)
    rule.set_learning_rate(0.2)
    assert rule.get_learning_rate() == 0.2
    assert all(torch.all(a == 0.2) for a in rule.get_per_param_lr(rule.reset_per_param_lr(state)).values())
    with pytest.raises(ValueError, match="base_lr must lie within clamp"):
        rule.set_learning_rate(20.0)


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_shrinking_rates_rule_against_a_hand_computation(inner_steps):
    """delta = alpha * g; theta -= delta; alpha -= alpha_lr * g * delta (summed over a window of
    ``inner_steps`` updates, applied at its end), clamped to [1e-8, 10]."""
    alpha_lr, base_lr = 0.5, 0.1
    rule = ShrinkingRatesRule(base_lr=base_lr, alpha_lr=alpha_lr, inner_steps=inner_steps)
    params = start_params()
    got, state, _ = run(rule, params, 7)
    theta = {n: p.clone() for n, p in params.items()}
    alpha = {n: torch.full_like(p, base_lr) for n, p in params.items()}
    window = {n: torch.zeros_like(p) for n, p in params.items()}
    for step in range(1, 8):
        grads = gradients(theta)
        for name, g in grads.items():
            delta = alpha[name] * g
            theta[name] = theta[name] - delta
            window[name] = window[name] + g * delta
            if step % inner_steps == 0:
                alpha[name] = (alpha[name] - alpha_lr * window[name]).clamp(1e-8, 10.0)
                window[name] = torch.zeros_like(g)
    for name in params:
        torch.testing.assert_close(got[name], theta[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.per_param_lr[name], alpha[name], rtol=1e-12, atol=1e-12)
        assert (state.per_param_lr[name] <= base_lr).all()  # the documented rule only ever shrinks alpha
    assert (state.per_param_lr["w"] < base_lr).any()


def test_only_the_hypergradient_rule_raises_rates():
    """Consecutive gradients that agree raise the hypergradient rule's rates; the documented rule
    shrinks them whatever the gradients do."""
    params = {"p": torch.zeros(2, dtype=torch.float64)}
    grads = {"p": torch.tensor([1.0, -1.0], dtype=torch.float64)}
    for rule, rises in ((HypergradientRule(base_lr=0.1, alpha_lr=0.01), True),
                        (ShrinkingRatesRule(base_lr=0.1, alpha_lr=0.01, inner_steps=1), False)):
        state = rule.init(params)
        for _ in range(3):
            _, state = rule.update(grads, state, params)
        assert bool((state.per_param_lr["p"] > 0.1).all()) == rises
