"""Comparison metrics over loss curves: smoothing, steps-to-target speedup, ratios, median and IQM.

Everything here is a pure function over NumPy arrays. A curve is a 1-D array whose entry ``k - 1``
is the training loss observed at step ``k`` (the loss whose gradient drives update ``k``). A
non-finite entry (NaN or +-Inf) means the run had diverged by then; it is read as ``+inf``, so a
diverged run never reaches a target and never looks good.

The protocol (also written into every report):

* **Smoothing.** Minibatch losses are noisy, so every comparison uses the trailing running mean
  over the last ``window`` losses (fewer at the start; by default ``window`` is 5% of the budget,
  see :func:`smoothing_window`): ``smooth(x, w)[k] = mean(x[max(0, k-w+1) : k+1])``. A window
  containing a diverged step is ``+inf``.
* **Seeds.** A configuration's curve is the mean over seeds of the smoothed per-seed curves
  (``+inf`` from the first step where any seed has diverged). Seeds are paired: every optimizer
  sees the same initialisations and batch orders.
* **Target.** The lower envelope of the baseline's seed-mean curves over its learning-rate grid
  (the elementwise minimum) is the tuned baseline; the target is the envelope's minimum, the best
  loss the tuned baseline reaches within the budget.
* **Speedup.** ``baseline_steps / rule_steps``, where each is the first (1-based) step at which
  the curve is at or below the target. When the rule never reaches the target within its budget
  the speedup is capped at ``baseline_steps / budget`` (an upper bound on the true value) and
  flagged ``reached=False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from metaoptimizer.config import check_positive


def as_curve(values: Sequence[float] | np.ndarray, name: str = "curve") -> np.ndarray:
    """``values`` as a non-empty 1-D float64 array with every non-finite entry replaced by ``+inf``."""
    curve = np.asarray(values, dtype=np.float64)
    if curve.ndim != 1 or curve.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of losses, got shape {curve.shape}")
    return np.where(np.isfinite(curve), curve, np.inf)


#: Default smoothing window as a fraction of the step budget.
DEFAULT_WINDOW_FRACTION = 0.05


def smoothing_window(steps: int, fraction: float = DEFAULT_WINDOW_FRACTION) -> int:
    """The running-mean window for a budget of ``steps``: ``floor(fraction * steps)``, at least 1."""
    check_positive("steps", steps, integer=True)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the window fraction must lie in (0, 1], got {fraction!r}")
    return max(1, int(steps * fraction))


def smooth(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean over the last ``window`` entries (fewer at the start); ``+inf`` once diverged."""
    check_positive("window", window, integer=True)
    curve = as_curve(values)
    # Each window's mean is computed directly (no cumulative-sum differences, which lose the
    # precision of small late losses); NaN padding stands for the missing steps before step 1.
    padded = np.concatenate([np.full(window - 1, np.nan), curve])
    return np.nanmean(np.lib.stride_tricks.sliding_window_view(padded, window), axis=1)


def _stack(curves: Sequence[Sequence[float] | np.ndarray], what: str) -> np.ndarray:
    if len(curves) == 0:
        raise ValueError(f"{what} needs at least one curve")
    arrays = [as_curve(c, f"{what} curve {i}") for i, c in enumerate(curves)]
    lengths = sorted({a.size for a in arrays})
    if len(lengths) != 1:
        raise ValueError(f"{what} needs curves of equal length, got lengths {lengths}")
    return np.stack(arrays)


def seed_mean(curves: Sequence[Sequence[float] | np.ndarray], window: int) -> np.ndarray:
    """Mean over seeds of the smoothed per-seed curves (``+inf`` wherever any seed has diverged)."""
    stacked = _stack(curves, "seed_mean")
    return np.stack([smooth(c, window) for c in stacked]).mean(axis=0)


def lower_envelope(curves: Sequence[Sequence[float] | np.ndarray]) -> np.ndarray:
    """Elementwise minimum over curves of equal length (the best configuration at every step)."""
    return _stack(curves, "lower_envelope").min(axis=0)


