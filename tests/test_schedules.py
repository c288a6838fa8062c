"""Schedules: closed forms, torch.optim.lr_scheduler agreement, gradients, adapters, bad input."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.lr_scheduler import CosineAnnealingLR, CosineAnnealingWarmRestarts, CyclicLR

from metaoptimizer.schedules import (
    CosineDecay,
    CosineRestarts,
    Cyclic,
    ExponentialWarmup,
    LearnedSchedule,
    LinearWarmup,
    ScheduleLR,
    Sequential,
    check_step,
    warmup_cosine,
)


def torch_lrs(scheduler_factory, steps: int, lr: float = 1.0) -> list[float]:
    """The lr a torch scheduler sets for updates 0..steps-1 (read before each optimizer step)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = scheduler_factory(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_linear_warmup_closed_form():
    s = LinearWarmup(4, start_factor=0.2)
    assert [s(k) for k in range(7)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])


def test_exponential_warmup_is_geometric():
    s = ExponentialWarmup(3, start_factor=1e-3)
    assert [s(k) for k in range(5)] == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 1.0])


def test_cosine_decay_matches_closed_form_and_torch():
    s = CosineDecay(10, min_factor=0.1)
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(k, 10) / 10)) for k in range(13)]
    assert [s(k) for k in range(13)] == pytest.approx(expected)
    reference = torch_lrs(lambda o: CosineAnnealingLR(o, T_max=10, eta_min=0.1), 11)
    assert [s(k) for k in range(11)] == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize("mult", [1, 2, 3])
def test_cosine_restarts_match_torch(mult):
    s = CosineRestarts(period=3, period_mult=mult, min_factor=0.05)
    reference = torch_lrs(lambda o: CosineAnnealingWarmRestarts(o, T_0=3, T_mult=mult, eta_min=0.05), 40)
    assert [s(k) for k in range(40)] == pytest.approx(reference, abs=1e-12)


def test_cosine_restart_decay_lowers_each_peak():
    s = CosineRestarts(period=4, restart_decay=0.5)
    assert [s(4 * i) for i in range(4)] == pytest.approx([1.0, 0.5, 0.25, 0.125])
    assert s.cycle(9) == (2, 1, 4)


@pytest.mark.parametrize(
    "mode,gamma,down", [("triangular", 1.0, None), ("triangular2", 1.0, 3), ("exp_range", 0.97, None)]
)
def test_cyclic_matches_torch_cyclic_lr(mode, gamma, down):
    s = Cyclic(step_size_up=4, step_size_down=down, min_factor=0.1, max_factor=1.0, mode=mode, gamma=gamma)
    reference = torch_lrs(
        lambda o: CyclicLR(
            o, base_lr=0.1, max_lr=1.0, step_size_up=4, step_size_down=down, mode=mode, gamma=gamma,
            cycle_momentum=False,
        ),
        30,
    )
    assert [s(k) for k in range(30)] == pytest.approx(reference, abs=1e-12)


def test_sequential_restarts_each_piece_at_zero():
    s = Sequential((LinearWarmup(2), CosineDecay(4), lambda k: 0.5), (2, 6))
    assert [s(k) for k in range(8)] == pytest.approx([0.0, 0.5, 1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5,
                                                      0.5 - 0.5 * math.cos(math.pi / 4), 0.5, 0.5])


def test_warmup_cosine_closed_form():
    s = warmup_cosine(4, 12, start_factor=0.0, min_factor=0.0)
    expected = [k / 4 for k in range(4)] + [0.5 * (1 + math.cos(math.pi * (k - 4) / 8)) for k in range(4, 13)]
    assert [s(k) for k in range(13)] == pytest.approx(expected)
    exponential = warmup_cosine(2, 5, start_factor=0.01, warmup="exponential")
    assert [exponential(k) for k in range(3)] == pytest.approx([0.01, 0.1, 1.0])


