"""LearnedOptimizer: torch.optim semantics over any update rule."""

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from metaoptimizer import optim
from metaoptimizer.config import OptimizerState
from metaoptimizer.optim import LearnedOptimizer
from metaoptimizer.rules import hand, named_chain, scale_by_schedule
from metaoptimizer.rules.base import UpdateRule
from metaoptimizer.rules.lstm import LSTMRule, budget_aware_lstm
from metaoptimizer.schedules import CosineDecay

X = torch.randn(32, 5, generator=torch.Generator().manual_seed(1))
Y = torch.randn(32, 2, generator=torch.Generator().manual_seed(2))


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def loss_of(model):
    like = next(model.parameters())
    return nn.functional.mse_loss(model(X.to(like)), Y.to(like))


def run(model, opt, steps, scheduler=None, drop=None):
    """``steps`` optimizer steps; ``drop(step)`` names parameter indices whose grad is set to None."""
    params = list(model.parameters())
    for step in range(steps):
        opt.zero_grad()
        loss_of(model).backward()
        for index in drop(step) if drop else ():
            params[index].grad = None
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return [p.detach().clone() for p in model.parameters()]


def assert_close_lists(actual, expected, atol=1e-6):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=atol, rtol=0)


def assert_bitwise(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


class Recorder(UpdateRule):
    """Test rule: SGD with lr 0.1 that records every call's names, step and running loss."""

    name = "recorder"

    def __init__(self):
        super().__init__()
        self.calls = []

    def init(self, params, *, num_steps=None):
        seen = {n: torch.zeros((), device=p.device) for n, p in params.items()}
        return OptimizerState(num_steps=num_steps, slots={"seen": seen})

    def update(self, grads, state, params, *, loss=None):
        step, state = self.begin_update(grads, state, params, loss)
        self.calls.append((sorted(grads), step, state.running_loss))
        seen = {n: state.slots["seen"][n] + 1 for n in grads}
        return {n: -0.1 * g for n, g in grads.items()}, state.replace(step_count=step, slots={"seen": seen})


# --- agreement with torch.optim ---------------------------------------------------------------


PAIRS = {
    "sgd": (lambda: hand.SGD(lr=0.1, weight_decay=0.01), lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.01)),
    "nesterov": (
        lambda: hand.Momentum(lr=0.05, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    ),
    # eps_root=0: the rule's default eps_root deliberately departs from torch where the variance is ~0.
    "rmsprop": (
        lambda: hand.RMSProp(lr=1e-2, centered=True, momentum=0.5, eps_root=0.0),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2, centered=True, momentum=0.5),
    ),
    "adam": (lambda: hand.Adam(lr=1e-3), lambda ps: torch.optim.Adam(ps, lr=1e-3)),
    "adamw_amsgrad": (
        lambda: hand.AdamW(lr=1e-2, weight_decay=0.1, amsgrad=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
    ),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_matches_torch_optim_trajectory_in_float64(name):
    make_rule, make_reference = PAIRS[name]
    ours, reference = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    got = run(ours, LearnedOptimizer(ours.parameters(), make_rule()), 60)
    want = run(reference, make_reference(reference.parameters()), 60)
    assert_close_lists(got, want, atol=1e-9)
    assert not torch.equal(got[0], make_model(dtype=torch.float64)[0].weight.detach())


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_equals_the_functional_rule_bitwise(name):
    """Without torch kernels the adapter adds nothing to the rule's arithmetic: same bits as
    init/update/apply_updates."""
    model = make_model()
    got = run(model, LearnedOptimizer(model.parameters(), PAIRS[name][0](), foreach=False), 30)
    rule, reference = PAIRS[name][0](), make_model()
    params = dict(reference.named_parameters())
    state = rule.init(params)
    for step in range(1, 31):
        loss = nn.functional.mse_loss(torch.func.functional_call(reference, params, (X,)), Y)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        with torch.no_grad():
            updates, state = rule.update(grads, state, params)
        params = {n: p.detach().add(updates[n]).requires_grad_() for n, p in params.items()}
    assert_bitwise(got, list(params.values()))


@pytest.mark.parametrize("maximize", [False, True])
def test_float32_adam_matches_torch_adam(maximize):
    ours, reference = make_model(), make_model()
    got = run(ours, LearnedOptimizer(ours.parameters(), hand.Adam(lr=1e-3), maximize=maximize), 100)
    want = run(reference, torch.optim.Adam(reference.parameters(), lr=1e-3, maximize=maximize), 100)
    assert_close_lists(got, want)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.3),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: min(1.0, (epoch + 1) / 8)),
    ],
    ids=["StepLR", "LambdaLR"],
)
def test_lr_schedulers_scale_the_rule_like_torch(make_scheduler):
    """The group lr multiplies the rule's updates: rule lr 1e-2 x scheduled multiplier == torch lr."""
    ours, reference = make_model(), make_model()
    opt = LearnedOptimizer(ours.parameters(), hand.Adam(lr=1e-2), lr=1.0)
    ref = torch.optim.Adam(reference.parameters(), lr=1e-2)
    got = run(ours, opt, 20, scheduler=make_scheduler(opt))
    want = run(reference, ref, 20, scheduler=make_scheduler(ref))
    assert_close_lists(got, want)
    assert opt.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"] / 1e-2)


