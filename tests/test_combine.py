"""chain / named_chain and the transforms: composition semantics beyond the generic contract."""

from __future__ import annotations

import pytest
import torch

from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.rules import (
    SGD,
    Adam,
    OptimizerState,
    UpdateRule,
    apply_updates,
    chain,
    clip_by_global_norm,
    from_spec,
    named_chain,
    scale,
    scale_by_schedule,
    to_spec,
)
from metaoptimizer.rules.transforms import add_decayed_weights, schedule_from_spec, schedule_to_spec
from metaoptimizer.schedules import CosineDecay, Cyclic, LearnedSchedule, LinearWarmup, warmup_cosine
from metaoptimizer.tasks.quadratic import QuadraticFamily


def quadratic_params() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, -2.0, 3.0]), "b": torch.tensor(0.5)}


def test_scale_by_schedule_multiplies_each_update_by_the_schedule_at_the_run_clock():
    schedule = CosineDecay(4)
    rule = named_chain(adam=Adam(lr=0.1), schedule=scale_by_schedule(schedule))
    base = Adam(lr=0.1)
    params = quadratic_params()
    state, base_state = rule.init(params), base.init(params)
    for step in range(1, 6):
        grads = {n: 2 * p for n, p in params.items()}
        updates, state = rule.update(grads, state, params)
        expected, base_state = base.update(grads, base_state, params)
        for name in params:
            torch.testing.assert_close(updates[name], expected[name] * schedule(step - 1))
        assert state.step_count == step
        params = apply_updates(params, updates)
    assert set(state.slots) == {"adam/exp_avg", "adam/exp_avg_sq"} and list(rule.parameters()) == []
    # a clock ahead of the step count (a parameter that joined late) follows the run's schedule
    late, _ = rule.update({"w": torch.ones(3)}, rule.init(params).replace(clock=3), params)
    first, _ = Adam(lr=0.1).update({"w": torch.ones(3)}, Adam(lr=0.1).init(params), params)
    torch.testing.assert_close(late["w"], first["w"] * schedule(3))


def test_chain_feeds_each_member_the_previous_updates():
    params = {"w": torch.tensor([3.0, 4.0])}
    grads = {"w": torch.tensor([30.0, 40.0])}
    clipped, _ = chain(clip_by_global_norm(5.0), SGD(lr=1.0)).update(grads, OptimizerState(), params)
    torch.testing.assert_close(clipped["w"], torch.tensor([-3.0, -4.0]))  # clip, then descend
    decayed, _ = chain(SGD(lr=0.1), add_decayed_weights(0.5), scale(2.0)).update(grads, OptimizerState(), params)
    torch.testing.assert_close(decayed["w"], 2.0 * (-0.1 * grads["w"] - 0.5 * params["w"]))
    small = {"w": torch.tensor([0.3, 0.4])}
    unclipped, _ = clip_by_global_norm(5.0).update(small, OptimizerState(), params)
    torch.testing.assert_close(unclipped["w"], small["w"])


def test_add_decayed_weights_decays_only_masked_parameters():
    params = {"w": torch.ones(2), "b": torch.ones(2)}
    grads = {n: torch.zeros(2) for n in params}
    updates, _ = add_decayed_weights(0.1, mask=("w",)).update(grads, OptimizerState(), params)
    torch.testing.assert_close(updates["w"], torch.full((2,), -0.1))
    torch.testing.assert_close(updates["b"], torch.zeros(2))


def test_members_keep_their_state_apart_and_chains_nest():
    inner = named_chain(first=Adam(lr=0.1), second=Adam(lr=0.2))
    outer = chain(inner, scale(0.5))
    params = quadratic_params()
    _, state = outer.update({n: torch.ones_like(p) for n, p in params.items()}, outer.init(params), params)
    assert set(state.slots) == {"0/first/exp_avg", "0/first/exp_avg_sq", "0/second/exp_avg", "0/second/exp_avg_sq"}
    assert state.member("0/first/").slots.keys() == {"exp_avg", "exp_avg_sq"}
    rebuilt = from_spec(to_spec(outer))
    assert to_spec(rebuilt) == to_spec(outer)


