"""Warp-Grad: warped learners, fixed warps in the inner loop, the trajectory meta-gradient
(finite differences, MAML / FOMAML equivalences), flat meta-step memory, checkpoints, bad input."""

from __future__ import annotations

import copy
import io
import math
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from metaoptimizer.config import MetaOptimizerConfig, MetaOptTrainResult
from metaoptimizer.evaluate.fewshot import conv_learner, evaluate_fewshot
from metaoptimizer.meta.gradient_learner import GradientMetaLearner
from metaoptimizer.meta._step import apply_meta_gradient
from metaoptimizer.meta.warp_grad import (
    DEFAULT_INNER_LR,
    DEFAULT_INNER_STEPS,
    SavedTensorMeter,
    WarpGradLearner,
    sample_trajectory_points,
    trajectory_meta_gradient,
)
from metaoptimizer.rules.hand import SGD, Adam
from metaoptimizer.tasks.episodes import Episode, FewShotClassificationSampler, SinusoidSampler
from metaoptimizer.tasks.warp_models import WarpedSequential, WarpLayer, interleave_warps


def plain_mlp(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)).to(dtype)


def warped_mlp(dtype=torch.float32, **options) -> WarpedSequential:
    return interleave_warps(plain_mlp(dtype), init="random", seed=1, **options).to(dtype)


def sinusoid_episodes(count=2, dtype=torch.float32, seed=0):
    episodes = SinusoidSampler(k_shot=5, query_size=6).episodes(count, seed)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return [
        Episode(cast(e.support_x), cast(e.support_y), cast(e.query_x), cast(e.query_y), e.task_id) for e in episodes
    ]