def test_lr_is_a_multiplier_on_the_updates():
    ours, reference = make_model(), make_model()
    got = run(ours, LearnedOptimizer(ours.parameters(), hand.SGD(lr=0.1), lr=0.5), 10)
    want = run(reference, torch.optim.SGD(reference.parameters(), lr=0.05), 10)
    assert_close_lists(got, want)


def test_zero_lr_keeps_parameters_but_advances_state():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = LearnedOptimizer(model.parameters(), hand.Adam(), lr=0.0)
    after = run(model, opt, 3)
    assert_bitwise(after, before)
    assert all(int(opt.state[p]["step"]) == 3 for p in model.parameters())


def test_missing_gradients_skip_parameters_like_torch_adam():
    """Parameters without grad keep their state; each parameter counts its own Adam steps."""
    drop = lambda step: [1] if step % 3 == 0 else ([3] if step % 4 == 1 else [])  # noqa: E731
    ours, reference = make_model(), make_model()
    got = run(ours, LearnedOptimizer(ours.parameters(), hand.Adam(lr=1e-2)), 25, drop=drop)
    want = run(reference, torch.optim.Adam(reference.parameters(), lr=1e-2), 25, drop=drop)
    assert_close_lists(got, want)


def test_one_rule_call_per_step_count_and_untouched_state_without_grad():
    model = make_model()
    rule = Recorder()
    opt = LearnedOptimizer(model.parameters(), rule)
    params = list(model.parameters())
    run(model, opt, 1, drop=lambda step: [2])
    assert params[2] not in opt.state
    state_1 = opt.state[params[1]]
    run(model, opt, 1, drop=lambda step: [1])
    assert opt.state[params[1]] is state_1
    assert rule.calls == [
        (["g0.p0", "g0.p1", "g0.p3"], 1, None),
        (["g0.p0", "g0.p3"], 2, None),
        (["g0.p2"], 1, None),
    ]
    assert {p: int(opt.state[p]["step"]) for p in params} == {params[0]: 2, params[1]: 1, params[2]: 1, params[3]: 2}
    assert set(opt.state[params[0]]) == {"step", "seen"}
    assert opt.state[params[0]]["seen"].item() == 2


def test_no_gradients_at_all_is_a_no_op():
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), Recorder())
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None
    assert_bitwise([p.detach() for p in model.parameters()], before)
    assert len(opt.state) == 0


def test_add_param_group_matches_torch():
    """A group added mid-run starts its own step count and uses its own lr, as in torch.optim.Adam."""

    def scenario(make_opt):
        model = make_model()
        first, second = model[0], model[2]
        opt = make_opt([{"params": first.parameters()}])
        for step in range(12):
            if step == 5:
                opt.add_param_group({"params": second.parameters(), "lr": opt.param_groups[0]["lr"] * 0.5})
            opt.zero_grad()
            loss_of(model).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], opt

    got, opt = scenario(lambda groups: LearnedOptimizer(groups, hand.Adam(lr=1e-2)))
    want, _ = scenario(lambda groups: torch.optim.Adam(groups, lr=1e-2))
    assert_close_lists(got, want)
    assert [int(opt.state[p]["step"]) for p in opt.param_groups[1]["params"]] == [7, 7]
    assert set(opt.state[opt.param_groups[1]["params"][0]]) == {"step", "exp_avg", "exp_avg_sq"}


# --- closures and the running loss ------------------------------------------------------------


def test_closure_returns_loss_and_feeds_an_exponential_average():
    model = make_model()
    rule = Recorder()
    opt = LearnedOptimizer(model.parameters(), rule, loss_decay=0.5)
    losses = []

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        losses.append(loss.item())
        return loss

    returned = [opt.step(closure) for _ in range(3)]
    assert [r.item() for r in returned] == losses
    expected = [losses[0], 0.5 * losses[0] + 0.5 * losses[1]]
    expected.append(0.5 * expected[1] + 0.5 * losses[2])
    assert [call[2] for call in rule.calls] == pytest.approx(expected)
    assert opt.running_loss == pytest.approx(expected[-1])
    assert opt.state_dict()["running_loss"] == pytest.approx(expected[-1])
    assert opt.clock == 3


# --- non-finite values --------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    index=st.integers(0, 3),
    position=st.integers(0, 1000),
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_nonfinite_gradient_raises_naming_parameter_and_changes_nothing(index, position, value):
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), hand.Adam(lr=1e-2))
    run(model, opt, 2)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    states = {p: opt.state[p] for p in params}
    opt.zero_grad()
    loss_of(model).backward()
    params[index].grad.view(-1)[position % params[index].numel()] = value
    with pytest.raises(ValueError, match=rf"'g0\.p{index}'.*NaN or Inf.*nonfinite='skip'"):
        opt.step()
    assert_bitwise([p.detach() for p in params], before)
    assert all(opt.state[p] is states[p] for p in params)


