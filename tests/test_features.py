"""Optimizer input features: accumulators against closed forms, features, normalisation, checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaoptimizer.config import OptimizerState
from metaoptimizer.rules.features import (
    FEATURE_KINDS,
    FeatureConfig,
    advance_per_coordinate,
    as_matrix,
    check_update_inputs,
    factored_pass,
    factored_second_moment,
    feature_moments,
    global_features,
    init_slots,
    matrix_shape,
    normalisation_scales,
    state_numel,
    tensor_accumulators,
    tensor_features,
    tensor_statistics,
)

RICH = FeatureConfig(
    momentum_decays=(0.9, 0.5),
    rms_decays=(0.99, 0.9),
    factored_decays=(0.999, 0.8),
    features=FEATURE_KINDS,
    training_fraction=True,
)
SHAPES = [(), (7,), (5, 3), (4, 3, 2, 2)]


def _params(dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    return {f"p{i}": torch.randn(shape, generator=generator, dtype=dtype) for i, shape in enumerate(SHAPES)}


def _run(config, grads_seq, params):
    """Advance every accumulator through ``grads_seq`` (a list of gradient dicts)."""
    slots = init_slots(params, config)
    for grads in grads_seq:
        for name, g in grads.items():
            acc = tensor_accumulators(slots, name, config)
            factored, inv_roots = factored_pass(as_matrix(g), acc, config)
            per_coordinate, *_ = tensor_statistics(g.reshape(-1), params[name].reshape(-1), acc, inv_roots, config)
            for slot, value in {**factored, **per_coordinate}.items():
                slots[slot][name] = value
    return slots


def test_default_config_keeps_adams_state():
    config = FeatureConfig()
    assert config.floats_per_coordinate == 2
    assert config.slot_names == ("momentum_0.9", "rms_0.999")
    assert config.feature_names == ("grad", "param", "momentum_0.9", "rms_0.999", "mom_ratio_0.9", "grad_ratio")
    assert config.num_features == 6
    assert config.num_global == 5


def test_rich_config_names_and_sizes():
    assert RICH.feature_names == (
        "grad", "param", "momentum_0.9", "momentum_0.5", "rms_0.99", "rms_0.9", "factored_0.999", "factored_0.8",
        "mom_ratio_0.9", "mom_ratio_0.5", "grad_ratio",
    )
    assert RICH.num_global == 6
    assert RICH.floats_per_coordinate == 4
    assert RICH.slot_names[-4:] == ("factored_row_0.999", "factored_col_0.999", "factored_row_0.8", "factored_col_0.8")


def test_config_round_trips_through_dict():
    data = RICH.to_dict()
    assert FeatureConfig.coerce(data) == RICH
    assert FeatureConfig.coerce({**data, "momentum_decays": list(data["momentum_decays"])}) == RICH
    assert FeatureConfig.coerce(None) == FeatureConfig()
    assert FeatureConfig.coerce(RICH) is RICH


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"momentum_decays": (1.0,)}, r"momentum_decays\[0\] must lie in \[0, 1\)"),
        ({"momentum_decays": 0.9}, "must be a sequence of decays"),
        ({"momentum_decays": ("a",)}, "must be a number"),
        ({"momentum_decays": (0.9, 0.9)}, "repeated decays"),
        ({"features": ("grad", "adam")}, "unknown features"),
        ({"features": ()}, "non-empty sequence"),
        ({"features": "grad"}, "non-empty sequence"),
        ({"features": ("grad", "grad"), "momentum_decays": (), "rms_decays": ()}, "repeated names"),
        ({"rms_decays": (), "factored_decays": ()}, "divide by a second moment"),
        ({"momentum_decays": ()}, r"need at least one decay in momentum_decays"),
        ({"factored_decays": (0.9,), "features": ("grad", "momentum", "rms")}, "are kept but no feature reads them"),
        ({"step_timescales": (1.0, 0.0)}, r"step_timescales\[1\] must be a number > 0"),
        ({"step_timescales": "10"}, "sequence of positive numbers"),
        ({"training_fraction": 1}, "training_fraction must be True or False"),
        ({"eps": -1.0}, "eps must be a number > 0"),
        ({"state_dtype": "int8"}, "state_dtype='int8' is not supported"),
    ],
)
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FeatureConfig(**kwargs)


def test_coerce_rejects_unknown_fields_and_types():
    with pytest.raises(ValueError, match="unknown feature options"):
        FeatureConfig.coerce({"momentum": (0.9,)})
    with pytest.raises(TypeError, match="features must be a FeatureConfig"):
        FeatureConfig.coerce([0.9])


@settings(max_examples=30, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not 0.0 <= x < 1.0))
def test_any_decay_outside_the_unit_interval_is_rejected(decay):
    with pytest.raises(ValueError, match="must lie in"):
        FeatureConfig(momentum_decays=(decay,))


def test_matrix_view_shapes():
    assert matrix_shape(()) == (1, 1)
    assert matrix_shape((7,)) == (1, 7)
    assert matrix_shape((5, 3)) == (5, 3)
    assert matrix_shape((4, 3, 2, 2)) == (4, 12)
    assert matrix_shape((0, 3)) == (0, 0)
    assert as_matrix(torch.zeros(4, 3, 2)).shape == (4, 6)


def test_init_slots_shapes_and_storage_dtype():
    params = _params(torch.float32)
    slots = init_slots(params, FeatureConfig(**{**RICH.to_dict(), "state_dtype": "bfloat16"}))
    for name, p in params.items():
        rows, cols = matrix_shape(p.shape)
        assert slots["momentum_0.9"][name].shape == (p.numel(),)
        assert slots["rms_0.9"][name].shape == (p.numel(),)
        assert slots["factored_row_0.8"][name].shape == (rows,)
        assert slots["factored_col_0.8"][name].shape == (cols,)
        assert all(slots[s][name].dtype == torch.bfloat16 for s in slots)


def test_accumulators_match_closed_form_moving_averages():
    params = _params()
    generator = torch.Generator().manual_seed(2)
    seq = [{n: torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in params.items()} for _ in range(4)]
    slots = _run(RICH, seq, params)
    for name in params:
        for decay in RICH.momentum_decays:
            expected = sum((1 - decay) * decay ** (3 - t) * seq[t][name] for t in range(4)).reshape(-1)
            torch.testing.assert_close(slots[f"momentum_{decay}"][name], expected)
        for decay in RICH.rms_decays:
            expected = sum((1 - decay) * decay ** (3 - t) * (seq[t][name] ** 2 + RICH.eps) for t in range(4))
            torch.testing.assert_close(slots[f"rms_{decay}"][name], expected.reshape(-1))
        for decay in RICH.factored_decays:
            squares = [as_matrix(seq[t][name]) ** 2 + RICH.eps for t in range(4)]
            rows = sum((1 - decay) * decay ** (3 - t) * squares[t].mean(1) for t in range(4))
            cols = sum((1 - decay) * decay ** (3 - t) * squares[t].mean(0) for t in range(4))
            torch.testing.assert_close(slots[f"factored_row_{decay}"][name], rows)
            torch.testing.assert_close(slots[f"factored_col_{decay}"][name], cols)


def test_factored_second_moment_is_exact_for_rank_one_squares():
    a, b = torch.rand(6, dtype=torch.float64) + 0.5, torch.rand(4, dtype=torch.float64) + 0.5
    square = torch.outer(a, b)
    estimate = factored_second_moment(square.mean(1), square.mean(0))
    torch.testing.assert_close(estimate, square)


def test_factored_moment_of_a_vector_is_its_full_second_moment():
    config = FeatureConfig(rms_decays=(), factored_decays=(0.0,), features=("grad_ratio",), momentum_decays=())
    g = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    acc = init_slots({"v": g}, config)
    _, inv_roots = factored_pass(as_matrix(g), tensor_accumulators(acc, "v", config), config)
    torch.testing.assert_close(inv_roots[0], torch.rsqrt(g**2 + 2 * config.eps))


def test_features_match_their_definitions():
    params = _params()
    generator = torch.Generator().manual_seed(3)
    grads = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in params.items()}
    slots = _run(RICH, [grads], params)
    eps = RICH.eps
    for name, p in params.items():
        acc = tensor_accumulators(slots, name, RICH)
        g = grads[name].reshape(-1)
        inv_roots = [
            torch.rsqrt(factored_second_moment(acc[row], acc[col]).reshape(-1) + eps)
            for (row, col), _ in RICH.factored_slots
        ]
        inv_root = inv_roots[0]
        features = dict(zip(RICH.feature_names, tensor_features(g, p.reshape(-1), acc, inv_roots, RICH), strict=True))
        torch.testing.assert_close(features["grad"], g)
        torch.testing.assert_close(features["param"], p.reshape(-1))
        torch.testing.assert_close(features["momentum_0.5"], acc["momentum_0.5"])
        torch.testing.assert_close(features["rms_0.9"], torch.sqrt(acc["rms_0.9"] + eps))
        torch.testing.assert_close(features["mom_ratio_0.9"], acc["momentum_0.9"] * inv_root)
        torch.testing.assert_close(features["grad_ratio"], g * inv_root)
        torch.testing.assert_close(features["factored_0.8"], 1 / inv_roots[1])


def test_factored_pass_returns_the_inverse_roots_of_its_new_accumulators():
    g = torch.randn(5, 3, dtype=torch.float64)
    old = tensor_accumulators(init_slots({"w": g}, RICH), "w", RICH)
    new, inv_roots = factored_pass(g, old, RICH)
    assert set(new) == {name for pair, _ in RICH.factored_slots for name in pair}
    for ((row, col), _), inv_root in zip(RICH.factored_slots, inv_roots, strict=True):
        expected = torch.rsqrt(factored_second_moment(new[row], new[col]) + RICH.eps).reshape(-1)
        torch.testing.assert_close(inv_root, expected)
    assert factored_pass(g, old, FeatureConfig()) == ({}, [])


def test_ratio_uses_the_rms_when_no_factored_moment_is_kept():
    config = FeatureConfig()
    g = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    acc = advance_per_coordinate(g, tensor_accumulators(init_slots({"v": g}, config), "v", config), config)
    features = tensor_features(g, g, acc, [], config)
    expected = acc["momentum_0.9"] / torch.sqrt(acc["rms_0.999"] + 2 * config.eps)
    torch.testing.assert_close(features[config.feature_names.index("mom_ratio_0.9")], expected)


def test_normalised_features_have_unit_rms_and_the_statistics_agree():
    features = [torch.randn(50, dtype=torch.float64) * s for s in (1e-4, 1.0, 30.0)]
    mean, mean_square = feature_moments(features)
    scales = normalisation_scales(mean_square, 1e-30)
    for f, m, s in zip(features, mean, scales, strict=True):
        torch.testing.assert_close(m, f.mean())
        torch.testing.assert_close((f * s).square().mean(), torch.tensor(1.0, dtype=torch.float64))


def test_statistics_pass_returns_param_mean_square():
    config = FeatureConfig()
    p = torch.arange(6, dtype=torch.float64)
    acc = tensor_accumulators(init_slots({"p": p}, config), "p", config)
    _, mean, mean_square, param_ms = tensor_statistics(p, p, acc, [], config)
    assert mean.shape == mean_square.shape == (config.num_features,)
    torch.testing.assert_close(param_ms, (p**2).mean())
    _, no_mean, same_square, _ = tensor_statistics(p, p, acc, [], config, with_means=False)
    assert no_mean is None
    torch.testing.assert_close(same_square, mean_square)


def test_bfloat16_state_is_rounded_but_computed_in_the_parameter_dtype():
    config = FeatureConfig(state_dtype="bfloat16")
    g = torch.full((4,), 1.0 / 3.0)
    acc = tensor_accumulators(init_slots({"p": g}, config), "p", config)
    new = advance_per_coordinate(g, acc, config)
    assert new["momentum_0.9"].dtype == torch.bfloat16
    torch.testing.assert_close(new["momentum_0.9"].float(), 0.1 * g, atol=0, rtol=1e-2)
    features = tensor_features(g, g, new, [], config)
    assert all(f.dtype == torch.float32 for f in features)


def test_global_features():
    config = FeatureConfig(step_timescales=(1.0, 100.0), training_fraction=True)
    state = OptimizerState(step_count=4, num_steps=10)
    torch.testing.assert_close(global_features(5, state, config), torch.tensor([math.tanh(5.0), math.tanh(0.05), 0.4]))
    past = OptimizerState(step_count=49, num_steps=10)
    assert global_features(50, past, config)[-1] == 1.0  # the fraction stays in [0, 1] past the budget
    late = OptimizerState(step_count=1, num_steps=10, clock=5)  # the run's clock, not the parameter's count
    assert global_features(2, late, config)[-1] == pytest.approx(0.5)
    assert global_features(1, state, FeatureConfig(), dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="training_fraction=True need the run's length"):
        global_features(1, OptimizerState(), config)


def test_check_update_inputs_names_the_problem():
    config = FeatureConfig()
    params = {"w": torch.zeros(2, 3)}
    slots = init_slots(params, config)
    grads = {"w": torch.zeros(2, 3)}
    check_update_inputs(grads, params, slots, config)
    with pytest.raises(ValueError, match="unknown parameter 'x'"):
        check_update_inputs({"x": torch.zeros(1)}, params, slots, config)
    with pytest.raises(ValueError, match=r"has shape \(3, 2\) but the parameter has shape \(2, 3\)"):
        check_update_inputs({"w": torch.zeros(3, 2)}, params, slots, config)
    with pytest.raises(TypeError, match="floating-point"):
        check_update_inputs({"w": torch.zeros(2, 3, dtype=torch.long)}, params, slots, config)
    with pytest.raises(ValueError, match="build the state with init"):
        check_update_inputs(grads, params, {}, config)


def test_state_numel_counts_by_kind():
    params = _params()
    recurrent = {"lstm/hidden": {"a": torch.zeros(3)}, "tensor_cell": {"a": torch.zeros(3)}}
    state = OptimizerState(slots={**init_slots(params, RICH), **recurrent})
    numel = sum(p.numel() for p in params.values())
    factored = sum(sum(matrix_shape(p.shape)) for p in params.values())
    assert state_numel(state) == {"per_coordinate": 4 * numel, "factored": 2 * factored, "recurrent": 6}
