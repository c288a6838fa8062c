import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pathlib import Path

from metaoptimizer import pretrained
from metaoptimizer.rules.lstm import LSTMRule, budget_aware_lstm, log_sign_preprocess

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
    updates, new_state = rule.update(grads, state, params)
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
    u1, _ = rule.update({"w": g}, rule.init({"w": g}), {"w": g})
    u2, _ = rule.update({"w": g[perm]}, rule.init({"w": g}), {"w": g})
    torch.testing.assert_close(u1["w"][perm], u2["w"])


def test_chunked_update_equals_unchunked_and_bfloat16_state_is_narrow():
    params = _params()
    rule = LSTMRule(hidden_size=8)
    chunked = LSTMRule(hidden_size=8, chunk_size=4)
    chunked.load_state_dict(rule.state_dict())
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    state, cstate = rule.init(params), chunked.init(params)
    for step in (1, 2, 3):
        u, state = rule.update(grads, state, params)
        cu, cstate = chunked.update(grads, cstate, params)
        for name in params:
            torch.testing.assert_close(u[name], cu[name])
    # meta-gradients through the chunked path equal the unchunked ones
    meta = [torch.autograd.grad(sum(u.sum() for u in r.update(grads, r.init(params), params)[0].values()),
                                list(r.parameters())) for r in (rule, chunked)]
    for a, b in zip(*meta, strict=True):
        torch.testing.assert_close(a, b)
    narrow = LSTMRule(hidden_size=8, state_dtype="bfloat16", chunk_size=5)
    s = narrow.init(params)
    _, s = narrow.update(grads, s, params)
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
    updates, _ = rule.update(grads, rule.init(params), params)
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
        updates, state = rule.update({"w": g}, state, params)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        expected = -lr * (m / (1 - beta1**step)) / torch.sqrt(v / (1 - beta2**step) + 1e-8)
        torch.testing.assert_close(updates["w"], expected)
    assert set(state.slots) == {"hidden", "cell", "rms", "momentum"}




def test_budget_aware_lstm_scales_updates_by_the_learned_warmup_cosine_schedule():
    rule = budget_aware_lstm(100, warmup_fraction=0.1, init_lr=0.01, momentum_decay=0.9).double()
    _silence_lstm(rule.members["lstm"])
    plain = LSTMRule(init_lr=0.01, momentum_decay=0.9).double()
    _silence_lstm(plain)
    params = {"w": torch.randn(5, dtype=torch.float64)}
    state, plain_state = rule.init(params), plain.init(params)
    assert state.num_steps == 100  # the schedule's length is the default budget
    factors = []
    for _ in range(100):
        g = {"w": torch.randn(5, dtype=torch.float64)}
        with torch.no_grad():
            updates, state = rule.update(g, state, params)
            reference, plain_state = plain.update(g, plain_state, params)
        factors.append(float(updates["w"][0] / reference["w"][0]))
    peak = max(range(100), key=factors.__getitem__)
    assert factors[0] == pytest.approx(0.01, rel=1e-6)  # floor of the schedule at step 0
    assert 8 <= peak <= 12 and factors[peak] == pytest.approx(1.0, abs=0.02)  # end of the warmup
    assert factors[-1] < 0.05 and all(a >= b - 1e-9 for a, b in zip(factors[peak:], factors[peak + 1 :], strict=False))


def test_the_budget_in_the_state_stretches_the_schedule_and_feeds_the_cells():
    rule = budget_aware_lstm(50)
    params, grads = {"w": torch.randn(6)}, {"w": torch.randn(6)}
    at = lambda num_steps, count: rule.update(  # noqa: E731
        grads, rule.init(params, num_steps=num_steps).replace(step_count=count), params
    )[0]["w"]
    assert not torch.allclose(at(200, 39), at(50, 39))
    # the cells alone read the fraction too: without the schedule the updates still differ
    lstm = rule.members["lstm"]
    cells = lambda num_steps: lstm.update(grads, lstm.init(params, num_steps=num_steps).replace(step_count=39), params)  # noqa: E731
    assert not torch.allclose(cells(200)[0]["w"], cells(50)[0]["w"])
    with pytest.raises(ValueError, match="budget-aware: pass the run's length"):
        lstm.init(params)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LSTMRule(momentum_decay=1.0), "momentum_decay"),
        (lambda: LSTMRule(momentum_decay=0.9, preconditioning=False), "preconditioning"),
        (lambda: LSTMRule(training_fraction=1), "training_fraction"),
        (lambda: budget_aware_lstm(0), "num_steps"),
        (lambda: budget_aware_lstm(10, schedule_knots=0), "schedule_knots"),
        (lambda: budget_aware_lstm(10, warmup_fraction=1.5), "warmup_fraction"),
    ],
)
def test_bad_momentum_and_budget_options_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_budget_aware_rule_is_differentiable_in_its_schedule():
    rule = budget_aware_lstm(20, init_lr=0.01, momentum_decay=0.9)
    params = {"w": torch.randn(4)}
    updates, _ = rule.update({"w": torch.randn(4)}, rule.init(params), params)
    knots = rule.members["schedule"].schedule.log_knots
    grads = torch.autograd.grad(updates["w"].sum(), [knots, rule.members["lstm"].skip])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_shipped_rule_as_a_named_chain_reproduces_the_monolithic_rule():
    """Updates of the shipped ``lstm-digits-mlp`` equal those its pre-chain form (an LSTM with a
    built-in schedule) recorded in ``tests/data`` over 60 steps, up to float rounding (the schedule
    factor is now applied after ``output_scale`` instead of with it)."""
    reference = torch.load(Path(__file__).parent / "data" / "lstm_digits_mlp_updates.pt", weights_only=True)
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        rule = pretrained.load("lstm-digits-mlp").rule.to(dtype)
        g = torch.Generator().manual_seed(0)
        params = {"w": torch.randn(7, 5, generator=g, dtype=dtype), "b": torch.randn(5, generator=g, dtype=dtype)}
        state = rule.init(params, num_steps=50)
        rows = []
        for t in range(60):
            grads = {k: torch.randn(v.shape, generator=g, dtype=dtype) * (1 + t) ** -0.5 for k, v in params.items()}
            with torch.no_grad():
                updates, state = rule.update(grads, state, params)
            params = {k: params[k] + updates[k] for k in params}
            rows.append(torch.cat([updates["w"].flatten(), updates["b"].flatten()]))
        torch.testing.assert_close(torch.stack(rows), reference[str(dtype)], rtol=tolerance, atol=tolerance * 1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", [{}, {"momentum_decay": 0.9, "init_lr": 0.01, "chunk_size": 7}])
def test_update_in_place_equals_update_then_add(dtype, options):
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}
    rule = LSTMRule(**options).to(dtype)
    g = torch.Generator().manual_seed(3)
    expected = {"w": torch.randn(9, 4, generator=g, dtype=dtype), "b": torch.randn(4, generator=g, dtype=dtype)}
    params = {name: p.clone() for name, p in expected.items()}
    reference, state = rule.init(expected), rule.init(params)
    kept = {slot: dict(values) for slot, values in state.slots.items()}
    with torch.no_grad():
        for t in range(5):
            grads = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in params.items()}
            updates, reference = rule.update(grads, reference, expected)
            expected = {name: p + 0.3 * updates[name] for name, p in expected.items()}
            state = rule.update_in_place(grads, state, params, lr=0.3)
    torch.testing.assert_close(params, expected, **tolerance)
    for slot, values in kept.items():
        for name, tensor in values.items():
            assert state.slots[slot][name] is tensor
            torch.testing.assert_close(tensor, reference.slots[slot][name], **tolerance)