def test_nonfinite_skip_counts_and_changes_nothing():
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), hand.Adam(lr=1e-2), nonfinite="skip")
    run(model, opt, 2)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    states = {p: opt.state[p] for p in params}
    opt.zero_grad()
    loss_of(model).backward()
    params[1].grad[0] = math.inf
    params[3].grad[1] = math.nan
    opt.step()
    assert opt.skipped_steps == 1
    assert_bitwise([p.detach() for p in params], before)
    assert all(opt.state[p] is states[p] for p in params)
    run(model, opt, 1)
    assert opt.skipped_steps == 1
    assert all(int(opt.state[p]["step"]) == 3 for p in params)


def test_nonfinite_on_first_step_creates_no_state():
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), hand.Adam(), nonfinite="skip")
    loss_of(model).backward()
    model[0].bias.grad[0] = math.nan
    opt.step()
    assert len(opt.state) == 0 and opt.skipped_steps == 1


def test_several_nonfinite_gradients_are_all_named():
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), hand.SGD(lr=0.1))
    loss_of(model).backward()
    model[0].bias.grad[0] = math.nan
    model[2].bias.grad[0] = math.inf
    with pytest.raises(ValueError, match=r"'g0\.p1'.*\['g0\.p3'\]"):
        opt.step()


def test_nonfinite_check_handles_empty_and_mixed_precision_tensors():
    params = [
        nn.Parameter(torch.zeros(0)),
        nn.Parameter(torch.ones(3, dtype=torch.float64)),
        nn.Parameter(torch.ones(2, dtype=torch.bfloat16)),
    ]
    opt = LearnedOptimizer(params, hand.SGD(lr=0.5))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert params[1].tolist() == [0.5] * 3 and params[2].tolist() == [0.5] * 2
    params[1].grad[0] = 1e300  # finite in float64, would overflow a float32 check
    opt.step()
    params[2].grad.fill_(6e4)  # finite in bfloat16 and float16 alike; their sum may overflow, they do not
    opt.step()
    half = nn.Parameter(torch.zeros(2, dtype=torch.float16))
    half.grad = torch.full_like(half, 6e4)
    assert torch.isinf(half.grad.sum())
    LearnedOptimizer([half], hand.SGD(lr=1e-6)).step()
    assert torch.isfinite(half).all() and half[0] < 0
    params[2].grad[1] = math.inf
    with pytest.raises(ValueError, match=r"'g0\.p2' \(shape \(2,\)\)"):
        opt.step()


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_closure_loss(policy):
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), Recorder(), nonfinite=policy)

    def closure():
        opt.zero_grad()
        loss_of(model).backward()
        return torch.tensor(math.nan)

    before = [p.detach().clone() for p in model.parameters()]
    if policy == "raise":
        with pytest.raises(ValueError, match="the loss contains NaN or Inf"):
            opt.step(closure)
    else:
        assert math.isnan(opt.step(closure).item())
        assert opt.skipped_steps == 1 and opt.running_loss is None
    assert_bitwise([p.detach() for p in model.parameters()], before)


# --- state dicts --------------------------------------------------------------------------------


def through_disk(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def closure_for(model, opt):
    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize(
    "make_rule",
    [lambda: hand.Adam(lr=1e-2), lambda: LSTMRule(hidden_size=4, state_dtype="bfloat16")],
    ids=["adam", "lstm-bf16-state"],
)
def test_resume_from_state_dict_gives_identical_trajectory(make_rule):
    torch.manual_seed(3)
    rule = make_rule()

    def build(model):
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}]
        opt = LearnedOptimizer(groups, rule, nonfinite="skip")
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)

    model = make_model()
    opt, scheduler = build(model)
    for _ in range(10):
        opt.step(closure_for(model, opt))
        scheduler.step()
    saved_opt, saved_sched = through_disk(opt.state_dict()), copy.deepcopy(scheduler.state_dict())
    saved_params = copy.deepcopy(model.state_dict())
    for _ in range(10):
        opt.step(closure_for(model, opt))
        scheduler.step()

    fresh = make_model(seed=99)
    fresh.load_state_dict(saved_params)
    fresh_opt, fresh_sched = build(fresh)
    fresh_opt.load_state_dict(saved_opt)
    fresh_sched.load_state_dict(saved_sched)
    for _ in range(10):
        fresh_opt.step(closure_for(fresh, fresh_opt))
        fresh_sched.step()

    assert_bitwise(list(fresh.parameters()), list(model.parameters()))
    assert fresh_opt.running_loss == opt.running_loss
    assert fresh_opt.param_groups[1]["lr"] == opt.param_groups[1]["lr"]
    for p, q in zip(fresh.parameters(), model.parameters(), strict=True):
        ours, theirs = fresh_opt.state[p], opt.state[q]
        assert int(ours["step"]) == int(theirs["step"]) == 20 and ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key])