def image_episodes(count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    classes = [torch.rand(6, 1, 4, 4, generator=generator) + c for c in range(4)]
    return FewShotClassificationSampler(classes, n_way=3, k_shot=2, query_shots=2).episodes(count, seed)


def learner(model=None, dtype=torch.float32, **kwargs) -> WarpGradLearner:
    options = dict(inner_steps=2, inner_lr=0.05, loss="mse") | kwargs
    return WarpGradLearner(warped_mlp(dtype) if model is None else model, **options)


def query_loss(meta, params, episode):
    return meta.loss(meta._forward(params, episode.query_x), episode.query_y)


# -- warped learners --------------------------------------------------------------------------


def test_interleave_warps_places_shape_preserving_warps_between_task_layers():
    plain = plain_mlp()
    warped = interleave_warps(plain)
    assert list(dict(warped.named_children())) == ["0", "1", "warp1", "2", "3", "warp2", "4"]
    assert warped.warp_layer_names == ("warp1", "warp2")
    assert {n: p.shape for n, p in plain.named_parameters()} == {
        n: p.shape for n, p in warped.named_parameters() if not n.startswith("warp")
    }
    for name, p in plain.named_parameters():  # task layers are copies with the same values
        torch.testing.assert_close(dict(warped.named_parameters())[name], p)
        assert dict(warped.named_parameters())[name] is not p
    assert warped(torch.randn(7, 1)).shape == (7, 1)
    again = interleave_warps(plain_mlp(), init="random", seed=0).warp1.transform[0].weight
    torch.testing.assert_close(again, interleave_warps(plain, init="random", seed=0).warp1.transform[0].weight)


@pytest.mark.parametrize(
    "plain, options, x",
    [
        (plain_mlp(), {}, torch.randn(9, 1)),
        (plain_mlp(), {"residual": True, "activation": True}, torch.randn(9, 1)),
        (conv_learner(8, 2, 5, 4), {}, torch.rand(6, 1, 8, 8)),
        (conv_learner(8, 2, 5, 4), {"activation": True, "kernel_size": 5}, torch.rand(6, 1, 8, 8)),
        (conv_learner(8, 2, 5, 4), {"residual": True, "kernel_size": 1}, torch.rand(6, 1, 8, 8)),
    ],
)
def test_untrained_warped_model_computes_the_plain_model_and_its_gradients(plain, options, x):
    """Identity warps: same outputs and same task-parameter gradients as the plain learner, so
    Warp-Grad starts from the plain learner's optimisation geometry."""
    warped = interleave_warps(plain, **options)
    torch.testing.assert_close(warped(x), plain(x), rtol=1e-6, atol=1e-6)
    plain_grads = torch.autograd.grad(plain(x).square().sum(), list(plain.parameters()))
    named = dict(warped.named_parameters())
    warped_grads = torch.autograd.grad(warped(x).square().sum(), [named[n] for n, _ in plain.named_parameters()])
    for expected, got in zip(plain_grads, warped_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    random = interleave_warps(plain, init="random", seed=0, **options)
    assert not torch.allclose(random(x), plain(x), atol=1e-3)


def test_conv_warps_see_feature_maps_before_the_flatten():
    warped = interleave_warps(conv_learner(8, 2, 5, 4), kernel_size=1)
    names = list(dict(warped.named_children()))
    assert names.index("warp2") == names.index("8") - 1 and isinstance(warped[names.index("8")], nn.Flatten)
    assert isinstance(warped.warp1.transform[0], nn.Conv2d) and warped.warp1.transform[0].kernel_size == (1, 1)
    assert warped(torch.randn(3, 1, 8, 8)).shape == (3, 5)


def test_warp_layer_variants():
    x = torch.randn(4, 3)
    linear = WarpLayer("linear", 3, residual=True, init="random")
    torch.testing.assert_close(linear(x), x + linear.transform[0](x))
    assert torch.equal(linear.transform[0].weight == 0, torch.zeros(3, 3, dtype=torch.bool))
    assert torch.equal(WarpLayer("linear", 3, residual=True).transform[0].weight, torch.zeros(3, 3))
    torch.testing.assert_close(WarpLayer("linear", 3)(x), x)
    relu = WarpLayer("linear", 3, activation=True)
    torch.testing.assert_close(relu(x), x.clamp_min(0))
    conv = WarpLayer("conv", 2, kernel_size=5)
    maps = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(conv(maps), maps)


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: interleave_warps(nn.Linear(2, 2)), TypeError, "nn.Sequential"),
        (lambda: interleave_warps(nn.Sequential(nn.Linear(2, 2), nn.ReLU())), ValueError, "at least two task layers"),
        (lambda: interleave_warps(warped_mlp()), ValueError, "already has warp layers"),
        (lambda: interleave_warps(plain_mlp(), init="random", seed=1.5), ValueError, "seed must be an integer"),
        (lambda: interleave_warps(plain_mlp(), kernel_size=2), ValueError, "kernel_size must be odd"),
        (lambda: interleave_warps(plain_mlp(), residual="yes"), ValueError, "residual must be True or False"),
        (lambda: WarpLayer("attention", 3), ValueError, "accepted values: \\('linear', 'conv'\\)"),
        (lambda: WarpLayer("linear", 3, init="zeros"), ValueError, "accepted values: \\('identity', 'random'\\)"),
        (lambda: interleave_warps(plain_mlp(), seed=0), ValueError, "seed applies to init='random'"),
        (lambda: WarpLayer("linear", 0), ValueError, "features must be an integer > 0"),
        (lambda: WarpedSequential({"a": nn.Linear(1, 1)}, ("b",)), ValueError, "not children"),
        (
            lambda: interleave_warps(nn.Sequential(OrderedDict([("warp1", nn.Linear(1, 1)), ("b", nn.Linear(1, 1))]))),
            ValueError, "child named 'warp1'",
        ),
    ],
)
def test_bad_warped_models_are_rejected(build, error, message):
    with pytest.raises(error, match=message):
        build()


# -- the inner loop: warps fixed, task layers adapted ----------------------------------------


class SpySGD(SGD):
    """SGD that records which parameters it was given gradients for."""

    def __init__(self, lr):
        super().__init__(lr)
        self.seen: list[set[str]] = []

    def update(self, grads, state, params, *, loss=None):
        self.seen.append(set(grads))
        return super().update(grads, state, params)


