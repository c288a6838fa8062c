"""GradientMetaLearner: MAML / scalar-LR MAML / Meta-SGD meta-gradients, adaptation, checkpoints."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from metaoptimizer.config import MetaOptTrainResult
from metaoptimizer.meta.gradient_learner import LR_MODES, GradientMetaLearner, inner_adapt
from metaoptimizer.meta.warp_grad import WarpGradLearner
from metaoptimizer.tasks.episodes import Episode, FewShotClassificationSampler, SinusoidSampler
from metaoptimizer.tasks.warp_models import interleave_warps


def tiny_regressor(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)


def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def sinusoid_episodes(count=3, dtype=torch.float32, seed=0):
    episodes = SinusoidSampler(k_shot=4, query_size=5).episodes(count, seed)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return [Episode(cast(e.support_x), cast(e.support_y), cast(e.query_x), cast(e.query_y), e.task_id) for e in episodes]


def classification_episodes(count=2):
    torch.manual_seed(1)
    classes = [torch.randn(8, 1, 2, 2) + 2 * c for c in range(4)]
    return FewShotClassificationSampler(classes, n_way=3, k_shot=2, query_shots=3).episodes(count)


def learner(mode="per_parameter", first_order=False, steps=2, dtype=torch.float32, **kwargs) -> GradientMetaLearner:
    return GradientMetaLearner(
        tiny_regressor(dtype), inner_steps=steps, inner_lr=0.1, lr_mode=mode, first_order=first_order, loss="mse",
        **kwargs,
    )


def assert_matches_torch_sgd(adapted, episode, *, lr, steps):
    """``adapted`` equals ``steps`` of torch.optim.SGD(lr) on the episode's support set from tiny_regressor()."""
    reference = tiny_regressor()
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(reference(episode.support_x), episode.support_y).backward()
        optimizer.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(adapted[name], p.detach())


def meta_gradient(meta: GradientMetaLearner, episodes) -> list[torch.Tensor]:
    params = meta.meta_parameters()
    return list(torch.autograd.grad(meta.meta_loss(episodes), params))


# -- meta-gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", LR_MODES)
def test_second_order_meta_gradient_matches_finite_differences(mode):
    meta = learner(mode, first_order=False, dtype=torch.float64)
    episodes = sinusoid_episodes(2, torch.float64)
    analytic = meta_gradient(meta, episodes)
    eps = 1e-6
    for param, grad in zip(meta.meta_parameters(), analytic):
        flat = param.data.view(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 3)):
            original = flat[i].item()
            with torch.no_grad():
                flat[i] = original + eps
                plus = float(meta.meta_loss(episodes))
                flat[i] = original - eps
                minus = float(meta.meta_loss(episodes))
                flat[i] = original
            assert grad.view(-1)[i].item() == pytest.approx((plus - minus) / (2 * eps), rel=1e-5, abs=1e-8)


