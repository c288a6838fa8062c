"""Meta-gradient estimators: truncated BPTT, truncated ES, full ES and PES, behind one interface.

An estimator turns unrolls of a meta-step's runs (:class:`~metaoptimizer.meta.runs.TaskRun`) into
one meta-gradient row per run (:class:`RunEstimates`) and advances every run by one truncation;
:class:`RowEstimator` averages the rows into an :class:`Estimate`. What an estimator carries in a
run between truncations is its own typed state (:class:`PESParticles` for PES), saved in
checkpoints as plain tensors and numbers and rebuilt by :meth:`RowEstimator.restore_run_state`.

* :class:`TruncatedBPTT`: backpropagation through each truncation, the graph cut between them.

The ES estimators perturb the rule's meta-parameters θ (one flat vector) with antithetic Gaussian
noise ±ε, ε ~ N(0, σ²I), and need no backpropagation: unrolls run under ``torch.no_grad`` with each
particle's meta-parameters substituted functionally (:mod:`metaoptimizer.meta._vectorized`),
vmapped over particles and over tasks of equal shapes. Every particle of a run sees the same
batches (common random numbers). An unperturbed *centre* particle advances the run itself and
reports the meta-loss; it adds one unroll to the ``2 * num_pairs`` perturbed ones. PES, whose
particles carry their own states, can do without it (``centre=False``, as learned_optimization's
PES): the run then follows its first particle and reports the particles' mean meta-loss.

* :class:`TruncatedES`: each truncation, all particles start from the run's current state;
  ``g = Σ_i ε_i (L(θ+ε_i) − L(θ−ε_i)) / (2 P σ²)``. Cheap, but biased: it ignores how θ shaped
  the state the truncation starts from.
* :class:`FullES`: the same over the whole remaining run in one go (unbiased, one update per
  inner run).
* :class:`PES` (Vicol et al. 2021, "Unbiased Gradient Estimation in Unrolled Computation Graphs
  with Persistent Evolution Strategies"): each particle keeps its own inner state across
  truncations and the sum ξ_i of all perturbations it has received;
  ``g = Σ_i ξ_i (L_i⁺ − L_i⁻) / (2 P σ²)`` is unbiased for the gradient of the smoothed loss
  summed over the truncations of the run.

With :class:`TaskNormalization` the particles' meta-losses are clipped to a per-family range and
scaled to [0, 1], non-finite losses counting as the maximum, so one exploding particle gives a
strong signal instead of a skipped step.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from metaoptimizer.config import META_OBJECTIVES, OptimizerState, check_positive
from metaoptimizer.meta._vectorized import (
    UnrollJob,
    UnrollOutcome,
    flatten_meta,
    index_tree,
    meta_parameters,
    run_jobs,
)
from metaoptimizer.meta.runs import EstimatorState, TaskRun, advance, run_generator
from metaoptimizer.meta.unroll import detach_params, unroll
from metaoptimizer.rules.base import Params, UpdateRule

__all__ = [
    "ESTIMATORS", "PES", "Estimate", "FullES", "GradientEstimator", "PESParticles", "RowEstimator", "RunEstimates",
    "TaskNormalization", "TruncatedBPTT", "TruncatedES", "make_estimator",
]


@dataclass
class Estimate:
    """A meta-gradient estimate: one entry per rule parameter (None where unused)."""

    grads: list[Tensor | None]
    meta_loss: float
    finite: bool
    inner_steps: int


@dataclass
class RunEstimates:
    """Per-run meta-gradient estimates of one meta-step, one row per run.

    ``grads (runs, D)`` are flat over the rule's trainable parameters (order of
    :func:`~metaoptimizer.meta._vectorized.meta_parameters`); ``meta_losses (runs,)`` the meta-loss
    each run reports; ``inner_steps (runs,)`` the inner steps each ran. A row with a non-finite
    loss or gradient marks a step that must be skipped.
    """

    grads: Tensor
    meta_losses: Tensor
    inner_steps: Tensor

    def finite(self) -> Tensor:
        return torch.isfinite(self.meta_losses) & torch.isfinite(self.grads).all(dim=1)

    def mean(self, rule: UpdateRule) -> Estimate:
        """The average over rows (summed in row order), split into per-parameter tensors."""
        count = self.grads.shape[0]
        if count == 0:
            raise ValueError("cannot average an estimate with no runs")
        flat = self.grads.sum(dim=0) / count
        params = list(meta_parameters(rule).values())
        pieces = torch.split(flat, [p.numel() for p in params]) if params else []
        return Estimate(
            grads=[g.view(p.shape).to(p.dtype) for g, p in zip(pieces, params, strict=True)],
            meta_loss=float(self.meta_losses.sum() / count),
            finite=bool(self.finite().all()),
            inner_steps=int(self.inner_steps.sum()),
        )


class GradientEstimator(Protocol):
    """Turns unrolls of the runs into meta-gradients, advancing each run by one truncation; what it
    keeps in a run between truncations (``run.estimator_state``) it rebuilds from a checkpoint."""

    def estimate_runs(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> RunEstimates: ...

    def estimate(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> Estimate: ...

    def restore_run_state(self, saved: dict[str, Any]) -> EstimatorState | None: ...


class RowEstimator(ABC):
    """Base of estimators that compute per-run rows; :meth:`estimate` averages them."""

    @abstractmethod
    def estimate_runs(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> RunEstimates:
        """One meta-gradient row per run; advances every run by one truncation."""

    def estimate(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> Estimate:
        return self.estimate_runs(rule, runs, unroll_steps).mean(rule)

    def restore_run_state(self, saved: dict[str, Any]) -> EstimatorState | None:
        """The run state that ``to_dict()`` saved (``{}``: none). Estimators that carry nothing
        across truncations accept only ``{}``."""
        if saved:
            raise ValueError(
                f"the run holds estimator state {sorted(saved)}, which {type(self).__name__} does not keep; "
                "resume with the estimator that wrote it"
            )
        return None


@dataclass
class TruncatedBPTT(RowEstimator):
    """Backpropagation through each truncation of ``unroll_steps``; the graph is cut between them.

    ``vectorize=True`` runs the runs' unrolls through :func:`~metaoptimizer.meta._vectorized.run_jobs`
    (``vmap`` over tasks of equal shapes, ``torch.func.grad`` for the meta-gradient); the default
    backpropagates through :func:`~metaoptimizer.meta.unroll.unroll` one run at a time.
    """

    meta_objective: str = "train_loss"
    second_order: bool = False
    vectorize: bool = False

    def estimate_runs(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> RunEstimates:
        if self.vectorize:
            return self._vectorized(rule, runs, unroll_steps)
        params = list(meta_parameters(rule).values())
        size = sum(p.numel() for p in params)
        rows, losses, inner = [], [], []
        for run in runs:
            steps = run.steps_left(unroll_steps)
            result = unroll(
                rule, run.task, detach_params(run.params), run.state.detach(), run.train_batches, steps,
                second_order=self.second_order, meta_objective=self.meta_objective, valid_batches=run.valid_batches,
            )
            row = torch.full((size,), math.nan, device=params[0].device if params else None)
            if result.finite:
                grads = torch.autograd.grad(result.meta_loss, params, allow_unused=True) if params else ()
                row = _flatten_grads(grads, params)
            advance(run, result.params, result.state, steps, result.finite)
            rows.append(row)
            losses.append(float(result.meta_loss.detach()))
            inner.append(steps)
        return _rows(rows, losses, inner)

    def _vectorized(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> RunEstimates:
        theta = flatten_meta(rule)
        jobs, steps = [], []
        for run in runs:
            steps.append(run.steps_left(unroll_steps))
            train, valid = run.draw_batches(steps[-1], self.meta_objective)
            jobs.append(UnrollJob(run.task, theta[None], run.params, run.state, train, valid))
        outcomes = run_jobs(
            rule, jobs, meta_objective=self.meta_objective, second_order=self.second_order, with_grad=True
        )
        rows, losses = [], []
        for run, outcome, count in zip(runs, outcomes, steps, strict=True):
            finite = bool(outcome.finite()[0])
            advance(run, index_tree(outcome.params, 0), index_tree(outcome.state, 0), count, finite)
            rows.append(outcome.grads[0].detach() if finite else torch.full_like(theta, math.nan))
            losses.append(float(outcome.meta_losses[0]))
        return _rows(rows, losses, steps)


def _flatten_grads(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> Tensor:
    """One flat vector of ``grads`` (zeros for unused parameters)."""
    if not params:
        return torch.zeros(0)
    pieces = [(torch.zeros_like(p) if g is None else g.detach()).reshape(-1) for g, p in zip(grads, params, strict=True)]
    return torch.cat(pieces)


def _rows(rows: list[Tensor], losses: list[float], inner: list[int]) -> RunEstimates:
    return RunEstimates(
        grads=torch.stack(rows) if rows else torch.zeros(0, 0),
        meta_losses=torch.tensor(losses, dtype=torch.float64),
        inner_steps=torch.tensor(inner, dtype=torch.int64),
    )


ESTIMATORS = ("tbptt", "truncated_es", "full_es", "pes")


@dataclass(frozen=True)
class TaskNormalization:
    """Maps meta-losses to [0, 1]: clip to [``low``, ``high``] (the family's range), then rescale.

    NaN and ±Inf map to 1 (the maximum), so a diverging particle reads as the worst outcome.
    """

    low: float
    high: float

    def __post_init__(self) -> None:
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"TaskNormalization {name} must be a finite number, got {value!r}")
        if not self.low < self.high:
            raise ValueError(f"TaskNormalization needs low < high, got low={self.low!r}, high={self.high!r}")

    def __call__(self, losses: Tensor) -> Tensor:
        clean = torch.nan_to_num(losses, nan=self.high, posinf=self.high, neginf=self.high)
        return (clean.clamp(self.low, self.high) - self.low) / (self.high - self.low)


@dataclass
class TruncatedES(RowEstimator):
    """Antithetic ES over each truncation; particles restart from the run's state every time.

    ``sigma`` is the perturbation scale, ``num_pairs`` the number of antithetic pairs per run,
    ``normalization`` an optional :class:`TaskNormalization` (the estimate and the reported
    meta-losses are then those of the normalised losses), ``vectorize`` runs particles and
    equal-shaped tasks in one ``vmap`` call. Each row counts the inner steps of every particle.
    ``centre=False`` (PES only) drops the unperturbed particle.
    """

    sigma: float = 0.01
    num_pairs: int = 4
    meta_objective: str = "train_loss"
    normalization: TaskNormalization | None = None
    vectorize: bool = True
    centre: bool = True
    #: Whether particles keep their own states across truncations (then the centre is optional).
    persistent = False

    def __post_init__(self) -> None:
        if not isinstance(self.centre, bool):
            raise ValueError(f"centre must be True or False, got {self.centre!r}")
        if not self.centre and not self.persistent:
            raise ValueError(
                f"centre=False needs particles that keep their own states (PES); {type(self).__name__} restarts "
                "them from the centre's state every truncation"
            )
        check_positive("sigma", self.sigma)
        check_positive("num_pairs", self.num_pairs, integer=True)
        if self.meta_objective not in META_OBJECTIVES:
            raise ValueError(
                f"meta_objective={self.meta_objective!r} is not supported; accepted values: {META_OBJECTIVES}"
            )
        if self.normalization is not None and not isinstance(self.normalization, TaskNormalization):
            raise TypeError(f"normalization must be a TaskNormalization or None, got {type(self.normalization).__name__}")

    # -- hooks that the variants override ------------------------------------------------------
    def truncation_length(self, run: TaskRun, unroll_steps: int) -> int:
        return run.steps_left(unroll_steps)

    def start(self, run: TaskRun, noise: Tensor) -> tuple[Params, OptimizerState, bool, Tensor]:
        """Where the particles start (params, state, stacked per particle?) and the vectors ``w_i``
        of ``g = Σ_i w_i (L_i⁺ − L_i⁻) / (2 P σ²)``: the run's state and the current noise."""
        return run.params, run.state, False, noise

    def finish(self, run: TaskRun, outcome: UnrollOutcome, finite: Tensor, weights: Tensor) -> None:
        """Bookkeeping after the unroll, besides advancing the centre (PES keeps its particles)."""

    # -- the estimator -------------------------------------------------------------------------
    def estimate_runs(self, rule: UpdateRule, runs: list[TaskRun], unroll_steps: int) -> RunEstimates:
        theta = flatten_meta(rule)
        with torch.no_grad():
            weights, jobs, lengths = [], [], []
            for run in runs:
                lengths.append(self.truncation_length(run, unroll_steps))
                noise = self.sigma * torch.randn(self.num_pairs, theta.numel(), generator=run_generator(run))
                noise = noise.to(theta)
                params, state, stacked, run_weights = self.start(run, noise)
                weights.append(run_weights)
                train, valid = run.draw_batches(lengths[-1], self.meta_objective)
                perturbed = [theta + noise, theta - noise]
                members = torch.cat([theta[None], *perturbed] if self.centre else perturbed)
                jobs.append(UnrollJob(run.task, members, params, state, train, valid, stacked_start=stacked))
            outcomes = run_jobs(rule, jobs, meta_objective=self.meta_objective, vectorize=self.vectorize)
            rows, losses = [], []
            scale = 2 * self.num_pairs * self.sigma**2
            lead = int(self.centre)
            for run, run_weights, outcome, length in zip(runs, weights, outcomes, lengths, strict=True):
                finite = outcome.finite()
                meta = outcome.meta_losses if self.normalization is None else self.normalization(outcome.meta_losses)
                plus, minus = meta[lead : lead + self.num_pairs], meta[lead + self.num_pairs :]
                rows.append(((plus - minus).to(theta) @ run_weights) / scale)
                losses.append(float(meta[0] if self.centre else meta.mean()))
                ok = bool(finite[0] if self.centre else finite.all())
                advance(run, index_tree(outcome.params, 0), index_tree(outcome.state, 0), length, ok)
                self.finish(run, outcome, finite, run_weights)
        return RunEstimates(
            grads=torch.stack(rows),
            meta_losses=torch.tensor(losses, dtype=torch.float64),
            inner_steps=torch.tensor(lengths, dtype=torch.int64) * (lead + 2 * self.num_pairs),
        )


@dataclass
class FullES(TruncatedES):
    """Antithetic ES over the whole rest of each run: one unbiased estimate per inner run."""

    def truncation_length(self, run: TaskRun, unroll_steps: int) -> int:
        return run.remaining()


@dataclass
class PESParticles:
    """The particles PES keeps in a run between truncations: their parameters and rule states,
    stacked one row per particle (``2 * num_pairs`` rows), and ``perturbation`` ξ, the sum of the
    perturbations each antithetic pair has received so far (``(num_pairs, D)``)."""

    params: Params
    state: OptimizerState
    perturbation: Tensor

    #: The key under which checkpoints hold the particles (the layout since PES was added).
    KEY = "pes"

    def to_dict(self) -> dict[str, Any]:
        """Checkpoint form: plain tensors and numbers (``torch.load(weights_only=True)``)."""
        return {self.KEY: {"params": self.params, "state": self.state.to_dict(), "perturbation": self.perturbation}}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> PESParticles:
        """Inverse of :meth:`to_dict`."""
        if set(saved) != {cls.KEY}:
            raise ValueError(f"not saved PES particles: expected the key {cls.KEY!r}, got {sorted(saved)}")
        particles = saved[cls.KEY]
        return cls(particles["params"], OptimizerState.from_dict(particles["state"]), particles["perturbation"])


@dataclass
class PES(TruncatedES):
    """Persistent ES: particles keep their inner states and accumulated perturbations ξ across
    truncations (:class:`PESParticles` in ``run.estimator_state``), which makes the estimate
    unbiased.

    A run is ended (and replaced by the trainer) when any of its particles diverges, since that
    particle cannot continue.
    """

    persistent = True

    def start(self, run: TaskRun, noise: Tensor) -> tuple[Params, OptimizerState, bool, Tensor]:
        """The centre and the particles' own states; weights: each pair's perturbations so far, ξ."""
        saved = run.estimator_state
        if saved is None:
            count = 2 * self.num_pairs
            params = {name: p.expand(count, *p.shape) for name, p in run.params.items()}
            state = run.state.map_tensors(lambda t: t.expand(count, *t.shape))
            accumulated = noise
        else:
            if not isinstance(saved, PESParticles):
                raise TypeError(f"run {run.task_index} holds {type(saved).__name__}, not PES particles")
            if saved.perturbation.shape[0] != self.num_pairs:
                raise ValueError(
                    f"run {run.task_index} holds PES particles for {saved.perturbation.shape[0]} pairs, "
                    f"but this estimator has num_pairs={self.num_pairs}"
                )
            params, state = saved.params, saved.state
            accumulated = saved.perturbation + noise
        if not self.centre:
            return params, state, True, accumulated
        joined = {name: torch.cat([run.params[name][None], p]) for name, p in params.items()}
        return joined, _stack_front(run.state, state), True, accumulated

    def finish(self, run: TaskRun, outcome: UnrollOutcome, finite: Tensor, weights: Tensor) -> None:
        """Keep the particles (all but the centre) and ξ; end the run when a particle diverged."""
        run.diverged = run.diverged or not bool(finite.all())
        particles = slice(int(self.centre), None)
        run.estimator_state = PESParticles(
            params={name: p[particles] for name, p in outcome.params.items()},
            state=outcome.state.map_tensors(lambda t: t[particles]),
            perturbation=weights,
        )

    def restore_run_state(self, saved: dict[str, Any]) -> PESParticles | None:
        return PESParticles.from_dict(saved) if saved else None


def _stack_front(centre: OptimizerState, particles: OptimizerState) -> OptimizerState:
    """The centre's (unstacked) state in front of the particles' stacked states."""
    return pytree.tree_map(lambda c, p: torch.cat([c[None], p]) if isinstance(c, Tensor) else c, centre, particles)


def make_estimator(
    name: str, *, meta_objective: str = "train_loss", second_order: bool = False, **options: Any
) -> RowEstimator:
    """The estimator called ``name`` (one of :data:`ESTIMATORS`) with ``options``.

    ``tbptt`` takes ``vectorize``; the ES estimators take ``sigma``, ``num_pairs``, ``vectorize``,
    ``centre`` (PES) and ``loss_range`` (``(low, high)``, building a :class:`TaskNormalization`).
    """
    if name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r} is not supported; accepted values: {ESTIMATORS}")
    if name == "tbptt":
        unknown = sorted(set(options) - {"vectorize"})
        if unknown:
            raise ValueError(f"unknown options {unknown} for estimator 'tbptt'; accepted: ['vectorize']")
        return TruncatedBPTT(meta_objective, second_order, **options)
    accepted = {"sigma", "num_pairs", "vectorize", "loss_range", "centre"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"unknown options {unknown} for estimator {name!r}; accepted: {sorted(accepted)}")
    if second_order:
        raise ValueError(f"second_order=True applies to truncated BPTT only; estimator {name!r} uses no gradients")
    loss_range = options.pop("loss_range", None)
    if loss_range is not None:
        if not isinstance(loss_range, (list, tuple)) or len(loss_range) != 2:
            raise ValueError(f"loss_range must be a pair (low, high), got {loss_range!r}")
        options["normalization"] = TaskNormalization(*loss_range)
    kind = {"truncated_es": TruncatedES, "full_es": FullES, "pes": PES}[name]
    return kind(meta_objective=meta_objective, **options)
