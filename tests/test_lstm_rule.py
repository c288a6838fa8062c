import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaoptimizer.rules.lstm import LSTMRule, log_sign_preprocess

SHAPES = {"vector": (5,), "matrix": (3, 4), "conv": (2, 3, 3, 3), "scalar": ()}


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return {n: torch.randn(s, generator=gen, dtype=dtype) for n, s in SHAPES.items()}


def test_log_sign_preprocess_matches_paper_formula():
    p = 10.0
    g = torch.tensor([1.0, -0.5, 1e-6, -1e-7, 0.0])
    out = log_sign_preprocess(g, p)
    threshold = math.exp(-p)
    for value, (a, b) in zip(g.tolist(), out.tolist(), strict=True):
        if abs(value) >= threshold:
            assert a == pytest.approx(math.log(abs(value)) / p)
            assert b == pytest.approx(math.copysign(1.0, value))
        else:
            assert a == -1.0
            assert b == pytest.approx(math.exp(p) * value, rel=1e-5)


def test_log_sign_gradient_is_finite_at_zero():
    g = torch.zeros(3, requires_grad=True)
    log_sign_preprocess(g, 10.0).sum().backward()
    assert torch.isfinite(g.grad).all()


@pytest.mark.parametrize("preprocessing", ["log_sign", "none"])
@pytest.mark.parametrize("preconditioning", [True, False])
def test_update_runs_on_every_shape_and_keeps_per_coordinate_state(preprocessing, preconditioning):
    rule = LSTMRule(hidden_size=8, num_layers=2, preprocessing=preprocessing, preconditioning=preconditioning)
    params = _params()
    state = rule.init(params)
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    updates, new_state = rule.update(grads, state, params, 1)
    for name, p in params.items():
        assert updates[name].shape == p.shape
        assert new_state.hidden[name].shape == (2, p.numel(), 8)
        assert torch.isfinite(updates[name]).all()
    assert new_state.step_count == 1
    assert ("rms" in new_state.slots) == preconditioning
    # the input state is not mutated
    assert all(torch.count_nonzero(h) == 0 for h in state.hidden.values())


def test_coordinates_are_independent_and_weights_shared():
    """Permuting coordinates permutes the updates: the same LSTM runs on each coordinate."""
    rule = LSTMRule(hidden_size=6)
    g = torch.randn(7)
    perm = torch.randperm(7)
    u1, _ = rule.update({"w": g}, rule.init({"w": g}), {"w": g}, 1)
    u2, _ = rule.update({"w": g[perm]}, rule.init({"w": g}), {"w": g}, 1)
    torch.testing.assert_close(u1["w"][perm], u2["w"])


def test_chunked_update_equals_unchunked_and_bfloat16_state_is_narrow():
    params = _params()
    rule = LSTMRule(hidden_size=8)
    chunked = LSTMRule(hidden_size=8, chunk_size=4)
    chunked.load_state_dict(rule.state_dict())
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    state, cstate = rule.init(params), chunked.init(params)
    for step in (1, 2, 3):
        u, state = rule.update(grads, state, params, step)
        cu, cstate = chunked.update(grads, cstate, params, step)
        for name in params:
            torch.testing.assert_close(u[name], cu[name])
    # meta-gradients through the chunked path equal the unchunked ones
    meta = [torch.autograd.grad(sum(u.sum() for u in r.update(grads, r.init(params), params, 1)[0].values()),
                                list(r.parameters())) for r in (rule, chunked)]
    for a, b in zip(*meta, strict=True):
        torch.testing.assert_close(a, b)
    narrow = LSTMRule(hidden_size=8, state_dtype="bfloat16", chunk_size=5)
    s = narrow.init(params)
    _, s = narrow.update(grads, s, params, 1)
    assert all(h.dtype == torch.bfloat16 for h in [*s.hidden.values(), *s.cell.values()])


def test_forget_gate_bias_initialised():
    rule = LSTMRule(hidden_size=4, forget_bias=2.0)
    for b in rule.biases:
        assert torch.all(b[4:8] == 2.0)
        assert torch.all(b[:4] == 0.0)


def test_update_is_differentiable_twice():
    rule = LSTMRule(hidden_size=4).double()
    params = {n: p.requires_grad_() for n, p in _params(torch.float64).items()}
    loss = sum((p**2).sum() for p in params.values())
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True), strict=True))
    updates, _ = rule.update(grads, rule.init(params), params, 1)
    total = sum(u.sum() for u in updates.values())
    meta = torch.autograd.grad(total, list(rule.parameters()), allow_unused=True, retain_graph=True)
    assert all(g is None or torch.isfinite(g).all() for g in meta)
    second = torch.autograd.grad(total, list(params.values()))
    assert all(torch.isfinite(g).all() for g in second)


@settings(max_examples=25, deadline=None)
@given(
    field=st.sampled_from(["hidden_size", "num_layers", "preprocess_p", "output_scale", "rms_decay", "chunk_size"]),
    value=st.one_of(st.integers(-5, 0), st.floats(allow_nan=True), st.just(1.5)),
)
def test_bad_hyperparameters_raise(field, value):
    valid_float = field in {"preprocess_p", "output_scale"} and isinstance(value, float) and value > 0
    valid_float |= field == "rms_decay" and isinstance(value, float) and 0 < value < 1
    if valid_float:
        return
    with pytest.raises(ValueError, match=field):
        LSTMRule(**{field: value})