@pytest.mark.parametrize("needs_grad", ["params", "grads"])
def test_update_in_place_refuses_an_autograd_graph(needs_grad):
    rule = LSTMRule()
    params = {"w": torch.randn(3, 2, requires_grad=needs_grad == "params")}
    grads = {"w": torch.randn(3, 2, requires_grad=needs_grad == "grads")}
    with pytest.raises(ValueError, match="update_in_place is for deployment"):
        rule.update_in_place(grads, rule.init(params), params)


def test_default_step_equals_the_plain_cell_formula():
    """The stacked [x, h] product, reordered gates and chunks give the textbook cell's numbers."""
    rule = LSTMRule(hidden_size=6, chunk_size=5).double()
    g = torch.Generator().manual_seed(8)
    params = {"w": torch.randn(4, 7, generator=g, dtype=torch.float64)}
    grads = {"w": torch.randn(4, 7, generator=g, dtype=torch.float64)}
    state = rule.init(params)
    with torch.no_grad():
        _, state = rule.update(grads, state, params)
        updates, new_state = rule.update(grads, state, params)
    flat = grads["w"].reshape(-1)
    rms = state.slots["rms"]["w"].reshape(-1) * rule.rms_decay + (1 - rule.rms_decay) * flat**2
    x = torch.cat([log_sign_preprocess(flat, rule.preprocess_p),
                   (flat * torch.rsqrt(rms / (1 - rule.rms_decay**2) + 1e-8))[:, None]], dim=-1)
    directions, hidden = x, []
    for layer in range(rule.num_layers):
        gates = x @ rule.input_weights[layer] + state.slots["hidden"]["w"][layer] @ rule.hidden_weights[layer]
        i, f, c_in, o = (gates + rule.biases[layer]).chunk(4, dim=-1)
        c = torch.sigmoid(f) * state.slots["cell"]["w"][layer] + torch.sigmoid(i) * torch.tanh(c_in)
        x = torch.sigmoid(o) * torch.tanh(c)
        hidden.append(x)
    expected = rule.output_scale * (rule.head(x).squeeze(-1) + directions @ rule.skip)
    torch.testing.assert_close(updates["w"].reshape(-1), expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_state.slots["hidden"]["w"], torch.stack(hidden).detach(), rtol=1e-12, atol=1e-12)


STEP_SCALE_OPTIONS = {"preprocessing": "tensor_rms", "relative_step": True, "loss_features": True,
                      "training_fraction": True}


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, STEP_SCALE_OPTIONS])
def test_compiled_cells_match_the_eager_ones(options):
    """``backend='auto'`` compiles the cells of a large tensor without autograd; float32 to 1e-6
    (with the step-scale inputs, the run's context reaches the compiled cells as a tensor)."""
    auto = LSTMRule(momentum_decay=0.9, init_lr=0.01, **options)
    eager = LSTMRule(momentum_decay=0.9, init_lr=0.01, backend="eager", **options)
    eager.load_state_dict(auto.state_dict())
    g = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(300, 250, generator=g)}
    results = []
    for rule in (auto, eager):
        state, p, rows = rule.init(params, num_steps=10), dict(params), []
        with torch.no_grad():
            for t in range(3):
                grads = {"w": torch.randn(300, 250, generator=torch.Generator().manual_seed(t))}
                updates, state = rule.update(grads, state, p, loss=1.0 / (1 + t))
                p = {"w": p["w"] + updates["w"]}
                rows.append(updates["w"])
        results.append(rows)
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