def test_state_dict_is_plain_and_keeps_counters():
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), hand.Adam(), nonfinite="skip")
    run(model, opt, 2)
    loss_of(model).backward()
    model[0].bias.grad[0] = math.nan
    opt.step()
    state_dict = through_disk(opt.state_dict())
    assert state_dict["rule"] == "adam" and state_dict["skipped_steps"] == 1
    assert int(state_dict["state"][0]["step"]) == 2 and state_dict["clock"] == 2  # a skipped step is no step
    assert set(state_dict["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    fresh = LearnedOptimizer(make_model().parameters(), hand.Adam())
    fresh.load_state_dict(state_dict)
    assert fresh.skipped_steps == 1


def test_load_state_dict_rejects_mismatches():
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), hand.Adam())
    run(model, opt, 1)
    good = opt.state_dict()
    with pytest.raises(ValueError, match="saved with update rule 'adam'.*runs 'sgd'"):
        LearnedOptimizer(model.parameters(), hand.SGD(lr=0.1)).load_state_dict(good)
    with pytest.raises(ValueError, match="missing keys"):
        torch_state = torch.optim.Adam(model.parameters()).state_dict()
        LearnedOptimizer(model.parameters(), hand.Adam()).load_state_dict(torch_state)
    with pytest.raises(ValueError, match="doesn't match the size"):
        LearnedOptimizer(model[0].parameters(), hand.Adam()).load_state_dict(good)
    with pytest.raises(ValueError, match="parameter id 7"):
        LearnedOptimizer(model.parameters(), hand.Adam()).load_state_dict({**good, "state": {7: good["state"][0]}})
    with pytest.raises(ValueError, match=r"\('g0\.p1'\) must be a dict of tensors with a 'step' entry"):
        LearnedOptimizer(model.parameters(), hand.Adam()).load_state_dict({**good, "state": {1: {"exp_avg": 1.0}}})


def test_deepcopy_continues_identically():
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), hand.Momentum(lr=0.05), nonfinite="skip")
    run(model, opt, 3)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    assert twin_opt.rule is not opt.rule and twin_opt.nonfinite == "skip"
    assert_bitwise(run(twin_model, twin_opt, 4), run(model, opt, 4))


# --- learned rules, devices, memory ownership ---------------------------------------------------


def test_rule_with_meta_parameters_runs_without_building_a_graph():
    model = make_model()
    rule = LSTMRule(hidden_size=6)
    opt = LearnedOptimizer(model.parameters(), rule)
    before = [p.detach().clone() for p in model.parameters()]
    run(model, opt, 3)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(w.grad is None for w in rule.parameters())
    state = opt.state[model[0].weight]
    assert state["hidden"].shape == (2, model[0].weight.numel(), 6)
    assert all(not t.requires_grad for t in state.values())


def test_rule_on_another_device_is_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match=r"rule 'lstm' is on \['meta'\] but parameters are on \['cpu'\].*rule\.to"):
        LearnedOptimizer(model.parameters(), LSTMRule(hidden_size=4).to("meta"))
    rule = LSTMRule(hidden_size=4)
    opt = LearnedOptimizer(model.parameters(), rule)
    rule.to("meta")
    loss_of(model).backward()
    with pytest.raises(ValueError, match="rule.to"):
        opt.step()


class Hoarder(UpdateRule):
    """Test rule whose state references its inputs: the first parameters and the latest gradients."""

    name = "hoarder"

    def init(self, params, *, num_steps=None):
        return OptimizerState(slots={"first_param": dict(params), "last_grad": dict(params)})

    def update(self, grads, state, params, *, loss=None):
        step, state = self.begin_update(grads, state, params, loss)
        slots = {**state.slots, "last_grad": dict(grads)}
        return {n: -0.1 * g for n, g in grads.items()}, state.replace(step_count=step, slots=slots)


def test_state_does_not_alias_parameters_or_gradients_mutated_in_place():
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), Hoarder())
    initial = model[0].weight.detach().clone()
    loss_of(model).backward()
    grad = model[0].weight.grad.clone()
    opt.step()
    opt.zero_grad(set_to_none=False)
    state = opt.state[model[0].weight]
    torch.testing.assert_close(state["last_grad"], grad)
    torch.testing.assert_close(state["first_param"], initial)
    assert not torch.equal(model[0].weight.detach(), initial)


class Flaky(Recorder):
    """Fails on the first update of a parameter that joins after others have started."""

    def update(self, grads, state, params, *, loss=None):
        if state.step_count == 0 and self.calls:
            raise RuntimeError("rule failed")
        return super().update(grads, state, params, loss=loss)


def test_a_failing_rule_call_leaves_parameters_and_state_unchanged():
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), Flaky())
    params = list(model.parameters())
    run(model, opt, 1, drop=lambda step: [3])
    states = {p: opt.state[p] for p in params[:3]}
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="rule failed"):
        run(model, opt, 1)
    assert all(opt.state[p] is states[p] for p in params[:3]) and params[3] not in opt.state
    assert_bitwise([p.detach() for p in params], before)


class WrongStep(Recorder):
    def update(self, grads, state, params, *, loss=None):
        updates, new = super().update(grads, state, params, loss=loss)
        return updates, new.replace(step_count=0)


class Stranger(Recorder):
    def update(self, grads, state, params, *, loss=None):
        updates, new = super().update(grads, state, params, loss=loss)
        return updates, new.replace(slots={**new.slots, "seen": {"elsewhere": torch.zeros(1)}})