def test_adaptation_updates_only_task_layers_like_torch_sgd_with_frozen_warps():
    spy = SpySGD(0.05)
    meta = learner(inner_rule=spy, inner_lr=None)
    (episode,) = sinusoid_episodes(1)
    warps_before = {n: p.detach().clone() for n, p in meta.warp_params().items()}
    adapted = meta.adapt(episode, steps=3)
    assert spy.seen == [set(meta.task_parameter_names())] * 3
    assert set(adapted) == set(meta.task_parameter_names()) and not any(p.requires_grad for p in adapted.values())
    for name, p in meta.warp_params().items():
        torch.testing.assert_close(p, warps_before[name], rtol=0, atol=0)
        assert p.grad is None
    reference = copy.deepcopy(meta.model)
    for layer in meta.warp_layers:
        getattr(reference, layer).requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(reference(episode.support_x), episode.support_y).backward()
        optimizer.step()
    for name, p in reference.named_parameters():
        expected = adapted[name] if name in adapted else meta.warp_params()[name]
        torch.testing.assert_close(expected, p.detach())


def test_an_adam_inner_rule_matches_torch_adam():
    meta = learner(inner_rule=Adam(lr=0.01), inner_lr=None)
    (episode,) = sinusoid_episodes(1)
    adapted = meta.adapt(episode, steps=4)
    reference = copy.deepcopy(meta.model)
    optimizer = torch.optim.Adam([dict(reference.named_parameters())[n] for n in meta.task_parameter_names()], lr=0.01)
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.mse_loss(reference(episode.support_x), episode.support_y).backward()
        optimizer.step()
    for name in meta.task_parameter_names():
        torch.testing.assert_close(adapted[name], dict(reference.named_parameters())[name].detach())


# -- the trajectory meta-gradient -------------------------------------------------------------


def test_meta_gradient_reaches_only_warp_parameters_without_learned_init():
    meta = learner(learn_init=False, meta_lr=0.01)
    _, grads, finite = meta.meta_gradient(sinusoid_episodes(2))
    assert finite and set(grads) == set(meta.warp_parameter_names())
    assert all(g.abs().sum() > 0 for g in grads.values())
    init = {n: p.detach().clone() for n, p in meta.params().items()}
    warps = {n: p.detach().clone() for n, p in meta.warp_params().items()}
    meta.meta_train_step(sinusoid_episodes(2))
    for name, p in meta.params().items():
        torch.testing.assert_close(p, init[name], rtol=0, atol=0)
        assert p.grad is None
    assert all(not torch.equal(p, warps[n]) for n, p in meta.warp_params().items())


def test_learned_init_gets_gradients_too():
    meta = learner()
    _, grads, _ = meta.meta_gradient(sinusoid_episodes(2))
    assert set(grads) == set(meta.warp_parameter_names()) | set(meta.task_parameter_names())
    assert meta.meta_parameter_names() == meta.warp_parameter_names() + meta.task_parameter_names()
    named = dict(meta.model.named_parameters())
    assert meta.meta_parameters() == [named[n] for n in meta.meta_parameter_names()]