def test_first_order_meta_gradient_matches_its_closed_form():
    """One inner step: d/dtheta = grad_q(theta'), d/dalpha = -grad_s(theta) * grad_q(theta')."""
    meta = learner("per_parameter", first_order=True, steps=1, dtype=torch.float64)
    (episode,) = sinusoid_episodes(1, torch.float64)
    forward = lambda params, x: torch.func.functional_call(meta.model, params, (x,))  # noqa: E731
    theta = {n: p.detach().clone().requires_grad_() for n, p in meta.params().items()}
    support_loss = meta.loss(forward(theta, episode.support_x), episode.support_y)
    support_grads = torch.autograd.grad(support_loss, list(theta.values()))
    adapted = {
        n: (p - alpha.detach() * g).detach().requires_grad_()
        for (n, p), alpha, g in zip(theta.items(), meta.learned_rates, support_grads)
    }
    query_loss = meta.loss(forward(adapted, episode.query_x), episode.query_y)
    query_grads = torch.autograd.grad(query_loss, list(adapted.values()))
    expected = list(query_grads) + [-g_s * g_q for g_s, g_q in zip(support_grads, query_grads)]
    for got, want in zip(meta_gradient(meta, [episode]), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_first_and_second_order_differ_only_by_curvature_terms():
    episodes = sinusoid_episodes(2, torch.float64)
    first = meta_gradient(learner(first_order=True, dtype=torch.float64), episodes)
    second = meta_gradient(learner(first_order=False, dtype=torch.float64), episodes)
    assert all(a.shape == b.shape for a, b in zip(first, second))
    assert max(float((a - b).abs().max()) for a, b in zip(first, second)) > 1e-6
    # For a linear least-squares model the support Hessian is H_s = mean(2 x^2), so second order
    # adds exactly -alpha * H_s * grad_q to the gradient of the weight.
    base = nn.Linear(1, 1, bias=False).double()
    fo, so = (
        GradientMetaLearner(copy.deepcopy(base), inner_steps=1, inner_lr=0.1, loss="mse", first_order=order)
        for order in (True, False)
    )
    (episode,) = episodes[:1]
    g_fo, g_so = meta_gradient(fo, [episode]), meta_gradient(so, [episode])
    x_s, x_q = episode.support_x, episode.query_x
    w = fo.model.weight.detach()
    adapted_w = w - 0.1 * (2 * (x_s @ w.T - episode.support_y) * x_s).mean()
    grad_q = (2 * (x_q @ adapted_w.T - episode.query_y) * x_q).mean()
    hessian_s = 2 * (x_s**2).mean()
    torch.testing.assert_close(g_so[0], g_fo[0] - 0.1 * hessian_s * grad_q)


def test_inner_adapt_is_plain_gradient_descent():
    model = tiny_regressor()
    params = {n: p.detach() for n, p in model.named_parameters()}
    (episode,) = sinusoid_episodes(1)
    forward = lambda p, x: torch.func.functional_call(model, p, (x,))  # noqa: E731
    rates = dict.fromkeys(params, 0.05)
    adapted = inner_adapt(forward, params, rates, episode.support, nn.functional.mse_loss, 3, first_order=True)
    assert_matches_torch_sgd(adapted, episode, lr=0.05, steps=3)


# -- learning rates ---------------------------------------------------------------------------


def test_learning_rate_shapes_per_mode():
    per_param, per_tensor, scalar, fixed = (learner(mode) for mode in LR_MODES)
    params = per_param.params()
    assert [r.shape for r in per_param.learned_rates] == [p.shape for p in params.values()]
    assert [r.shape for r in per_tensor.learned_rates] == [()] * len(params)
    assert len(scalar.learned_rates) == 1 and scalar.learned_rates[0].shape == ()
    assert len(fixed.learned_rates) == 0 and len(fixed.meta_parameters()) == len(params)
    for meta in (per_param, per_tensor, scalar, fixed):
        assert {n: t.shape for n, t in meta.per_param_lr.items()} == {n: p.shape for n, p in params.items()}
        assert meta.learned_lr() == pytest.approx(dict.fromkeys(params, 0.1))


def test_meta_sgd_learns_signed_per_coordinate_rates():
    meta = learner("per_parameter", meta_lr=0.05)
    for _ in range(5):
        meta.meta_train_step(sinusoid_episodes(3))
    rates = meta.per_param_lr
    assert all(not torch.allclose(r, torch.full_like(r, 0.1)) for r in rates.values())
    assert len({round(v, 6) for r in rates.values() for v in r.flatten().tolist()}) > 10
    assert meta.learned_lr() == pytest.approx({n: float(r.abs().mean()) for n, r in rates.items()})


# -- meta-training ----------------------------------------------------------------------------


def test_meta_train_step_reports_and_improves():
    meta = learner("scalar", meta_lr=0.01)
    episodes = sinusoid_episodes(4)
    before = float(meta.meta_loss(episodes).detach())
    results = [meta.meta_train_step(episodes) for _ in range(30)]
    assert isinstance(results[-1], MetaOptTrainResult)
    assert results[-1].steps == 30 and results[-1].skipped_total == 0 and results[-1].inner_steps == 2 * 4
    assert not any(r.skipped for r in results) and all(r.meta_grad_norm > 0 for r in results)
    assert float(meta.meta_loss(episodes).detach()) < 0.9 * before


def test_non_finite_meta_steps_are_skipped_and_counted():
    meta = learner()
    with torch.no_grad():
        meta.model[0].weight.fill_(math.nan)
    snapshot = [p.detach().clone() for p in meta.meta_parameters()]
    result = meta.meta_train_step(sinusoid_episodes(2))
    assert result.skipped and result.steps == 0 and result.skipped_total == 1 and meta.skipped == 1
    assert math.isnan(result.meta_grad_norm)
    for before, after in zip(snapshot, meta.meta_parameters()):
        torch.testing.assert_close(before, after.detach(), equal_nan=True)
        assert after.grad is None


def test_infinite_meta_gradient_is_skipped():
    meta = GradientMetaLearner(tiny_regressor(), inner_lr=1e30, lr_mode="scalar", loss="mse", inner_steps=2)
    result = meta.meta_train_step(sinusoid_episodes(2))
    assert result.skipped and meta.steps == 0


def test_gradient_clipping_bounds_the_applied_meta_gradient():
    meta = learner(gradient_clipping=1e-3)
    result = meta.meta_train_step(sinusoid_episodes(3))
    clipped = torch.nn.utils.get_total_norm([p.grad for p in meta.meta_parameters()])
    assert result.meta_grad_norm > 1e-3 and float(clipped) == pytest.approx(1e-3, rel=1e-4)


def test_classification_adapt_and_evaluate():
    meta = GradientMetaLearner(tiny_classifier(), inner_steps=1, inner_lr=0.5, loss="cross_entropy", meta_lr=0.01)
    episodes = classification_episodes(3)
    for _ in range(3):
        meta.meta_train_step(episodes)
    adapted = meta.adapt(episodes[0], steps=2)
    assert {n: p.shape for n, p in adapted.items()} == {n: p.shape for n, p in meta.params().items()}
    assert not any(p.requires_grad for p in adapted.values())
    metrics = meta.evaluate(episodes)
    assert set(metrics) == {"loss", "accuracy"} and len(metrics["accuracy"]) == 3
    assert all(0 <= a <= 1 for a in metrics["accuracy"])
    regression = learner().evaluate(sinusoid_episodes(2))
    assert set(regression) == {"loss", "mse"} and regression["loss"] == pytest.approx(regression["mse"])


def test_adapt_with_fixed_rate_matches_torch_sgd():
    meta = learner("fixed", steps=1)
    (episode,) = sinusoid_episodes(1)
    assert_matches_torch_sgd(meta.adapt(episode, steps=4), episode, lr=0.1, steps=4)


# -- checkpoints ------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_identically():
    episodes = sinusoid_episodes(3)
    original = learner(meta_lr=0.01)
    for _ in range(2):
        original.meta_train_step(episodes)
    restored = GradientMetaLearner(
        nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)),
        inner_steps=2, inner_lr=0.1, loss="mse", meta_lr=0.01,
    )
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.steps == 2
    a, b = original.meta_train_step(episodes), restored.meta_train_step(episodes)
    assert a == b
    for p, q in zip(original.meta_parameters(), restored.meta_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_load_state_dict_rejects_mismatches():
    saved = learner("per_parameter").state_dict()
    with pytest.raises(ValueError, match="lr_mode='per_parameter'"):
        learner("scalar").load_state_dict(saved)
    with pytest.raises(ValueError, match="inner_lr"):
        GradientMetaLearner(tiny_regressor(), lr_mode="fixed", inner_lr=0.3, loss="mse").load_state_dict(
            learner("fixed").state_dict()
        )
    with pytest.raises(ValueError, match="expected keys"):
        learner().load_state_dict({"model": {}})
    with pytest.raises(ValueError, match="expected keys"):
        learner().load_state_dict([1, 2])
    wider = GradientMetaLearner(nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)), inner_lr=0.1, loss="mse")
    with pytest.raises(ValueError, match="do not match"):
        wider.load_state_dict(saved)