def test_a_learned_schedule_is_a_budget_aware_meta_parameter_of_the_chain():
    schedule = LearnedSchedule(total_steps=10, num_knots=3)
    rule = named_chain(sgd=SGD(lr=0.1), schedule=scale_by_schedule(schedule))
    assert list(rule.parameters()) == [schedule.log_knots]
    assert rule.budget_aware and rule.default_num_steps == 10 and rule.init({}).num_steps == 10
    params = {"w": torch.tensor([2.0, -1.0])}
    state = rule.init(params, num_steps=10)
    loss = None
    for _ in range(3):
        grads = {"w": 2 * params["w"].detach()}
        updates, state = rule.update(grads, state, params)
        params = apply_updates(params, updates)
        loss = (params["w"] ** 2).sum()
    (grad,) = torch.autograd.grad(loss, schedule.log_knots)
    assert grad[0] < 0 and torch.isfinite(grad).all()  # larger early steps lower this quadratic's loss


def test_a_scheduled_hand_rule_meta_trains_with_staggered_budgets():
    """The budget lives in each run's state, so runs of different lengths share the schedule."""
    schedule = LearnedSchedule(total_steps=20, num_knots=2, init_factor=0.1)
    rule = named_chain(sgd=SGD(lr=0.01), schedule=scale_by_schedule(schedule))
    trainer = MetaTrainer(rule, QuadraticFamily(), meta_lr=0.05, unroll_steps=10, run_steps=20, min_run_steps=5, seed=0)
    before = schedule.log_knots.detach().clone()
    results = trainer.train(6)
    assert not any(r.skipped for r in results)
    assert not torch.equal(before, schedule.log_knots.detach())


def test_chain_wraps_any_update_rule():
    class Ones(UpdateRule):
        name = "ones_for_test_combine"

        def init(self, params, *, num_steps=None):
            return OptimizerState(num_steps=num_steps)

        def update(self, grads, state, params, *, loss=None):
            step, state = self.begin_update(grads, state, params, loss)
            return {n: torch.ones_like(g) for n, g in grads.items()}, state.replace(step_count=step)

    rule = chain(Ones(), scale_by_schedule(LinearWarmup(2)))
    params = {"w": torch.zeros(1)}
    updates, _ = rule.update({"w": torch.zeros(1)}, rule.init(params).replace(step_count=1), params)
    assert float(updates["w"]) == pytest.approx(0.5)  # the second update: LinearWarmup(2)(1)


@pytest.mark.parametrize("schedule", [CosineDecay(7, 0.1), warmup_cosine(3, 12), Cyclic(2, 3), LearnedSchedule(9, 2)])
def test_schedules_round_trip_through_specs(schedule):
    rebuilt = schedule_from_spec(schedule_to_spec(schedule))
    with torch.no_grad():
        assert [float(rebuilt(k)) for k in range(12)] == [float(schedule(k)) for k in range(12)]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: chain(), ValueError, "at least one rule"),
        (lambda: chain(Adam(), torch.nn.Linear(1, 1)), TypeError, "must be an UpdateRule"),
        (lambda: named_chain(**{"a/b": Adam()}), ValueError, "may not contain"),
        (lambda: scale_by_schedule("cosine"), TypeError, "callable"),
        (lambda: schedule_to_spec(lambda step: 1.0), ValueError, "describable schedules"),
        (lambda: schedule_from_spec({"schedule": "Nope"}), ValueError, "describable schedules"),
        (lambda: add_decayed_weights(-1.0), ValueError, "weight_decay"),
        (lambda: clip_by_global_norm(0.0), ValueError, "max_norm"),
        (lambda: scale(float("nan")), ValueError, "factor"),
        (lambda: from_spec({"rule": "no_such_rule", "hyperparameters": {}}), ValueError, "registered rules"),
        (lambda: from_spec({"rule": "sgd"}), ValueError, "'rule' and 'hyperparameters'"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()
