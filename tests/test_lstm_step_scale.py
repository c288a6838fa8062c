"""The LSTM's inputs for finding a task's step scale (issue 16 item 5): parameter-relative steps,
a gradient normalised per tensor, Celo's loss-trend features and the training fraction."""

from __future__ import annotations

import pytest
import torch

from metaoptimizer.rules import LSTMRule
from metaoptimizer.rules._celo_common import loss_buffer_decays, loss_buffer_features, update_loss_buffer

STEP_SCALE = {"preprocessing": "tensor_rms", "relative_step": True, "loss_features": True, "training_fraction": True,
              "momentum_decay": 0.9, "init_lr": 0.05}


def trajectory(rule, params, grads, losses, num_steps=20, chunk_size=None):
    """The updates of ``rule`` applied along a run over the given gradients and losses (float64)."""
    if chunk_size is not None:
        rule.chunk_size = chunk_size
    state = rule.init(params, num_steps=num_steps)
    rows = []
    with torch.no_grad():
        for g, loss in zip(grads, losses, strict=True):
            updates, state = rule.update(g, state, params, loss=loss)
            params = {k: params[k] + updates[k] for k in params}
            rows.append(updates)
    return rows, state


def random_run(steps=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(5, 4, generator=gen, dtype=torch.float64),
              "b": torch.randn(4, generator=gen, dtype=torch.float64)}
    grads = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
             for _ in range(steps)]
    losses = [2.0 / (1 + t) + 0.1 * float(torch.rand((), generator=gen)) for t in range(steps)]
    return params, grads, losses


@pytest.mark.parametrize(("c", "k"), [(1e-2, 1e2), (10.0, 10.0), (1e3, 1.0)])
def test_rescaled_parameters_and_gradients_rescale_the_update(c, k):
    """Parameters ``c`` times larger (augmentation's reparameterisation has ``k = 1 / c``), gradients
    ``k`` times larger and a loss ``7x`` larger give every update ``c`` times larger, to the
    float32 rounding of the loss features. (Gradients below ~1e-3 are not rescaled freely: the
    1e-8 added to the second moment, as in Adam, then matters; here every ``|g| >= 0.1``.)"""
    torch.manual_seed(0)
    rule = LSTMRule(**STEP_SCALE).double()
    with torch.no_grad():  # a head that matters, so the LSTM path is checked and not only the skip path
        rule.head.weight.normal_()
    params, grads, losses = random_run()
    grads = [{n: torch.sign(v) * (0.1 + v.abs()) for n, v in g.items()} for g in grads]
    reference, _ = trajectory(rule, params, grads, losses)
    scaled, _ = trajectory(rule, {n: c * v for n, v in params.items()},
                           [{n: k * v for n, v in g.items()} for g in grads], [7.0 * loss for loss in losses])
    for expected, got in zip(reference, scaled, strict=True):
        for name in expected:
            torch.testing.assert_close(got[name], c * expected[name], rtol=1e-5, atol=1e-6 * c * expected[name].abs().max())


def test_a_single_tensor_rescaled_alone_rescales_only_its_own_update():
    rule = LSTMRule(preprocessing="tensor_rms", relative_step=True, init_lr=0.05).double()
    params, grads, losses = random_run(steps=4, seed=1)
    reference, _ = trajectory(rule, params, grads, losses)
    scaled, _ = trajectory(rule, {**params, "b": 1e3 * params["b"]},
                           [{**g, "b": g["b"] * 1e2} for g in grads], losses)
    for expected, got in zip(reference, scaled, strict=True):
        torch.testing.assert_close(got["w"], expected["w"], rtol=1e-9, atol=0.0)
        torch.testing.assert_close(got["b"], 1e3 * expected["b"], rtol=1e-5, atol=0.0)


def test_untrained_relative_step_is_rmsprop_scaled_by_the_parameters_rms():
    """Head zeroed, the skip path alone: ``-init_lr * rms(p) * g / sqrt(v_hat + 1e-8)``."""
    rule = LSTMRule(preprocessing="tensor_rms", relative_step=True, init_lr=0.05).double()
    with torch.no_grad():
        rule.head.weight.zero_()
    params, grads, _ = random_run(steps=1, seed=2)
    updates, _ = rule.update(grads[0], rule.init(params), params)
    for name, p in params.items():
        g = grads[0][name]
        v_hat = (1 - rule.rms_decay) * g * g / (1 - rule.rms_decay)
        expected = -0.05 * p.square().mean().sqrt() * g / torch.sqrt(v_hat + 1e-8)
        torch.testing.assert_close(updates[name], expected, rtol=1e-9, atol=1e-12)