# -- bad input --------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["inner_steps", "inner_lr", "meta_lr", "gradient_clipping"]),
    value=st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf), st.just("1"), st.just(True)),
)
def test_bad_numbers_are_rejected(name, value):
    with pytest.raises(ValueError, match=name):
        GradientMetaLearner(tiny_regressor(), loss="mse", **{name: value})


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(lr_mode="vector"), ValueError, "accepted values: \\('per_parameter', 'per_tensor', 'scalar', 'fixed'\\)"),
        (dict(first_order=1), ValueError, "first_order must be True or False"),
        (dict(loss="hinge"), ValueError, "accepted values"),
    ],
)
def test_bad_options_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        GradientMetaLearner(tiny_regressor(), **kwargs)


def test_bad_models_are_rejected():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        GradientMetaLearner(lambda x: x)
    frozen = tiny_regressor().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradientMetaLearner(frozen)


@pytest.mark.parametrize(
    "make",
    [learner, lambda: WarpGradLearner(interleave_warps(tiny_regressor()), inner_steps=2, loss="mse")],
    ids=["gradient_learner", "warp_grad"],
)
def test_bad_episodes_are_rejected_by_both_episodic_learners(make):
    meta = make()
    with pytest.raises(ValueError, match="episodes is empty"):
        meta.meta_train_step([])
    with pytest.raises(TypeError, match="Episode objects"):
        meta.meta_train_step([(torch.zeros(1), torch.zeros(1))])
    with pytest.raises(ValueError, match="loss='mse' cannot be used on a classification episode"):
        meta.evaluate(classification_episodes(1))
    with pytest.raises(ValueError, match="steps must be an integer > 0"):
        meta.adapt(sinusoid_episodes(1)[0], steps=0)