def finite_difference(fn, param, index, eps=1e-6):
    flat = param.data.view(-1)
    original = flat[index].item()
    with torch.no_grad():
        flat[index] = original + eps
        plus = fn()
        flat[index] = original - eps
        minus = fn()
        flat[index] = original
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("options", [dict(), dict(activation=False, residual=True)])
def test_one_step_second_order_meta_gradient_matches_finite_differences(options):
    """With one inner step the trajectory objective is a plain function of (phi, theta_0)."""
    meta = learner(warped_mlp(torch.float64, **options), inner_steps=1, inner_lr=0.1)
    episodes = sinusoid_episodes(2, torch.float64)
    _, grads, _ = meta.meta_gradient(episodes)
    objective = lambda: meta.meta_gradient(episodes)[0]  # noqa: E731
    named = dict(meta.model.named_parameters())
    for name in meta.meta_parameter_names():
        for index in range(0, named[name].numel(), max(1, named[name].numel() // 2)):
            expected = finite_difference(objective, named[name], index)
            assert grads[name].view(-1)[index].item() == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_each_sampled_point_is_differentiated_through_one_step_with_the_point_frozen():
    meta = learner(dtype=torch.float64, inner_steps=3, inner_lr=0.1, learn_init=False)
    (episode,) = sinusoid_episodes(1, torch.float64)
    warps = list(meta.warp_params().values())
    result = trajectory_meta_gradient(
        meta._forward, warps, meta.params(), meta.inner_rule, episode, meta.loss, 3, [1],
        first_order=False, init_grads=False,
    )
    theta_1 = meta.adapt(episode, steps=1)

    def one_step_objective() -> float:
        with torch.enable_grad():
            point = {n: p.detach().requires_grad_() for n, p in theta_1.items()}
            support = meta.loss(meta._forward(point, episode.support_x), episode.support_y)
            grads = torch.autograd.grad(support, list(point.values()))
        with torch.no_grad():
            return float(query_loss(meta, {n: p - 0.1 * g for (n, p), g in zip(point.items(), grads)}, episode))

    assert result.meta_loss == pytest.approx(one_step_objective())
    for param, grad in zip(warps, result.warp_grads):
        for index in (0, param.numel() - 1):
            expected = finite_difference(one_step_objective, param, index)
            assert grad.view(-1)[index].item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
    torch.testing.assert_close(result.adapted, meta.adapt(episode, steps=3))


def test_first_order_variant_differentiates_the_query_loss_at_the_next_point():
    meta = learner(dtype=torch.float64, inner_steps=3, first_order=True)
    (episode,) = sinusoid_episodes(1, torch.float64)
    warps = list(meta.warp_params().values())
    result = trajectory_meta_gradient(
        meta._forward, warps, meta.params(), meta.inner_rule, episode, meta.loss, 3, [0, 2],
        first_order=True, init_grads=True,
    )
    expected_warp = [torch.zeros_like(w) for w in warps]
    expected_init = {n: torch.zeros_like(p) for n, p in meta.params().items()}
    for k in (1, 3):
        point = {n: p.requires_grad_() for n, p in meta.adapt(episode, steps=k).items()}
        grads = torch.autograd.grad(query_loss(meta, point, episode), warps + list(point.values()))
        for total, g in zip(expected_warp, grads):
            total += g / 2
        for (name, total), g in zip(expected_init.items(), grads[len(warps) :]):
            total += g / 2
    torch.testing.assert_close(result.warp_grads, expected_warp)
    torch.testing.assert_close(result.init_grads, expected_init)


def test_without_warps_it_is_maml_for_one_step_and_fomaml_at_the_last_point():
    episodes = sinusoid_episodes(2, torch.float64)
    warp_grad = learner(plain_mlp(torch.float64), inner_steps=1, inner_lr=0.1)
    maml = GradientMetaLearner(plain_mlp(torch.float64), inner_steps=1, inner_lr=0.1, lr_mode="fixed", loss="mse")
    loss, grads, _ = warp_grad.meta_gradient(episodes)
    maml_loss = maml.meta_loss(episodes)
    reference = torch.autograd.grad(maml_loss, maml.meta_parameters())
    assert loss == pytest.approx(maml_loss.item())
    torch.testing.assert_close([grads[n] for n in warp_grad.task_parameter_names()], list(reference))

    fomaml = GradientMetaLearner(
        plain_mlp(torch.float64), inner_steps=3, inner_lr=0.1, lr_mode="fixed", loss="mse", first_order=True
    )
    for episode in episodes:
        result = trajectory_meta_gradient(
            warp_grad._forward, [], warp_grad.params(), warp_grad.inner_rule, episode, warp_grad.loss, 3, [2],
            first_order=True, init_grads=True,
        )
        reference = torch.autograd.grad(fomaml.meta_loss([episode]), fomaml.meta_parameters())
        torch.testing.assert_close(list(result.init_grads.values()), list(reference))


def test_sample_trajectory_points():
    generator = torch.Generator().manual_seed(0)
    points = sample_trajectory_points(10, 4, generator)
    assert len(points) == 4 == len(set(points)) and points == sorted(points) and all(0 <= k < 10 for k in points)
    assert sample_trajectory_points(3, None) == [0, 1, 2]
    assert sample_trajectory_points(3, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot sample 4 points from a trajectory of 3"):
        sample_trajectory_points(3, 4)
    with pytest.raises(ValueError, match="count must be an integer > 0"):
        sample_trajectory_points(3, 0)


def test_meta_step_memory_does_not_grow_with_inner_steps():
    """Peak bytes that autograd holds: flat for Warp-Grad, linear in K for second-order MAML."""

    def peak(build, steps):
        episodes = sinusoid_episodes(2)
        meta = build(steps)
        with SavedTensorMeter() as meter:
            meta.meta_train_step(episodes)
        assert meter.current == 0  # every graph was freed
        return meter.peak

    for first_order in (False, True):
        build = lambda k: learner(inner_steps=k, first_order=first_order)  # noqa: E731
        assert peak(build, 2) == peak(build, 12) > 0
    sampled = lambda k: learner(inner_steps=k, trajectory_samples=2)  # noqa: E731
    assert peak(sampled, 4) == peak(sampled, 12)
    maml = lambda k: GradientMetaLearner(warped_mlp(), inner_steps=k, lr_mode="fixed", loss="mse")  # noqa: E731
    assert peak(maml, 12) > 4 * peak(maml, 2)


# -- meta-training ----------------------------------------------------------------------------


def test_meta_train_step_reports_and_improves_on_images():
    plain = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    model = interleave_warps(plain)
    meta = WarpGradLearner(model, inner_steps=3, inner_lr=0.1, meta_lr=0.01, trajectory_samples=2)
    episodes = image_episodes(3)
    first = meta.meta_train_step(episodes)
    results = [meta.meta_train_step(episodes) for _ in range(15)]
    assert isinstance(first, MetaOptTrainResult) and first.inner_steps == 3 * 3
    assert results[-1].steps == 16 and results[-1].skipped_total == 0 and not any(r.skipped for r in results)
    assert results[-1].meta_loss < 0.8 * first.meta_loss


def test_buffer_holds_the_sampled_points_of_each_trajectory():
    meta = learner(inner_steps=4, trajectory_samples=2, seed=5)
    episodes = sinusoid_episodes(2)
    first_points = sample_trajectory_points(4, 2, torch.Generator().manual_seed(5))
    buffer = meta.collect(episodes)
    assert [p.episode.task_id for p in buffer] == [episodes[0].task_id] * 2 + [episodes[1].task_id] * 2
    assert [p.step for p in buffer[:2]] == first_points
    init = {n: p.detach() for n, p in meta.params().items()}
    for point in buffer:
        expected = meta.adapt(point.episode, steps=point.step) if point.step else init
        torch.testing.assert_close(point.params, expected)
        assert not any(p.requires_grad for p in point.params.values())


def test_points_per_update_splits_the_shuffled_buffer_into_meta_updates():
    episodes = sinusoid_episodes(2)
    split = learner(inner_steps=3, points_per_update=2, meta_lr=0.01, seed=2)
    manual = copy.deepcopy(split)
    result = split.meta_train_step(episodes)
    assert result.steps == split.steps == 3 and not result.skipped  # 6 buffered points, 2 per update
    buffer = manual.collect(episodes)
    order = torch.randperm(len(buffer), generator=manual.generator).tolist()
    losses = []
    for start in (0, 2, 4):
        loss, grads, _ = manual.points_gradient([buffer[i] for i in order[start : start + 2]])
        names = manual.meta_parameter_names()
        apply_meta_gradient(manual.meta_optimizer, manual.meta_parameters(), [grads[n] for n in names], None)
        losses.append(loss)
    assert result.meta_loss == pytest.approx(sum(losses) / 3)
    for p, q in zip(split.meta_parameters(), manual.meta_parameters()):
        torch.testing.assert_close(p, q)
    whole = learner(inner_steps=3, meta_lr=0.01, seed=2)
    assert whole.meta_train_step(episodes).steps == 1


def test_non_finite_meta_steps_are_skipped_and_counted():
    meta = learner(inner_lr=1e30, inner_steps=3)
    snapshot = [p.detach().clone() for p in meta.meta_parameters()]
    result = meta.meta_train_step(sinusoid_episodes(2))
    assert result.skipped and result.steps == 0 and result.skipped_total == 1 and meta.skipped == 1
    for before, after in zip(snapshot, meta.meta_parameters()):
        torch.testing.assert_close(before, after.detach(), rtol=0, atol=0)
        assert after.grad is None


def test_gradient_clipping_bounds_the_applied_meta_gradient():
    meta = learner(gradient_clipping=1e-4, meta_lr=1.0)
    before = [p.detach().clone() for p in meta.meta_parameters()]
    result = meta.meta_train_step(sinusoid_episodes(2))
    assert result.meta_grad_norm > 1e-4 and not result.skipped
    # Adam's first step moves every coordinate by about meta_lr whatever the scale, so check the
    # clipped gradient through Adam's state instead.
    state = [meta.meta_optimizer.state[p]["exp_avg"] for p in meta.meta_parameters()]
    assert float(torch.nn.utils.get_total_norm(state)) == pytest.approx(0.1 * 1e-4, rel=1e-4)
    assert any(not torch.equal(b, p) for b, p in zip(before, meta.meta_parameters()))


def test_classification_evaluate_plugs_into_fewshot_evaluation():
    model = interleave_warps(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)))
    meta = WarpGradLearner(model, inner_steps=2, inner_lr=0.2)
    sampler = FewShotClassificationSampler(
        [torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(c)) + c for c in range(4)], 3, 2, 2
    )
    metric, values = evaluate_fewshot(meta, sampler, episodes=5, chunk=2, steps=1)
    assert metric == "accuracy" and len(values) == 5 and all(0 <= v <= 1 for v in values)
    regression = learner().evaluate(sinusoid_episodes(2))
    assert set(regression) == {"loss", "mse"} and regression["loss"] == pytest.approx(regression["mse"])