def steps_to_target(curve: Sequence[float] | np.ndarray, target: float) -> int | None:
    """First 1-based step at which ``curve <= target``, or None when it never gets there."""
    reached = np.flatnonzero(as_curve(curve) <= target)
    return int(reached[0]) + 1 if reached.size else None


@dataclass(frozen=True)
class Speedup:
    """Steps-to-target comparison of one rule against a tuned baseline (see the module docstring).

    ``rule_steps`` is None and ``reached`` False when the rule never reached ``target``; ``value``
    is then the cap ``baseline_steps / budget``.
    """

    target: float
    baseline_steps: int
    rule_steps: int | None
    budget: int
    value: float
    reached: bool


def speedup(baseline_envelope: Sequence[float] | np.ndarray, rule_curve: Sequence[float] | np.ndarray) -> Speedup:
    """Steps-to-target speedup of ``rule_curve`` over the tuned baseline whose envelope is given.

    Both curves should already be smoothed (and seed-averaged) the same way. The rule's budget is
    the length of ``rule_curve`` (it may be longer or shorter than the baseline's).
    """
    envelope = as_curve(baseline_envelope, "baseline_envelope")
    rule = as_curve(rule_curve, "rule_curve")
    target = float(envelope.min())
    if not math.isfinite(target):
        raise ValueError(
            "every baseline curve diverged, so there is no target loss; widen the baseline's "
            "learning-rate grid towards smaller values"
        )
    baseline_steps = steps_to_target(envelope, target)
    rule_steps = steps_to_target(rule, target)
    reached = rule_steps is not None
    value = baseline_steps / (rule_steps if reached else rule.size)
    return Speedup(target, baseline_steps, rule_steps, int(rule.size), float(value), reached)


def ratio(value: float, reference: float) -> float:
    """``value / reference`` with IEEE semantics (x/0 = +-inf, 0/0 = nan, x/inf = 0, inf/inf = nan)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(value) / np.float64(reference))


def interquartile_mean(values: Sequence[float] | np.ndarray) -> float:
    """Mean of the middle half: drop ``floor(n / 4)`` values at each end of the sorted values.

    The same estimator as ``scipy.stats.trim_mean(values, 0.25)`` (the IQM of Agarwal et al. 2021).
    """
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError("interquartile_mean needs at least one value")
    if np.isnan(array).any():
        raise ValueError("interquartile_mean cannot rank NaN values; drop them first (see summarize)")
    cut = array.size // 4
    return float(np.sort(array)[cut : array.size - cut].mean())


def bootstrap_iqm_interval(
    values: Sequence[float] | np.ndarray, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the IQM: resample the values (tasks) with replacement
    ``resamples`` times (seeded, so reports are reproducible) and take the central ``level`` of
    the resampled IQMs."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0 or np.isnan(array).any():
        raise ValueError("bootstrap_iqm_interval needs at least one value and no NaN")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    check_positive("resamples", resamples, integer=True)
    n, cut = array.size, array.size // 4
    samples = np.sort(array[np.random.default_rng(seed).integers(n, size=(resamples, n))], axis=1)
    with np.errstate(invalid="ignore"):  # inf - inf where infinite values (diverged runs) are averaged
        iqms = samples[:, cut : n - cut].mean(axis=1)
        low, high = np.quantile(iqms, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Summary:
    """Median, interquartile mean and the IQM's bootstrap 95% interval (``iqm_low``, ``iqm_high``)
    of per-task values; ``excluded`` counts NaN values left out."""

    median: float
    iqm: float
    count: int
    excluded: int
    iqm_low: float = math.nan
    iqm_high: float = math.nan


def summarize(values: Sequence[float] | np.ndarray) -> Summary:
    """Median, IQM and the IQM's bootstrap 95% interval over the non-NaN ``values`` (all NaN
    when none is left)."""
    array = np.asarray(values, dtype=np.float64).ravel()
    kept = array[~np.isnan(array)]
    excluded = int(array.size - kept.size)
    if kept.size == 0:
        return Summary(math.nan, math.nan, 0, excluded)
    low, high = bootstrap_iqm_interval(kept)
    return Summary(float(np.median(kept)), interquartile_mean(kept), int(kept.size), excluded, low, high)