@pytest.mark.parametrize(("kw", "match"), [({"preprocessing": "log"}, "log_sign"), ({"state_dtype": "int8"}, "bfloat16")])
def test_unknown_choices_list_accepted_values(kw, match):
    with pytest.raises(ValueError, match=match):
        LSTMRule(**kw)


def _silence_lstm(rule: LSTMRule) -> None:
    """Zero the LSTM head so that the update is the skip path alone."""
    with torch.no_grad():
        rule.head.weight.zero_()
        rule.head.bias.zero_()


def test_untrained_skip_path_with_momentum_is_adam():
    """init_lr with momentum_decay starts the rule as Adam (eps under the square root)."""
    lr, beta1, beta2 = 0.03, 0.9, 0.999
    rule = LSTMRule(init_lr=lr, momentum_decay=beta1, rms_decay=beta2).double()
    _silence_lstm(rule)
    params = {"w": torch.randn(4, 3, dtype=torch.float64)}
    state = rule.init(params)
    m = torch.zeros_like(params["w"])
    v = torch.zeros_like(params["w"])
    for step in range(1, 6):
        g = torch.randn_like(params["w"])
        updates, state = rule.update({"w": g}, state, params, step)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        expected = -lr * (m / (1 - beta1**step)) / torch.sqrt(v / (1 - beta2**step) + 1e-8)
        torch.testing.assert_close(updates["w"], expected)
    assert set(state.slots) == {"rms", "momentum"}


def test_horizon_scales_updates_by_the_learned_warmup_cosine_schedule():
    rule = LSTMRule(init_lr=0.01, momentum_decay=0.9, horizon=100, warmup_fraction=0.1).double()
    _silence_lstm(rule)
    plain = LSTMRule(init_lr=0.01, momentum_decay=0.9).double()
    _silence_lstm(plain)
    params = {"w": torch.randn(5, dtype=torch.float64)}
    state, plain_state = rule.init(params), plain.init(params)
    factors = []
    for step in range(1, 101):
        g = {"w": torch.randn(5, dtype=torch.float64)}
        with torch.no_grad():
            updates, state = rule.update(g, state, params, step)
            reference, plain_state = plain.update(g, plain_state, params, step)
        factors.append(float(updates["w"][0] / reference["w"][0]))
    peak = max(range(100), key=factors.__getitem__)
    assert factors[0] == pytest.approx(0.01, rel=1e-6)  # floor of the schedule at step 0
    assert 8 <= peak <= 12 and factors[peak] == pytest.approx(1.0, abs=0.02)  # end of the warmup
    assert factors[-1] < 0.05 and all(a >= b - 1e-9 for a, b in zip(factors[peak:], factors[peak + 1 :], strict=False))


def test_set_horizon_stretches_the_schedule_and_feeds_progress():
    rule = LSTMRule(horizon=50)
    rule.set_horizon(200)
    assert rule.horizon == 200 and rule.schedule.total_steps == 200
    assert rule.hyperparameters()["horizon"] == 200
    # the progress feature is an input of the cells: changing the horizon changes the update
    params = {"w": torch.randn(6)}
    grads = {"w": torch.randn(6)}
    first, _ = rule.update(grads, rule.init(params), params, 40)
    rule.set_horizon(50)
    second, _ = rule.update(grads, rule.init(params), params, 40)
    assert not torch.allclose(first["w"], second["w"])
    with pytest.raises(ValueError, match="steps"):
        rule.set_horizon(0)
    unaware = LSTMRule()
    unaware.set_horizon(10)
    assert unaware.horizon is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"momentum_decay": 1.0}, "momentum_decay"),
        ({"momentum_decay": 0.9, "preconditioning": False}, "preconditioning"),
        ({"horizon": 0}, "horizon"),
        ({"horizon": 10, "schedule_knots": 0}, "schedule_knots"),
        ({"warmup_fraction": 1.5}, "warmup_fraction"),
    ],
)
def test_bad_momentum_and_horizon_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        LSTMRule(**kw)


def test_budget_aware_rule_is_differentiable_in_its_schedule():
    rule = LSTMRule(init_lr=0.01, momentum_decay=0.9, horizon=20)
    params = {"w": torch.randn(4)}
    updates, _ = rule.update({"w": torch.randn(4)}, rule.init(params), params, 5)
    grads = torch.autograd.grad(updates["w"].sum(), [rule.schedule.log_knots, rule.skip])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_bad_update_calls_name_the_problem():
    rule = LSTMRule(hidden_size=4)
    params = {"w": torch.zeros(3)}
    state = rule.init(params)
    with pytest.raises(ValueError, match="shape"):
        rule.update({"w": torch.zeros(4)}, state, params, 1)
    with pytest.raises(ValueError, match="unknown parameter"):
        rule.update({"v": torch.zeros(3)}, state, params, 1)
    with pytest.raises(ValueError, match="1-based"):
        rule.update({"w": torch.zeros(3)}, state, params, 0)
    with pytest.raises(ValueError, match="init"):
        rule.update({"w": torch.zeros(3)}, rule.init({}), params, 1)