# -- construction from a config ---------------------------------------------------------------


def test_from_config_enables_warps_with_preconditioning():
    config = MetaOptimizerConfig(
        method="warp_grad", meta_lr=0.02, second_order=True, loss="mse", seed=4,
        rule_options={
            "inner_steps": 3, "inner_lr": 0.2, "trajectory_samples": 2, "warp_activation": False, "learn_init": False,
        },
    )
    meta = WarpGradLearner.from_config(plain_mlp(), config)
    assert meta.warp_layers == ("warp1", "warp2") and isinstance(meta.model.warp1.transform[-1], nn.Linear)
    params = meta.hyperparameters()
    assert params == {
        "warp_layers": ["warp1", "warp2"], "inner_steps": 3, "inner_lr": 0.2, "inner_rule": "sgd", "meta_lr": 0.02,
        "first_order": False, "trajectory_samples": 2, "points_per_update": None, "learn_init": False, "loss": "mse", "gradient_clipping": 1.0,
        "seed": 4,
    }
    warped = warped_mlp()
    assert WarpGradLearner.from_config(warped, MetaOptimizerConfig(method="warp_grad")).model is warped
    baseline = WarpGradLearner.from_config(plain_mlp(), MetaOptimizerConfig(method="warp_grad", preconditioning=False))
    assert baseline.warp_parameter_names() == [] and baseline.first_order and baseline.inner_lr == DEFAULT_INNER_LR
    assert baseline.inner_steps == DEFAULT_INNER_STEPS
    assert baseline.meta_parameter_names() == baseline.task_parameter_names()
    every_layer = WarpGradLearner.from_config(warped, MetaOptimizerConfig(method="warp_grad", preconditioning=False))
    assert every_layer.warp_parameter_names() == [] and len(every_layer.task_parameter_names()) == 10