@pytest.mark.parametrize(
    ("rule", "message"),
    [(WrongStep(), "step_count=0 after update 1"), (Stranger(), "unknown parameter 'elsewhere'")],
)
def test_rules_breaking_the_contract_are_reported(rule, message):
    model = make_model()
    loss_of(model).backward()
    with pytest.raises(ValueError, match=message):
        LearnedOptimizer(model.parameters(), rule).step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_parameters_match_torch_adam_and_check_the_rule_device():
    ours, reference = make_model().cuda(), make_model().cuda()
    got = run(ours, LearnedOptimizer(ours.parameters(), hand.Adam(lr=1e-3)), 30)
    want = run(reference, torch.optim.Adam(reference.parameters(), lr=1e-3), 30)
    assert_close_lists(got, want)
    lstm_opt = LearnedOptimizer(ours.parameters(), LSTMRule(hidden_size=4).cuda())
    assert all(p.is_cuda for p in run(ours, lstm_opt, 2))
    with pytest.raises(ValueError, match=r"\['cpu'\] but parameters are on \['cuda:0'\]"):
        LearnedOptimizer(ours.parameters(), LSTMRule(hidden_size=4))


# --- bad input ----------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    params = list(make_model().parameters())
    with pytest.raises(TypeError, match="UpdateRule"):
        LearnedOptimizer(params, torch.optim.SGD)
    with pytest.raises(ValueError, match=r"nonfinite='ignore'.*'raise', 'skip'"):
        LearnedOptimizer(params, hand.SGD(lr=0.1), nonfinite="ignore")
    with pytest.raises(ValueError, match="loss_decay"):
        LearnedOptimizer(params, hand.SGD(lr=0.1), loss_decay=1.0)
    with pytest.raises(ValueError, match="maximize must be True or False"):
        LearnedOptimizer(params, hand.SGD(lr=0.1), maximize=1)
    with pytest.raises(TypeError, match="floating-point tensors only"):
        LearnedOptimizer([torch.zeros(3, dtype=torch.long)], hand.SGD(lr=0.1))
    with pytest.raises(ValueError, match="empty parameter list"):
        LearnedOptimizer([], hand.SGD(lr=0.1))


def test_rejected_param_group_is_not_added():
    opt = LearnedOptimizer(make_model().parameters(), hand.SGD(lr=0.1))
    with pytest.raises(ValueError, match="lr must be a number >= 0"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": -1.0})
    with pytest.raises(TypeError, match="floating-point"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.int64)]})
    assert len(opt.param_groups) == 1


@settings(max_examples=30, deadline=None, derandomize=True)
@given(lr=st.one_of(st.floats(max_value=-1e-30), st.just(math.nan), st.just(math.inf), st.text(max_size=3)))
def test_bad_lr_is_rejected(lr):
    with pytest.raises(ValueError, match="lr must be a number"):
        LearnedOptimizer([nn.Parameter(torch.zeros(2))], hand.SGD(lr=0.1), lr=lr)


def test_sparse_gradients_are_rejected():
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = LearnedOptimizer(embedding.parameters(), hand.SGD(lr=0.1))
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients.*'g0.p0'"):
        opt.step()


def test_public_names():
    assert "LearnedOptimizer" in optim.__all__
    assert issubclass(LearnedOptimizer, torch.optim.Optimizer)


def test_total_steps_is_the_budget_of_a_budget_aware_rule_and_its_absence_warns():
    model = make_model()
    rule = budget_aware_lstm(200, hidden_size=4, init_lr=0.01, momentum_decay=0.9)
    opt = LearnedOptimizer(model.parameters(), rule, total_steps=1000)
    run(model, opt, 1)
    assert opt.total_steps == 1000 and rule.default_num_steps == 200  # the rule is not changed
    with pytest.warns(UserWarning, match="plans for 200 updates.*total_steps"):
        assert LearnedOptimizer(model.parameters(), rule).total_steps == 200
    with pytest.raises(ValueError, match="num_steps must be an integer > 0"):
        LearnedOptimizer(model.parameters(), rule, total_steps=0)
    with pytest.raises(ValueError, match="budget-aware: pass the run's length"):
        LearnedOptimizer(model.parameters(), LSTMRule(hidden_size=4, training_fraction=True))


def test_late_parameters_follow_the_optimizer_clock():
    """A parameter that joins late gets the run's point of a budget-aware schedule, not its own."""
    rule = named_chain(sgd=hand.SGD(lr=1.0), schedule=scale_by_schedule(CosineDecay(10)))
    early, late = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = LearnedOptimizer([early], rule, total_steps=10)
    for step in range(6):
        if step == 4:
            opt.add_param_group({"params": [late]})
        before = late.detach().clone()
        early.grad, late.grad = torch.ones(1), torch.ones(1)
        opt.step()
    assert int(opt.state[late]["step"]) == 2 and opt.clock == 6
    assert float((before - late).detach()) == pytest.approx(CosineDecay(10)(5))


