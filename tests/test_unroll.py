import itertools

import pytest
import torch

from metaoptimizer.meta.unroll import detach_params, unroll
from metaoptimizer.rules.lstm import LSTMRule
from metaoptimizer.tasks.quadratic import QuadraticTask


def _meta_loss(rule, task, steps, objective="train_loss", second_order=True):
    params = {n: p.double() for n, p in detach_params(task.init_params(3)).items()}
    params = detach_params(params)
    batches = (tuple(t.double() for t in b) for b in task.train_batches(0))
    valid = (tuple(t.double() for t in b) for b in task.valid_batches(0))
    return unroll(
        rule, task, params, rule.init(params), batches, steps,
        second_order=second_order, meta_objective=objective, valid_batches=valid,
    )


@pytest.mark.parametrize("objective", ["train_loss", "valid_loss", "log_train_loss", "log_valid_loss"])
def test_meta_gradient_matches_finite_differences(objective):
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=5, num_layers=2, output_scale=0.05).double()
    task = QuadraticTask(seed=4, dim=4)
    result = _meta_loss(rule, task, steps=4, objective=objective)
    assert result.finite
    meta_params = list(rule.parameters())
    grads = torch.autograd.grad(result.meta_loss, meta_params)
    eps = 1e-6
    gen = torch.Generator().manual_seed(0)
    for param, grad in zip(meta_params, grads, strict=True):
        flat = param.data.view(-1)
        for index in torch.randint(0, flat.numel(), (3,), generator=gen).tolist():
            original = flat[index].item()
            flat[index] = original + eps  # ``flat`` views ``param.data``: no autograd record
            plus = float(_meta_loss(rule, task, 4, objective).meta_loss.detach())
            flat[index] = original - eps
            minus = float(_meta_loss(rule, task, 4, objective).meta_loss.detach())
            flat[index] = original
            numeric = (plus - minus) / (2 * eps)
            assert grad.view(-1)[index].item() == pytest.approx(numeric, rel=1e-4, abs=1e-7)


def test_first_order_meta_gradient_differs_but_is_finite():
    rule = LSTMRule(hidden_size=5).double()
    task = QuadraticTask(seed=4, dim=4)
    full = torch.autograd.grad(_meta_loss(rule, task, 4).meta_loss, list(rule.parameters()))
    first = torch.autograd.grad(_meta_loss(rule, task, 4, second_order=False).meta_loss, list(rule.parameters()))
    assert all(torch.isfinite(g).all() for g in first)
    assert any(not torch.allclose(a, b) for a, b in zip(full, first, strict=True))


def test_unroll_records_losses_and_advances_state():
    rule = LSTMRule(hidden_size=4)
    task = QuadraticTask(seed=1, dim=3)
    params = detach_params(task.init_params(0))
    result = unroll(rule, task, params, rule.init(params), task.train_batches(0), 5)
    assert len(result.losses) == 5
    assert result.state.step_count == 5
    assert result.meta_loss.requires_grad


def test_non_finite_inner_loss_is_reported_not_raised():
    class Exploding(QuadraticTask):
        def loss(self, params, batch):
            return super().loss(params, batch) * float("inf")

    rule = LSTMRule(hidden_size=4)
    task = Exploding(seed=1, dim=3)
    params = detach_params(task.init_params(0))
    result = unroll(rule, task, params, rule.init(params), task.train_batches(0), 5)
    assert not result.finite


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"steps": 0}, "steps"), ({"meta_objective": "acc"}, "train_loss"), ({"meta_objective": "valid_loss"}, "valid_batches")],
)
def test_bad_arguments(kwargs, match):
    rule = LSTMRule(hidden_size=4)
    task = QuadraticTask(seed=1, dim=3)
    params = detach_params(task.init_params(0))
    call = {"steps": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        unroll(rule, task, params, rule.init(params), itertools.repeat((task.w, task.y)), **call)
