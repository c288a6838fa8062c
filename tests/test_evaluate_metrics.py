"""Metrics on hand-made curves: smoothing, closed-form speedups, capping, divergence, IQM."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import trim_mean

from metaoptimizer.evaluate import metrics
from metaoptimizer.evaluate.metrics import (
    interquartile_mean,
    lower_envelope,
    ratio,
    seed_mean,
    smooth,
    smoothing_window,
    speedup,
    steps_to_target,
    summarize,
)


def reference_smooth(values, window):
    """Loop reference: mean of the last ``window`` values, inf when any of them is not finite."""
    out = []
    for k in range(len(values)):
        chunk = np.asarray(values[max(0, k - window + 1) : k + 1], dtype=float)
        out.append(np.inf if not np.isfinite(chunk).all() else chunk.mean())
    return np.array(out)


finite_losses = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(values=finite_losses, window=st.integers(1, 12))
def test_smooth_matches_loop_reference(values, window):
    np.testing.assert_allclose(smooth(values, window), reference_smooth(values, window), rtol=1e-9, atol=1e-6)


def test_smooth_reads_nan_and_inf_as_diverged_for_the_window_that_holds_them():
    values = [1.0, 2.0, math.nan, 4.0, 5.0, 6.0, -math.inf]
    got = smooth(values, 2)
    np.testing.assert_array_equal(got, [1.0, 1.5, np.inf, np.inf, 4.5, 5.5, np.inf])
    np.testing.assert_array_equal(got, reference_smooth([1, 2, np.inf, 4, 5, 6, np.inf], 2))


def test_smooth_is_exact_after_a_huge_spike_leaves_the_window():
    """A loss spike of 5e18 (a run that nearly diverges, then recovers) must not wipe out later means."""
    values = [2.3, 5e18, 3.0, 2.5, 2.4, 2.2]
    np.testing.assert_array_equal(smooth(values, 2)[3:], [2.75, 2.45, 2.3])


def test_smooth_with_window_one_is_exactly_the_identity():
    values = 1.0 / np.arange(1, 2001)
    np.testing.assert_array_equal(smooth(values, 1), values)


@settings(max_examples=30, deadline=None)
@given(window=st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.none(), st.booleans()))
def test_smooth_rejects_bad_windows(window):
    with pytest.raises(ValueError, match="window"):
        smooth([1.0, 2.0], window)


@pytest.mark.parametrize("values", [[], [[1.0, 2.0]], 3.0])
def test_curves_must_be_non_empty_and_one_dimensional(values):
    with pytest.raises(ValueError, match="1-D"):
        steps_to_target(values, 1.0)


def test_smoothing_window_is_five_percent_of_the_budget_at_least_one():
    assert smoothing_window(200) == 10
    assert smoothing_window(10) == 1
    assert smoothing_window(1000, 0.1) == 100
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            smoothing_window(100, bad)


def test_seed_mean_averages_smoothed_seeds_and_propagates_divergence():
    a, b = [4.0, 2.0, 2.0], [2.0, 2.0, math.nan]
    np.testing.assert_allclose(seed_mean([a, b], 2), [3.0, 2.5, np.inf])
    with pytest.raises(ValueError, match="equal length"):
        seed_mean([[1.0], [1.0, 2.0]], 1)
    with pytest.raises(ValueError, match="at least one"):
        seed_mean([], 1)


def test_lower_envelope_is_the_elementwise_minimum():
    np.testing.assert_array_equal(lower_envelope([[3.0, 1.0, math.nan], [2.0, 2.0, 0.5]]), [2.0, 1.0, 0.5])


def test_steps_to_target_is_one_based_and_none_when_never_reached():
    assert steps_to_target([3.0, 2.0, 1.0, 0.5], 1.0) == 3
    assert steps_to_target([0.1], 1.0) == 1
    assert steps_to_target([3.0, math.nan, 2.0], 1.0) is None


def test_speedup_closed_form_power_laws():
    """Reference loss 1/t, rule loss 1/(3t): the rule reaches 1/T at T/3, a speedup of exactly 3."""
    steps = np.arange(1, 91)
    result = speedup(1.0 / steps, 1.0 / (3.0 * steps))
    assert result == metrics.Speedup(target=1 / 90, baseline_steps=90, rule_steps=30, budget=90, value=3.0,
                                     reached=True)


def test_speedup_target_comes_from_the_envelope_over_learning_rates():
    """The target is the best loss of any lr; the reference steps are those of the lr that gets there."""
    t = np.arange(1, 101, dtype=float)
    small_lr = 1.0 / t  # best 0.01
    large_lr = np.maximum(2.0 / t, 0.005)  # best 0.02
    good_lr = 1.0 / (2 * t)  # best 0.005, at the last step
    envelope = lower_envelope([small_lr, large_lr, good_lr])
    rule = np.maximum(1.0 / (8 * t), 0.001)  # 1/(8t) <= 0.005 from t = 25
    result = speedup(envelope, rule)
    assert result.target == 0.005
    assert (result.baseline_steps, result.rule_steps, result.value) == (100, 25, 4.0)


def test_speedup_is_capped_and_flagged_when_the_rule_never_reaches_the_target():
    t = np.arange(1, 51, dtype=float)
    result = speedup(1.0 / t, 2.0 / t)  # target 1/50 at step 50; rule bottoms out at 1/25
    assert not result.reached and result.rule_steps is None
    assert result.value == 50 / 50
    shorter = speedup(1.0 / t, np.full(20, 0.5))  # a 20-step budget caps at 50 / 20
    assert shorter.value == 2.5 and shorter.budget == 20 and not shorter.reached


def test_a_diverged_rule_only_counts_the_steps_before_it_diverged():
    t = np.arange(1, 41, dtype=float)
    before = np.concatenate([1.0 / (4 * t[:10]), np.full(30, np.nan)])  # reaches 1/40 at t = 10, then NaN
    assert speedup(1.0 / t, before).value == 4.0
    after = np.concatenate([1.0 / t[:5], np.full(35, np.inf)])  # diverges before reaching it
    capped = speedup(1.0 / t, after)
    assert not capped.reached and capped.value == 1.0


@settings(max_examples=60, deadline=None)
@given(
    curve=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=30),
    gaps=st.lists(st.floats(0.0, 1.0), min_size=30, max_size=30),
)
def test_speedup_against_itself_is_one_and_a_pointwise_better_rule_is_at_least_as_fast(curve, gaps):
    baseline = np.array(curve)
    assert speedup(baseline, baseline).value == 1.0
    better = baseline - np.array(gaps[: baseline.size])
    result = speedup(baseline, better)
    assert result.reached and result.value >= 1.0


def test_speedup_without_any_finite_baseline_loss_is_an_error():
    with pytest.raises(ValueError, match="every baseline curve diverged"):
        speedup([math.inf, math.nan], [1.0, 0.5])


def test_ratio_follows_ieee_semantics():
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(1.0, 0.0) == math.inf
    assert ratio(2.0, math.inf) == 0.0
    assert math.isnan(ratio(0.0, 0.0)) and math.isnan(ratio(math.inf, math.inf))


def reference_iqm(values):
    ordered = np.sort(np.asarray(values, dtype=float))
    n = ordered.size
    return ordered[n // 4 : n - n // 4].mean()


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40))
def test_interquartile_mean_matches_numpy_and_scipy(values):
    assert interquartile_mean(values) == pytest.approx(reference_iqm(values), rel=1e-9, abs=1e-6)
    assert interquartile_mean(values) == pytest.approx(trim_mean(values, 0.25), rel=1e-9, abs=1e-6)


def test_interquartile_mean_of_a_known_list():
    assert interquartile_mean([100.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, -100.0]) == 3.5  # keeps 2, 3, 4, 5
    assert interquartile_mean([7.0]) == 7.0
    assert interquartile_mean([1.0, 2.0, math.inf]) == math.inf  # fewer than 4 values: nothing is trimmed


def test_interquartile_mean_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="at least one"):
        interquartile_mean([])
    with pytest.raises(ValueError, match="NaN"):
        interquartile_mean([1.0, math.nan])


def test_summarize_leaves_nan_out_and_counts_it():
    summary = summarize([1.0, 2.0, math.nan, 3.0, 10.0])
    assert (summary.median, summary.iqm, summary.count, summary.excluded) == (2.5, 2.5, 4, 1)
    assert 1.0 <= summary.iqm_low <= summary.iqm <= summary.iqm_high <= 10.0
    empty = summarize([math.nan])
    assert math.isnan(empty.median) and math.isnan(empty.iqm) and (empty.count, empty.excluded) == (0, 1)


def test_bootstrap_iqm_interval_is_seeded_and_brackets_the_iqm():
    values = [0.8, 1.0, 1.1, 1.3, 1.5, 2.0, 3.0, 0.5]
    low, high = metrics.bootstrap_iqm_interval(values)
    assert (low, high) == metrics.bootstrap_iqm_interval(values)  # seeded: reports are reproducible
    assert min(values) <= low <= interquartile_mean(values) <= high <= max(values)
    narrow = metrics.bootstrap_iqm_interval(values, level=0.5)
    assert low <= narrow[0] <= narrow[1] <= high
    assert metrics.bootstrap_iqm_interval([2.0]) == (2.0, 2.0)


@pytest.mark.parametrize(("values", "options", "message"), [
    ([], {}, "at least one value"), ([1.0, math.nan], {}, "no NaN"), ([1.0], {"level": 1.0}, "level"),
    ([1.0], {"resamples": 0}, "resamples")])
def test_bootstrap_iqm_interval_rejects_bad_input(values, options, message):
    with pytest.raises(ValueError, match=message):
        metrics.bootstrap_iqm_interval(values, **options)