@pytest.mark.parametrize(
    "model, config, error, message",
    [
        (plain_mlp(), MetaOptimizerConfig(method="lstm"), ValueError, "needs method='warp_grad'"),
        (plain_mlp(), {"method": "warp_grad"}, TypeError, "MetaOptimizerConfig"),
        (plain_mlp(), MetaOptimizerConfig(method="warp_grad", rule_options={"hidden": 3}), ValueError, "unknown"),
        (
            warped_mlp(), MetaOptimizerConfig(method="warp_grad", rule_options={"warp_kernel_size": 1}),
            ValueError, "already has warp layers",
        ),
        (nn.Linear(2, 2), MetaOptimizerConfig(method="warp_grad"), TypeError, "nn.Sequential"),
        (
            plain_mlp(),
            MetaOptimizerConfig(method="warp_grad", preconditioning=False, rule_options={"warp_residual": True}),
            ValueError, "need preconditioning=True",
        ),
    ],
)
def test_from_config_rejects_bad_configs(model, config, error, message):
    with pytest.raises(error, match=message):
        WarpGradLearner.from_config(model, config)


def test_facade_keeps_the_users_model_and_exposes_the_warped_one(tmp_path):
    from metaoptimizer import MetaOptimizer

    plain = plain_mlp()
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    config = MetaOptimizerConfig(method="warp_grad", loss="mse", meta_lr=0.01, rule_options={"inner_steps": 2})
    meta = MetaOptimizer(plain, config)
    assert meta.base_model is plain and not hasattr(plain, "warp_layer_names")
    warped = meta.warped_model
    assert isinstance(warped, WarpedSequential) and warped is meta.learner.model and warped is not plain
    x = torch.randn(5, 1)
    torch.testing.assert_close(warped(x), plain(x))  # identity warps: the same function before meta-training
    meta.meta_train_step(sinusoid_episodes(2))
    for name, p in plain.named_parameters():  # meta-training changes the warped copy only
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)
    assert not torch.equal(dict(warped.named_parameters())["0.weight"], before["0.weight"])
    meta.save(tmp_path / "warp.pt")
    restored = MetaOptimizer.load(tmp_path / "warp.pt", plain_mlp())
    torch.testing.assert_close(restored.warped_model(x), warped(x))
    already = warped_mlp()
    assert MetaOptimizer(already, config).warped_model is already
    assert MetaOptimizer(plain, MetaOptimizerConfig(method="meta_sgd")).warped_model is None


