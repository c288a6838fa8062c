import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metaoptimizer.config import METHODS, MetaOptimizerConfig, OptimizerState


def test_defaults_follow_the_spec():
    c = MetaOptimizerConfig()
    assert (c.method, c.hidden_size, c.num_layers, c.preconditioning, c.coordinatewise) == ("lstm", 20, 2, True, True)
    assert (c.meta_lr, c.unroll_steps, c.gradient_clipping) == (1e-3, 20, 1.0)


def test_round_trip_through_dict():
    c = MetaOptimizerConfig(method="l2o", hidden_size=8, rule_options={"a": 1})
    assert MetaOptimizerConfig.from_dict(c.to_dict()) == c


@given(method=st.text(max_size=12).filter(lambda m: m not in METHODS))
def test_unknown_method_lists_accepted_values(method):
    with pytest.raises(ValueError, match="lstm.*meta_sgd.*warp_grad.*l2o"):
        MetaOptimizerConfig(method=method)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", 0), ("hidden_size", 2.5), ("num_layers", -1), ("unroll_steps", 0), ("meta_lr", 0.0),
        ("meta_lr", float("nan")), ("gradient_clipping", -1.0), ("preprocess_p", float("inf")),
        ("preconditioning", 1), ("preprocessing", "tanh"), ("meta_objective", "accuracy"), ("loss", "hinge"),
        ("rule_options", [1]), ("hidden_size", True),
    ],
)
def test_bad_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MetaOptimizerConfig(**{field: value})


def test_lstm_must_be_coordinatewise():
    with pytest.raises(ValueError, match="coordinatewise"):
        MetaOptimizerConfig(coordinatewise=False)


def test_unknown_fields_in_dict_are_rejected():
    with pytest.raises(ValueError, match="unknown config fields"):
        MetaOptimizerConfig.from_dict({"method": "lstm", "hiden_size": 3})


def test_state_select_merge_detach_and_dict_round_trip():
    w = torch.ones(2, requires_grad=True)
    a = OptimizerState(step_count=3, num_steps=9, slots={"hidden": {"a": w * 2}, "m": {"a": torch.zeros(2)}})
    b = OptimizerState(step_count=3, num_steps=9, slots={"lstm/hidden": {"b": torch.ones(1)}, "m": {"b": torch.ones(1)}})
    merged = OptimizerState.merge([a, b])
    assert merged.num_steps == 9 and merged.schedule_step() == 3 and merged.replace(clock=5).schedule_step() == 5
    assert merged.cell == {} and merged.per_param_lr == {}  # the spec's fields are views onto the slots
    assert set(merged.hidden) == {"a", "b"} and set(merged.slots["m"]) == {"a", "b"}
    assert set(merged.select(["b"]).slots["m"]) == {"b"}
    assert not merged.detach().hidden["a"].requires_grad
    assert OptimizerState.from_dict(merged.to_dict()).step_count == 3
    assert merged.with_prefix("x/").member("x/").slots.keys() == merged.slots.keys()
    assert len(merged.tensors()) == 4
    assert merged.to(dtype=torch.float64).hidden["b"].dtype == torch.float64
    assert OptimizerState.merge([]) == OptimizerState() and OptimizerState().is_fresh()
    with pytest.raises(ValueError, match="step counts"):
        OptimizerState.merge([a, OptimizerState(step_count=1)])
    with pytest.raises(ValueError, match="OptimizerState"):
        OptimizerState.from_dict({"bogus": 1})