def test_loss_features_are_celos_loss_buffer_and_feed_the_cells():
    rule = LSTMRule(**STEP_SCALE).double()
    params, grads, losses = random_run(steps=5, seed=3)
    _, state = trajectory(rule, params, grads, losses)
    decays = loss_buffer_decays(20)
    means, minima, count = torch.zeros(10), torch.full((10,), 1e12), torch.zeros(1)
    for loss in losses:
        means, minima = update_loss_buffer(means, minima, decays, torch.tensor(loss, dtype=torch.float32), count)
        count = count + 1
    for name in params:
        torch.testing.assert_close(state.slots["loss_means"][name], means)
        torch.testing.assert_close(state.slots["loss_min"][name], minima)
        assert float(state.slots["loss_count"][name]) == 5
    context, _ = rule._context([0.25], state, "w", torch.tensor(0.3), torch.float64)
    expected_features = loss_buffer_features(*update_loss_buffer(means, minima, decays, torch.tensor(0.3), count),
                                             decays, count + 1)
    assert context[0] == 0.25 and context.shape == (10,) and expected_features.abs().sum() > 0
    torch.testing.assert_close(context[1:], expected_features.double())
    # the same gradients with a rising loss give other updates once the buffer has 3 losses
    rising, _ = trajectory(rule, params, grads, [0.5 + 0.2 * t for t in range(5)])
    falling, _ = trajectory(rule, params, grads, [0.5 - 0.05 * t for t in range(5)])
    torch.testing.assert_close(rising[1]["w"], falling[1]["w"])
    assert not torch.allclose(rising[4]["w"], falling[4]["w"])


def test_tensor_rms_preprocessing_normalises_over_the_whole_tensor_whatever_the_chunks():
    rule = LSTMRule(**STEP_SCALE).double()
    params, grads, losses = random_run(steps=3, seed=4)
    whole, _ = trajectory(rule, params, grads, losses)
    chunked, _ = trajectory(rule, params, grads, losses, chunk_size=3)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_update_in_place_matches_update_with_the_new_inputs():
    rule = LSTMRule(**STEP_SCALE, chunk_size=7)
    params, grads, losses = random_run(steps=4, seed=5)
    params = {k: v.float() for k, v in params.items()}
    expected = {k: v.clone() for k, v in params.items()}
    reference, state = rule.init(expected, num_steps=10), rule.init(params, num_steps=10)
    with torch.no_grad():
        for g, loss in zip(grads, losses, strict=True):
            g = {k: v.float() for k, v in g.items()}
            updates, reference = rule.update(g, reference, expected, loss=loss)
            expected = {k: expected[k] + 0.5 * updates[k] for k in expected}
            state = rule.update_in_place(g, state, params, lr=0.5, loss=loss)
    torch.testing.assert_close(params, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(state.slots["loss_means"], reference.slots["loss_means"])


def test_the_new_inputs_are_differentiable_and_need_the_loss_and_the_budget():
    rule = LSTMRule(**STEP_SCALE)
    params = {"w": torch.randn(3, 2)}
    state = rule.init(params, num_steps=10)
    with pytest.raises(ValueError, match="reads the training loss"):
        rule.update({"w": torch.randn(3, 2)}, state, params)
    with pytest.raises(ValueError, match="budget-aware"):
        rule.init(params)
    for _ in range(3):
        updates, state = rule.update({"w": torch.randn(3, 2)}, state, params, loss=torch.tensor(1.5))
    grads = torch.autograd.grad(updates["w"].square().sum(), [rule.input_weights[0], rule.skip])
    assert rule.input_weights[0].shape[0] == 3 + 1 + 9  # directions (grad, RMS-, momentum-normalised), fraction, loss
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert rule.reads_loss and rule.budget_aware and not LSTMRule().reads_loss


@pytest.mark.parametrize(("option", "value"), [("relative_step", 1), ("loss_features", "yes")])
def test_new_flags_must_be_booleans(option, value):
    with pytest.raises(ValueError, match=option):
        LSTMRule(**{option: value})