# -- checkpoints ------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_identically():
    episodes = sinusoid_episodes(2)
    original = learner(meta_lr=0.01, inner_steps=4, trajectory_samples=2, seed=3)
    for _ in range(2):
        original.meta_train_step(episodes)
    restored = learner(meta_lr=0.01, inner_steps=4, trajectory_samples=2, seed=9)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.steps == 2
    assert original.meta_train_step(episodes) == restored.meta_train_step(episodes)
    for p, q in zip(original.meta_parameters(), restored.meta_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_load_state_dict_rejects_mismatches():
    saved = learner().state_dict()
    with pytest.raises(ValueError, match="learn_init=True, this learner has learn_init=False"):
        learner(learn_init=False).load_state_dict(saved)
    with pytest.raises(ValueError, match="warp_layers"):
        learner(warp_layers=["warp1"]).load_state_dict(saved)
    with pytest.raises(ValueError, match="expected keys"):
        learner().load_state_dict({"model": {}})
    with pytest.raises(ValueError, match="expected keys"):
        learner().load_state_dict([1, 2])


# -- bad input --------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["inner_steps", "inner_lr", "meta_lr", "gradient_clipping", "trajectory_samples"]),
    value=st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf), st.just("1"), st.just(True)),
)
def test_bad_numbers_are_rejected(name, value):
    with pytest.raises(ValueError, match=name):
        learner(**{name: value})


@settings(max_examples=20, deadline=None)
@given(steps=st.integers(1, 5), extra=st.integers(1, 5))
def test_more_trajectory_samples_than_inner_steps_is_rejected(steps, extra):
    with pytest.raises(ValueError, match=f"trajectory_samples={steps + extra} exceeds inner_steps={steps}"):
        learner(inner_steps=steps, trajectory_samples=steps + extra)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(model=lambda x: x), TypeError, "torch.nn.Module"),
        (dict(inner_rule="lbfgs"), ValueError, "accepted values: an UpdateRule or one of \\('sgd'"),
        (dict(inner_rule=SGD(0.1), inner_lr=0.1), ValueError, "inner_lr applies to a named inner_rule only"),
        (dict(warp_layers=["warp9"]), ValueError, "warp layer 'warp9' is not a submodule"),
        (dict(warp_layers="warp1"), ValueError, "list of submodule names"),
        (dict(warp_layers=["1"]), ValueError, "no trainable parameters"),
        (dict(model=plain_mlp(), learn_init=False), ValueError, "nothing to meta-learn"),
        (dict(model=plain_mlp(), warp_layers=["0", "2", "4"]), ValueError, "no task parameters"),
        (dict(first_order=0), ValueError, "first_order must be True or False"),
        (dict(learn_init="no"), ValueError, "learn_init must be True or False"),
        (dict(seed=1.0), ValueError, "seed must be an integer"),
        (dict(loss="hinge"), ValueError, "accepted values"),
    ],
)
def test_bad_options_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        learner(**kwargs)