def test_step_passes_the_loss_to_rules_that_read_it():
    model = make_model()
    rule = LossReader()
    opt = LearnedOptimizer(model.parameters(), rule)
    loss = loss_of(model)
    loss.backward()
    opt.step(loss=loss)
    opt.step(closure_for(model, opt))
    assert rule.losses[0] == loss.item() and len(rule.losses) == 2
    with pytest.raises(ValueError, match=r"reads the training loss: call optimizer.step\(closure\)"):
        opt.step()
    with pytest.raises(ValueError, match="either a closure or loss="):
        opt.step(closure_for(model, opt), loss=1.0)


class LossReader(Recorder):
    name = "loss_reader"
    reads_loss = True

    def __init__(self):
        super().__init__()
        self.losses = []

    def update(self, grads, state, params, *, loss=None):
        self.losses.append(float(loss))
        return super().update(grads, state, params, loss=loss)


# --- torch kernels (foreach / fused) against the rule's functional update ---------------------------

KERNEL_RULES = {
    "sgd": lambda: hand.SGD(lr=0.1, weight_decay=0.01),
    "momentum_dampening": lambda: hand.Momentum(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "nesterov": lambda: hand.Momentum(lr=0.05, momentum=0.9, nesterov=True),
    "rmsprop": lambda: hand.RMSProp(lr=1e-2, weight_decay=0.01),
    "rmsprop_momentum": lambda: hand.RMSProp(lr=1e-2, momentum=0.5),
    "adam": lambda: hand.Adam(lr=1e-2, weight_decay=0.01),
    "adam_amsgrad": lambda: hand.Adam(lr=1e-2, amsgrad=True),
    "adamw": lambda: hand.AdamW(lr=1e-2, weight_decay=0.1),
    "adamw_eps_root_0": lambda: hand.AdamW(lr=1e-2, weight_decay=0.1, eps_root=0.0),
}
FUSED = ("sgd", "momentum_dampening", "nesterov", "adamw_eps_root_0")


def two_groups(model):
    """Two param groups with different lr multipliers (a kernel call takes one lr)."""
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.5}]


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "name, kernel", [(name, "foreach") for name in sorted(KERNEL_RULES)] + [(name, "fused") for name in FUSED]
)
def test_torch_kernels_match_the_functional_update(name, kernel, dtype, atol):
    drop = lambda step: [1] if step < 3 else ([2] if step % 4 == 0 else [])  # noqa: E731 late and intermittent
    fast, reference = make_model(dtype=dtype), make_model(dtype=dtype)
    opt = LearnedOptimizer(two_groups(fast), KERNEL_RULES[name](), **{kernel: True})
    assert opt.kernel == kernel
    got = run(fast, opt, 30, drop=drop)
    want = run(reference, LearnedOptimizer(two_groups(reference), KERNEL_RULES[name](), foreach=False), 30, drop=drop)
    assert_close_lists(got, want, atol=atol)
    assert not torch.equal(got[0], make_model(dtype=dtype)[0].weight.detach().to(dtype))


@pytest.mark.parametrize("name", sorted(KERNEL_RULES))
def test_torch_kernels_run_bfloat16_parameters(name):
    """(float16 with eps=1e-8 overflows in every form, torch.optim's included.)"""
    dtype = torch.bfloat16
    fast, reference = make_model(dtype=dtype), make_model(dtype=dtype)
    got = run(fast, LearnedOptimizer(fast.parameters(), KERNEL_RULES[name]()), 5)
    want = run(reference, LearnedOptimizer(reference.parameters(), KERNEL_RULES[name](), foreach=False), 5)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)