def test_tensor_factors_are_differentiable():
    min_factor = torch.tensor(0.2, requires_grad=True)
    value = CosineDecay(10, min_factor=min_factor)(5)
    (grad,) = torch.autograd.grad(value, min_factor)
    assert float(grad) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 2)))
    gamma = torch.tensor(0.9, requires_grad=True)
    value = Cyclic(2, mode="exp_range", gamma=gamma, min_factor=0.0)(2)  # peak: gamma**2
    (grad,) = torch.autograd.grad(value, gamma)
    assert float(grad) == pytest.approx(2 * 0.9)
    low, high = torch.tensor(0.1, requires_grad=True), torch.tensor(0.7, requires_grad=True)
    value = Cyclic(4, min_factor=low, max_factor=high)(1)  # a quarter of the way up
    grads = torch.autograd.grad(value, (low, high))
    assert [float(g) for g in grads] == pytest.approx([0.75, 0.25])


def test_learned_schedule_interpolates_in_log_space():
    s = LearnedSchedule(total_steps=8, num_knots=2)
    with torch.no_grad():
        s.log_knots.copy_(torch.tensor([0.0, math.log(0.5), math.log(0.125)]))
    values = [float(s(k).detach()) for k in (0, 2, 4, 6, 8, 100)]
    assert values == pytest.approx([1.0, 0.5**0.5, 0.5, 0.5 * 0.25**0.5, 0.125, 0.125], rel=1e-6)


def test_learned_schedule_gradient_matches_finite_differences():
    s = LearnedSchedule(total_steps=10, num_knots=4, dtype=torch.float64)
    with torch.no_grad():
        s.log_knots.copy_(torch.randn(5, dtype=torch.float64))
    (grad,) = torch.autograd.grad(s(3), s.log_knots)
    eps = 1e-6
    for i in range(5):
        with torch.no_grad():
            s.log_knots[i] += eps
            up = float(s(3))
            s.log_knots[i] -= 2 * eps
            down = float(s(3))
            s.log_knots[i] += eps
        assert float(grad[i]) == pytest.approx((up - down) / (2 * eps), abs=1e-8)


def test_monotone_learned_schedule_never_increases():
    s = LearnedSchedule(total_steps=20, num_knots=5, monotone=True, init_factor=0.5)
    with torch.no_grad():
        s.raw_decrements.copy_(torch.randn(5))
    values = [float(s(k).detach()) for k in range(21)]
    assert values[0] == pytest.approx(0.5)
    assert all(b <= a + 1e-7 for a, b in zip(values, values[1:], strict=False))
    assert "monotone=True" in repr(s)


def make_optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("learned", [False, True])
def test_schedule_lr_state_dict_round_trip_resumes_identically(kind, learned):
    def schedule():
        if not learned:
            return warmup_cosine(3, 20, start_factor=0.1)
        s = LearnedSchedule(20, num_knots=4)
        with torch.no_grad():
            s.log_knots.copy_(torch.linspace(0.0, -2.0, 5))
        return s

    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def run(model, opt, scheduler, steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            scheduler.step()

    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1)
    opt = make_optimizer(kind, model)
    scheduler = ScheduleLR(opt, schedule())
    run(model, opt, scheduler, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()}, buffer)
    run(model, opt, scheduler, 5)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2 = torch.nn.Linear(3, 1)
    model2.load_state_dict(saved["model"])
    opt2 = make_optimizer(kind, model2)
    fresh = schedule()
    if learned:
        with torch.no_grad():
            fresh.log_knots.zero_()  # the scheduler's state dict must restore the learned knots
    scheduler2 = ScheduleLR(opt2, fresh)
    opt2.load_state_dict(saved["opt"])
    scheduler2.load_state_dict(saved["sched"])
    run(model2, opt2, scheduler2, 5)
    assert scheduler2.get_last_lr() == pytest.approx(scheduler.get_last_lr(), abs=0)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_schedule_lr_sets_base_lr_times_factor_per_group():
    p, q = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.1}])
    scheduler = ScheduleLR(opt, LinearWarmup(2))
    seen = []
    for _ in range(3):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        scheduler.step()
    assert seen == [[0.0, 0.0], [0.5, 0.05], [1.0, 0.1]]


def test_schedule_lr_refuses_mismatched_state():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    learned = ScheduleLR(opt, LearnedSchedule(10)).state_dict()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="disagree"):
        ScheduleLR(opt, CosineDecay(10)).load_state_dict(learned)