def test_the_default_kernel_is_foreach_and_resumes_bit_exactly():
    model, reference = make_model(), make_model()
    opt = LearnedOptimizer(reference.parameters(), hand.Adam(lr=1e-2))
    assert opt.kernel == "foreach"
    want = run(reference, opt, 6)
    first = LearnedOptimizer(model.parameters(), hand.Adam(lr=1e-2))
    run(model, first, 3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = LearnedOptimizer(model.parameters(), hand.Adam(lr=1e-2))
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert_bitwise(run(model, second, 3), want)


SAME_AS_TORCH = {
    "sgd": (lambda: hand.SGD(lr=0.1, weight_decay=0.01), lambda ps, **k: torch.optim.SGD(ps, 0.1, weight_decay=0.01, **k)),
    "nesterov": (lambda: hand.Momentum(lr=0.05, momentum=0.9, nesterov=True),
                 lambda ps, **k: torch.optim.SGD(ps, 0.05, momentum=0.9, nesterov=True, **k)),
    "rmsprop": (lambda: hand.RMSProp(lr=1e-2, momentum=0.5, weight_decay=0.01, eps_root=0.0),
                lambda ps, **k: torch.optim.RMSprop(ps, 1e-2, momentum=0.5, weight_decay=0.01, **k)),
    "adam": (lambda: hand.Adam(lr=1e-2, weight_decay=0.01, eps_root=0.0),
             lambda ps, **k: torch.optim.Adam(ps, 1e-2, weight_decay=0.01, **k)),
    "adamw_amsgrad": (lambda: hand.AdamW(lr=1e-2, amsgrad=True, eps_root=0.0),
                      lambda ps, **k: torch.optim.AdamW(ps, 1e-2, amsgrad=True, **k)),
}


@pytest.mark.parametrize(
    "name, kernel",
    [(name, "foreach") for name in sorted(SAME_AS_TORCH)] + [(n, "fused") for n in sorted(SAME_AS_TORCH) if n != "rmsprop"],
)
def test_kernels_follow_torch_optim_bitwise_with_the_same_implementation(name, kernel):
    """At eps_root=0 the kernels run torch.optim's arithmetic, pass for pass (torch has no fused RMSprop)."""
    make_rule, make_torch = SAME_AS_TORCH[name]
    ours, reference = make_model(), make_model()
    got = run(ours, LearnedOptimizer(ours.parameters(), make_rule(), **{kernel: True}), 20)
    want = run(reference, make_torch(reference.parameters(), **{kernel: True}), 20)
    assert_bitwise(got, want)


@pytest.mark.parametrize(
    "rule, kwargs, message",
    [
        (lambda: LSTMRule(), {"foreach": True}, "has no torch foreach kernel"),
        (lambda: hand.RMSProp(), {"fused": True}, "has no torch fused kernel"),
        (lambda: hand.RMSProp(centered=True), {"foreach": True}, "has no torch foreach kernel"),
        (lambda: hand.Adam(), {"fused": True}, "has no torch fused kernel"),
        (lambda: hand.Adam(), {"foreach": True, "fused": True}, "not both"),
        (lambda: hand.Adam(), {"fused": 1}, "fused must be True, False or None"),
    ],
)
def test_kernel_requests_that_cannot_be_met_are_errors(rule, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearnedOptimizer(make_model().parameters(), rule(), **kwargs)


@pytest.mark.parametrize("rule", [lambda: hand.RMSProp(centered=True), lambda: budget_aware_lstm(10)])
def test_rules_without_a_kernel_run_their_own_update(rule):
    assert LearnedOptimizer(make_model().parameters(), rule(), total_steps=10).kernel is None


def test_learned_rules_with_an_in_place_step_use_it_unless_told_not_to():
    assert LearnedOptimizer(make_model().parameters(), LSTMRule()).kernel == "in_place"
    assert LearnedOptimizer(make_model().parameters(), LSTMRule(), foreach=False).kernel is None
    with pytest.raises(ValueError, match="no torch fused kernel"):
        LearnedOptimizer(make_model().parameters(), LSTMRule(), fused=True)


def test_a_hand_rule_without_a_kernel_says_so():
    from metaoptimizer.rules import HypergradientRule

    rule = HypergradientRule()
    assert not rule.has_torch_kernel()
    with pytest.raises(NotImplementedError, match="HypergradientRule has no torch kernel"):
        rule.torch_step([], [], {}, 0)


def test_tensor_hyperparameters_reach_the_kernel_as_numbers():
    make = lambda: hand.Adam(lr=torch.tensor(1e-2), betas=(torch.tensor(0.9), 0.999))  # noqa: E731
    fast, reference = make_model(), make_model()
    opt = LearnedOptimizer(fast.parameters(), make())
    assert opt.kernel == "foreach" and opt.defaults["betas"] == (pytest.approx(0.9), 0.999)
    got = run(fast, opt, 10)
    want = run(reference, LearnedOptimizer(reference.parameters(), make(), foreach=False), 10)
    assert_close_lists(got, want)


# --- schedulers that cycle momentum, and weight-decay groups -------------------------------------

@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize(
    "make_rule, make_reference",
    [
        (lambda: hand.Adam(lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
        (lambda: hand.AdamW(lr=1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
        (lambda: hand.Momentum(lr=1e-2, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)),
        (lambda: hand.RMSProp(lr=1e-3, momentum=0.9), lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9)),
    ],
    ids=["adam", "adamw", "momentum", "rmsprop"],
)
def test_one_cycle_lr_with_its_defaults_cycles_the_rules_momentum_like_torch(make_rule, make_reference, foreach):
    """OneCycleLR with its defaults (cycle_momentum=True) sets the group's betas/momentum, which
    the rule reads; lr 1.0 x the rule's lr plays torch's max_lr."""
    ours, reference = make_model(), make_model()
    opt = LearnedOptimizer(ours.parameters(), make_rule(), foreach=foreach)
    ref = make_reference(reference.parameters())
    ref_max_lr = ref.param_groups[0]["lr"]
    got = run(ours, opt, 20, scheduler=torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=20))
    want = run(reference, ref, 20, scheduler=torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=ref_max_lr, total_steps=20))
    assert_close_lists(got, want)
    key = "betas" if "betas" in opt.defaults else "momentum"
    cycled = opt.param_groups[0][key]
    assert cycled == ref.param_groups[0][key] and cycled != opt.defaults[key]


@pytest.mark.parametrize("rule", [LSTMRule, lambda: hand.SGD(lr=0.1), lambda: hand.RMSProp()])
def test_one_cycle_lr_refuses_rules_without_a_momentum_coefficient_and_the_documented_fix_works(rule):
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), rule())
    with pytest.raises(ValueError, match="must support momentum or beta1"):
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10, cycle_momentum=False)
    run(model, opt, 5, scheduler=scheduler)
    assert opt.param_groups[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.norm, self.out = nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.linear(x))))


def adamw_recipe_groups(model, weight_decay=None):
    """The AdamW recipe: decay matrices, not biases and norms."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and "norm" not in n)]
    first = {"params": decay} if weight_decay is None else {"params": decay, "weight_decay": weight_decay}
    return [first, {"params": rest, "weight_decay": 0.0}]


@pytest.mark.parametrize("kernel", [{}, {"foreach": False}, {"fused": True}], ids=["foreach", "functional", "fused"])
def test_adamw_recipe_without_decay_on_biases_and_norms_matches_torch(kernel):
    torch.manual_seed(0)
    ours = Block()
    reference = copy.deepcopy(ours)
    fused = kernel.get("fused", False)
    rule = hand.AdamW(lr=1e-2, weight_decay=0.1, eps_root=0.0 if fused else hand.EPS_ROOT)
    opt = LearnedOptimizer(adamw_recipe_groups(ours), rule, **kernel)
    ref = torch.optim.AdamW(adamw_recipe_groups(reference), lr=1e-2, weight_decay=0.1, fused=fused)
    got, want = run(ours, opt, 25), run(reference, ref, 25)
    if fused:  # the same kernel with the same arguments
        assert_bitwise(got, want)
    else:
        assert_close_lists(got, want)


def test_a_learned_rule_gets_decoupled_decay_per_group():
    """p <- p * (1 - lr * weight_decay) + lr * update: add_decayed_weights' semantics, per group."""
    from metaoptimizer.rules import HypergradientRule, chain
    from metaoptimizer.rules.transforms import add_decayed_weights

    torch.manual_seed(0)
    ours = Block()
    undecayed, masked = copy.deepcopy(ours), copy.deepcopy(ours)
    rule = HypergradientRule(base_lr=0.05)
    got = run(ours, LearnedOptimizer(adamw_recipe_groups(ours, weight_decay=0.02), rule, lr=0.5), 10)
    plain = run(undecayed, LearnedOptimizer(adamw_recipe_groups(undecayed), rule, lr=0.5), 10)
    decay_group = ("g0.p0", "g0.p1")  # the adapter's names for the first group's parameters
    transform = chain(HypergradientRule(base_lr=0.05), add_decayed_weights(0.02, mask=decay_group))
    want = run(masked, LearnedOptimizer(adamw_recipe_groups(masked), transform, lr=0.5), 10)
    assert_close_lists(got, want)
    assert not all(torch.allclose(g, p, atol=1e-4) for g, p in zip(got, plain, strict=True))


@pytest.mark.parametrize(
    "rule, group, message",
    [
        (LSTMRule, {"eps": 1e-6}, r"sets \['eps'\], which the update rule 'lstm' does not read"),
        (lambda: hand.SGD(lr=0.1), {"betas": (0.9, 0.99)}, r"sets \['betas'\]"),
        (lambda: hand.Adam(), {"momentum": 0.9}, r"sets \['momentum'\]"),
        (LSTMRule, {"weight_decay": -0.1}, "weight_decay must be a number >= 0"),
        (lambda: hand.Adam(), {"betas": (1.5, 0.999)}, r"betas\[0\] must lie in \[0, 1\)"),
    ],
)
def test_group_hyperparameters_the_rule_does_not_read_or_bad_values_are_errors(rule, group, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        LearnedOptimizer([{"params": list(model.parameters()), **group}], rule())


def test_per_coordinate_rates_are_read_and_reset_through_the_optimizer():
    from metaoptimizer.rules import HypergradientRule

    model = make_model()
    opt = LearnedOptimizer(model.parameters(), HypergradientRule(base_lr=0.05, alpha_lr=1.0))
    run(model, opt, 5)
    rates = opt.get_per_param_lr()
    assert set(rates) == set(model.parameters())
    assert any(not torch.all(r == 0.05) for r in rates.values())
    steps = [opt.state[p]["step"].item() for p in model.parameters()]
    opt.rule.set_learning_rate(0.02)
    opt.reset_per_param_lr()
    assert all(torch.all(r == 0.02) for r in opt.get_per_param_lr().values())
    assert [opt.state[p]["step"].item() for p in model.parameters()] == steps == [5.0] * 4
    with pytest.raises(TypeError, match="keeps no per-coordinate rates"):
        LearnedOptimizer(model.parameters(), hand.SGD(lr=0.1)).reset_per_param_lr()


def test_the_readme_weight_decay_groups_and_closure_snippet_runs():
    """README's usage section: the AdamW recipe's groups and a closure step with the pretrained rule."""
    import re
    import warnings
    from pathlib import Path

    from metaoptimizer import pretrained

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (snippet,) = [s for s in re.findall(r"```python\n(.*?)```", readme, re.S) if "weight_decay" in s]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(torch.randn(16, 64), torch.randint(10, (16,))) for _ in range(3)]
    namespace = {"torch": torch, "model": model, "meta": pretrained.load("lstm-digits-mlp", model), "batches": batches}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(snippet, "README.md", "exec"), namespace)
    optimizer = namespace["optimizer"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-5, 0.0]
    assert optimizer.clock == 3 and optimizer.running_loss is not None
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