def test_check_step():
    assert check_step(3) == 3
    with pytest.raises(ValueError, match=">= 0"):
        check_step(-1)
    for bad in (1.5, True, "2", None):
        with pytest.raises(TypeError, match="integer"):
            check_step(bad)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: LinearWarmup(0), "warmup_steps"),
        (lambda: LinearWarmup(5, start_factor=1.5), "start_factor"),
        (lambda: ExponentialWarmup(5, start_factor=0.0), "start_factor"),
        (lambda: CosineDecay(-3), "total_steps"),
        (lambda: CosineDecay(10, min_factor=float("nan")), "min_factor"),
        (lambda: CosineDecay(10, min_factor=torch.ones(2)), "one-element"),
        (lambda: CosineDecay(10, min_factor="0.1"), "number"),
        (lambda: CosineRestarts(0), "period"),
        (lambda: CosineRestarts(3, period_mult=0), "period_mult"),
        (lambda: CosineRestarts(3, restart_decay=0.0), "restart_decay"),
        (lambda: Cyclic(4, mode="sine"), "mode"),
        (lambda: Cyclic(4, min_factor=0.5, max_factor=0.2), "max_factor"),
        (lambda: Cyclic(4, step_size_down=0), "step_size_down"),
        (lambda: Cyclic(4, gamma=1.5), "gamma"),
        (lambda: Sequential((), ()), "non-empty"),
        (lambda: Sequential((CosineDecay(3), CosineDecay(3)), ()), "boundaries"),
        (lambda: Sequential((CosineDecay(3), CosineDecay(3), CosineDecay(3)), (5, 2)), "increase"),
        (lambda: warmup_cosine(10, 10), "shorter than training"),
        (lambda: warmup_cosine(20, 10), "shorter than training"),
        (lambda: warmup_cosine(2, 10, warmup="cosine"), "warmup"),
        (lambda: LearnedSchedule(0), "total_steps"),
        (lambda: LearnedSchedule(10, num_knots=0), "num_knots"),
        (lambda: LearnedSchedule(10, init_factor=-1.0), "init_factor"),
        (lambda: LearnedSchedule(10, monotone=1), "monotone"),
        (lambda: LearnedSchedule(10, warmup_fraction=1.0), "warmup_fraction"),
        (lambda: LearnedSchedule(10, monotone=True, warmup_fraction=0.1), "free knots"),
        (lambda: ScheduleLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), 0.5), "callable"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@settings(max_examples=30, deadline=None)
@given(step=st.integers(max_value=-1))
def test_negative_steps_are_refused_by_every_schedule(step):
    for schedule in (
        LinearWarmup(3), ExponentialWarmup(3), CosineDecay(3), CosineRestarts(3, 2), Cyclic(2),
        warmup_cosine(1, 3), LearnedSchedule(3),
    ):
        with pytest.raises(ValueError, match=">= 0"):
            schedule(step)


@settings(max_examples=30, deadline=None)
@given(warmup=st.integers(1, 1000), total=st.integers(1, 1000))
def test_warmup_cosine_accepts_exactly_warmups_shorter_than_training(warmup, total):
    if warmup < total:
        s = warmup_cosine(warmup, total)
        assert s(warmup) == pytest.approx(1.0)
        assert s(total) == pytest.approx(0.0, abs=1e-12)
    else:
        with pytest.raises(ValueError, match="shorter than training"):
            warmup_cosine(warmup, total)


@settings(max_examples=40, deadline=None)
@given(step=st.integers(0, 10_000), up=st.integers(1, 50), down=st.integers(1, 50))
def test_cyclic_stays_between_its_bounds(step, up, down):
    value = Cyclic(up, down, min_factor=0.2, max_factor=0.9)(step)
    assert 0.2 - 1e-12 <= value <= 0.9 + 1e-12




@pytest.mark.parametrize(("warmup_fraction", "prior"), [(0.1, warmup_cosine(4, 41)), (0.0, CosineDecay(40))])
def test_learned_schedule_starts_as_warmup_cosine_and_its_spec_says_so(warmup_fraction, prior):
    schedule = LearnedSchedule(40, num_knots=8, warmup_fraction=warmup_fraction, init_factor=2.0)
    expected = LearnedSchedule(40, num_knots=8).initialise_as(prior, scale=2.0)
    assert torch.equal(schedule.log_knots, expected.log_knots)
    assert float(schedule(20)) == pytest.approx(max(2.0 * float(prior(20)), 0.01), rel=1e-5)
    rebuilt = LearnedSchedule(**schedule.to_spec()["arguments"])
    assert torch.equal(rebuilt.log_knots, schedule.log_knots)
