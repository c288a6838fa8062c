"""Meta-training: inner runs over a task family, a gradient estimator, clipping and step skipping.

:class:`MetaTrainer` keeps ``tasks_per_step`` *slots*, each holding one inner training run
(:class:`~metaoptimizer.meta.runs.TaskRun`) and its own random generator, which draws the slot's
tasks, run lengths and ES noise. Estimators (:mod:`metaoptimizer.meta.estimators`) return one
meta-gradient row per run (:class:`~metaoptimizer.meta.estimators.RunEstimates`); the trainer
averages the rows of all slots in slot order. Because every slot's randomness is its own and the
average runs over the same rows in the same order, splitting the slots over processes
(:mod:`metaoptimizer.meta.distributed`) gives the single-process result.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metaoptimizer.config import META_OBJECTIVES, MetaOptTrainResult, OptimizerState, check_positive
from metaoptimizer.meta._step import apply_estimate
from metaoptimizer.meta._vectorized import meta_parameters
from metaoptimizer.meta.distributed import Communicator, SingleProcess
from metaoptimizer.meta.estimators import GradientEstimator, RunEstimates, TruncatedBPTT
from metaoptimizer.meta.runs import ReplayableBatches, TaskRun, run_generator
from metaoptimizer.rules.base import UpdateRule
from metaoptimizer.tasks.base import TRAIN, TaskFamily, split_seed


def gather_slot_rows(rows: RunEstimates, slots: list[int], num_slots: int, communicator: Communicator) -> RunEstimates:
    """The rows of all ``num_slots`` slots, on every process, from each process's rows for ``slots``.

    Each process writes its rows into a zero-filled ``(num_slots, D + 2)`` float64 buffer that is
    all-reduced; a sum of one value and zeros is exact, so every process gets the same rows
    bit for bit, whatever the number of processes.
    """
    if communicator.world_size == 1:
        return rows
    width = rows.grads.shape[1]
    packed = torch.zeros(num_slots, width + 2, dtype=torch.float64, device=rows.grads.device)
    index = torch.tensor(slots, device=rows.grads.device)
    packed[index, :width] = rows.grads.to(torch.float64)
    packed[index, width] = rows.meta_losses.to(packed)
    packed[index, width + 1] = rows.inner_steps.to(packed)
    total = communicator.all_reduce_sum(packed)
    return RunEstimates(
        grads=total[:, :width].to(rows.grads.dtype),
        meta_losses=total[:, width],
        inner_steps=total[:, width + 1].round().to(torch.int64),
    )


def meta_parameter_groups(rule: UpdateRule, meta_lr: float, scales: Mapping[str, float]) -> list[dict[str, Any]]:
    """Optimizer parameter groups of all of ``rule``'s parameters (frozen ones too, so that phases
    can thaw them): ``meta_lr`` times the scale of the longest prefix in ``scales`` that starts
    the parameter's name (1 when none does)."""
    named = dict(rule.named_parameters())
    for prefix, scale in scales.items():
        check_positive(f"meta_lr_scales[{prefix!r}]", scale)
        if not any(name.startswith(prefix) for name in named):
            raise ValueError(f"meta_lr_scales prefix {prefix!r} matches no meta-parameter; names: {list(named)}")
    by_length = sorted(scales.items(), key=lambda item: -len(item[0]))
    groups: dict[float, list[Tensor]] = {}
    for name, param in named.items():
        scale = next((s for prefix, s in by_length if name.startswith(prefix)), 1.0)
        groups.setdefault(scale, []).append(param)
    return [{"params": params, "lr": meta_lr * scale} for scale, params in groups.items()]


#: Outer optimizers a trainer can use, by name (options are the class's keyword arguments).
META_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
}


def make_meta_optimizer(name: str, groups: list[dict[str, Any]], options: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The outer optimizer ``name`` (one of :data:`META_OPTIMIZERS`) over ``groups`` with ``options``."""
    if name not in META_OPTIMIZERS:
        raise ValueError(f"meta_optimizer={name!r} is not supported; accepted values: {sorted(META_OPTIMIZERS)}")
    if "lr" in options:
        raise ValueError("set the meta learning rate with meta_lr, not in meta_optimizer_options")
    try:
        return META_OPTIMIZERS[name](groups, **options)
    except TypeError as error:
        raise ValueError(f"bad meta_optimizer_options {dict(options)} for {name!r}: {error}") from error


@dataclass(frozen=True)
class Phase:
    """A stretch of ``steps`` meta-steps that trains part of the rule and holds the rest fixed.

    A meta-parameter is trained when its name starts with a prefix in ``train`` (every name, when
    ``train`` is None) and with none in ``freeze``: e.g. ``Phase(1000, freeze=("scheduler",))``
    then ``Phase(500, train=("scheduler",))`` trains Celo's per-coordinate MLP with its scheduler
    frozen, then the scheduler alone. Frozen meta-parameters are neither perturbed nor updated.
    ``init`` fills named meta-parameters with a value when the phase starts, e.g. Celo's phase 1
    runs without its scheduler (``lr_mult = 0.1 exp(h @ step_weight + step_bias)`` held at 1 by
    ``{"scheduler.step_weight": 0.0, "scheduler.step_bias": ln 10}`` while frozen).
    """

    steps: int
    train: tuple[str, ...] | None = None
    freeze: tuple[str, ...] = ()
    init: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_positive("phase steps", self.steps, integer=True)
        for key in ("train", "freeze"):
            value = getattr(self, key)
            if value is None and key == "train":
                continue
            if isinstance(value, str) or not all(isinstance(prefix, str) for prefix in value):
                raise ValueError(f"phase {key} must be a list of name prefixes, got {value!r}")
            object.__setattr__(self, key, tuple(value))
        if not isinstance(self.init, Mapping) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in self.init.values()
        ):
            raise ValueError(f"phase init must map meta-parameter names to finite numbers, got {self.init!r}")

    def trains(self, name: str) -> bool:
        """Whether the meta-parameter ``name`` is trained in this phase."""
        selected = self.train is None or any(name.startswith(prefix) for prefix in self.train)
        return selected and not any(name.startswith(prefix) for prefix in self.freeze)

    def check(self, rule: UpdateRule) -> None:
        """Every prefix names some meta-parameter of ``rule`` and some meta-parameter is trained."""
        names = [name for name, _ in rule.named_parameters()]
        for prefix in (*(self.train or ()), *self.freeze):
            if not any(name.startswith(prefix) for name in names):
                raise ValueError(f"phase prefix {prefix!r} matches no meta-parameter; names: {names}")
        if not any(self.trains(name) for name in names):
            raise ValueError(f"phase {self} trains no meta-parameter; names: {names}")
        unknown = sorted(set(self.init) - set(names))
        if unknown:
            raise ValueError(f"phase init names unknown meta-parameters {unknown}; names: {names}")


def cohort_generator(seed: int) -> torch.Generator:
    """The generator of the shared run lengths of synchronised runs (a stream apart from every slot's)."""
    state = np.random.SeedSequence([seed]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def slot_generator(seed: int, slot: int) -> torch.Generator:
    """The random generator of ``slot``: independent streams per (seed, slot)."""
    state = np.random.SeedSequence([seed, slot]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class MetaTrainer:
    """Meta-trains ``rule`` on tasks sampled from ``family``'s training split (or several families').

    Each meta-step advances ``tasks_per_step`` inner runs by one truncation of ``unroll_steps``
    inner steps; a run that reaches its end (``run_steps`` steps, or with ``min_run_steps`` a
    length drawn log-uniformly from [``min_run_steps``, ``run_steps``] per task, which staggers the
    runs' resets) is replaced by a freshly sampled task. The meta-gradient (from ``estimator``,
    truncated BPTT by default) is clipped to ``gradient_clipping`` in global norm and applied with
    Adam(``meta_lr``); ``meta_lr_scales`` maps name prefixes of meta-parameters to multipliers of
    ``meta_lr`` (the longest matching prefix wins), e.g. ``{"head": 0.1}`` to move an LSTM's output
    layer ten times slower than the rest. A step whose loss or meta-gradient is not finite is skipped (nothing
    applied, every run replaced) and counted in ``skipped_steps``.

    The recipe options: ``family`` may be a list of families, each with its own estimator
    (``estimator`` a list of the same length, or one shared by all); slot ``s`` draws its tasks
    from family ``s % len(family)``, so ``tasks_per_step`` must be a multiple of the number of
    families, and the meta-gradient weighs every family alike. ``meta_optimizer`` names the outer
    optimizer (:data:`META_OPTIMIZERS`, Adam by default) and ``meta_optimizer_options`` its other
    arguments (e.g. ``{"weight_decay": 0.01}``). ``phases`` (:class:`Phase`) train named parts of
    the rule in turn; at each phase change every run restarts (the perturbed meta-parameters
    change). ``initial_offset`` > 0 shortens each slot's first run by an offset drawn uniformly
    from ``[0, initial_offset)`` (at least one step is left), so slots do not restart in lockstep.

    ``sync_runs=True`` trades that staggering for speed: all slots form one *cohort* that shares
    its length (and, for the first cohort, its offset) and restarts together, so the runs'
    rule states agree in their step counts and budgets and their unrolls share one vmapped call
    (runs of different lengths cannot: the state's counters are Python numbers). A run that
    diverges is replaced by a fresh task that ends with its cohort. Families whose estimators are
    equal are estimated in one call.

    With a ``communicator`` of several processes, each process runs the slots
    ``rank, rank + world_size, ...`` and the meta-gradient rows of all slots are exchanged, so
    every process applies the same update (see :mod:`metaoptimizer.meta.distributed`).
    """

    def __init__(
        self,
        rule: UpdateRule,
        family: TaskFamily | Sequence[TaskFamily],
        *,
        meta_lr: float = 1e-3,
        unroll_steps: int = 20,
        run_steps: int = 200,
        gradient_clipping: float | None = 1.0,
        tasks_per_step: int = 1,
        meta_objective: str = "train_loss",
        second_order: bool = False,
        seed: int = 0,
        estimator: GradientEstimator | Sequence[GradientEstimator] | None = None,
        min_run_steps: int | None = None,
        communicator: Communicator | None = None,
        meta_lr_scales: Mapping[str, float] | None = None,
        meta_optimizer: str = "adam",
        meta_optimizer_options: Mapping[str, Any] | None = None,
        phases: Sequence[Phase] | None = None,
        initial_offset: int = 0,
        sync_runs: bool = False,
    ) -> None:
        check_positive("meta_lr", meta_lr)
        check_positive("unroll_steps", unroll_steps, integer=True)
        check_positive("run_steps", run_steps, integer=True)
        check_positive("tasks_per_step", tasks_per_step, integer=True)
        check_positive("seed", seed, integer=True, allow_zero=True)
        if gradient_clipping is not None:
            check_positive("gradient_clipping", gradient_clipping)
        if meta_objective not in META_OBJECTIVES:
            raise ValueError(f"meta_objective={meta_objective!r} is not supported; accepted values: {META_OBJECTIVES}")
        if min_run_steps is not None:
            check_positive("min_run_steps", min_run_steps, integer=True)
            if min_run_steps > run_steps:
                raise ValueError(f"min_run_steps ({min_run_steps}) must be <= run_steps ({run_steps})")
        check_positive("initial_offset", initial_offset, integer=True, allow_zero=True)
        if not isinstance(sync_runs, bool):
            raise ValueError(f"sync_runs must be True or False, got {sync_runs!r}")
        if not meta_parameters(rule):
            raise ValueError(f"rule {type(rule).__name__} has no trainable meta-parameters: there is nothing to meta-train")
        families = [family] if isinstance(family, TaskFamily) else list(family)
        if not families or not all(isinstance(f, TaskFamily) for f in families):
            raise ValueError(f"family must be a TaskFamily or a non-empty list of them, got {family!r}")
        if tasks_per_step % len(families):
            raise ValueError(
                f"tasks_per_step ({tasks_per_step}) must be a multiple of the number of families ({len(families)}) "
                "so that every family gets the same number of runs"
            )
        default = TruncatedBPTT(meta_objective, second_order)
        estimators = [estimator or default] * len(families) if not isinstance(estimator, Sequence) else list(estimator)
        if len(estimators) != len(families):
            raise ValueError(f"got {len(estimators)} estimators for {len(families)} families; give one per family")
        if phases is not None:
            phases = list(phases)
            if not phases or not all(isinstance(phase, Phase) for phase in phases):
                raise ValueError(f"phases must be a non-empty list of Phase, got {phases!r}")
            for phase in phases:
                phase.check(rule)
        self.communicator = communicator or SingleProcess()
        if tasks_per_step < self.communicator.world_size:
            raise ValueError(
                f"tasks_per_step ({tasks_per_step}) must be >= the number of processes "
                f"({self.communicator.world_size}) so that every process runs at least one task"
            )
        self.rule = rule
        self.families = families
        self.family = families[0]
        self.unroll_steps = unroll_steps
        self.run_steps = run_steps
        self.min_run_steps = min_run_steps
        self.gradient_clipping = gradient_clipping
        self.tasks_per_step = tasks_per_step
        self.seed = seed
        self.estimators = estimators
        self.estimator = estimators[0]
        self.phases = phases
        self.phase = 0
        self.initial_offset = initial_offset
        if phases is not None:
            self._initialise_phase(phases[0])
        self.sync_runs = sync_runs
        self.cohort: dict[str, int] = {}
        self.cohort_generator = cohort_generator(seed)
        self._apply_phase()
        self.meta_optimizer = make_meta_optimizer(
            meta_optimizer, meta_parameter_groups(rule, meta_lr, meta_lr_scales or {}), meta_optimizer_options or {}
        )
        self.slots = list(range(self.communicator.rank, tasks_per_step, self.communicator.world_size))
        self.steps = 0
        self.skipped_steps = 0
        self.inner_steps = 0
        if sync_runs:
            self._new_cohort(first=True)
        self.runs = [self._new_run(slot, slot_generator(seed, slot), first=True) for slot in self.slots]

    def _sample_run_steps(self, generator: torch.Generator) -> int:
        """A run's length (its budget): ``run_steps``, or log-uniform in [``min_run_steps``, ``run_steps``]."""
        if self.min_run_steps is None:
            return self.run_steps
        low, high = math.log(self.min_run_steps), math.log(self.run_steps)
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        return min(self.run_steps, max(self.min_run_steps, round(math.exp(low + u * (high - low)))))

    def family_of(self, slot: int) -> TaskFamily:
        """The family that ``slot`` draws its tasks from."""
        return self.families[slot % len(self.families)]

    def _new_run(self, slot: int, generator: torch.Generator, first: bool = False) -> TaskRun:
        """A fresh task for ``slot``, drawn with the slot's generator (``first``: the slot's
        first run, which gets the random initial offset)."""
        task_index = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        seed = split_seed(TRAIN, task_index)
        task = self.family_of(slot).sample(seed)
        if self.sync_runs:
            num_steps, offset = self.cohort["num_steps"], self.cohort["offset"] + self.cohort["steps_done"]
        else:
            num_steps = self._sample_run_steps(generator)
            offset = self._sample_offset(num_steps, generator) if first else 0
        return TaskRun.start(
            task, task_index, seed, task.init_params(seed), self.rule, num_steps,
            slot=slot, generator=generator, offset=offset,
        )

    def _sample_offset(self, num_steps: int, generator: torch.Generator) -> int:
        if not self.initial_offset:
            return 0
        return min(num_steps - 1, int(torch.randint(0, self.initial_offset, (1,), generator=generator)))

    def _new_cohort(self, first: bool = False) -> None:
        """Draw the length (and for the first cohort the offset) that all runs share next."""
        num_steps = self._sample_run_steps(self.cohort_generator)
        offset = self._sample_offset(num_steps, self.cohort_generator) if first else 0
        self.cohort = {"num_steps": num_steps, "offset": offset, "steps_done": 0}

    def _replace_runs(self, skipped: bool) -> None:
        """New tasks for finished runs (for all after a skipped step: their parameters may hold
        non-finite values); with ``sync_runs`` the cohort advances and restarts as a whole."""
        if not self.sync_runs:
            self.runs = [
                self._new_run(run.slot, run_generator(run)) if skipped or run.finished else run for run in self.runs
            ]
            return
        cohort = self.cohort
        # Every run of the cohort (replacements included) stands at the same point of its length.
        cohort["steps_done"] = max(run.offset + run.steps_done for run in self.runs) - cohort["offset"]
        if skipped or cohort["steps_done"] >= cohort["num_steps"] - cohort["offset"]:
            self._new_cohort()
            self.runs = [self._new_run(run.slot, run_generator(run)) for run in self.runs]
        else:
            self.runs = [self._new_run(run.slot, run_generator(run)) if run.finished else run for run in self.runs]

    # -- phases ----------------------------------------------------------------------------------
    def _phase_at(self, iteration: int) -> int:
        """Index of the phase that meta-step ``iteration`` (0-based) belongs to."""
        if self.phases is None:
            return 0
        end = 0
        for index, phase in enumerate(self.phases):
            end += phase.steps
            if iteration < end:
                return index
        raise ValueError(f"meta-step {iteration + 1} is past the end of the phases ({end} meta-steps in all)")

    def _initialise_phase(self, phase: Phase) -> None:
        """Fill the meta-parameters that ``phase.init`` names (when the phase starts, never on resume)."""
        named = dict(self.rule.named_parameters())
        with torch.no_grad():
            for name, value in phase.init.items():
                named[name].fill_(value)

    def _apply_phase(self) -> None:
        """Mark the current phase's meta-parameters trainable (requires_grad) and the others frozen."""
        if self.phases is None:
            return
        phase = self.phases[self.phase]
        for name, param in self.rule.named_parameters():
            param.requires_grad_(phase.trains(name))

    def _enter_phase(self) -> None:
        """Switch phase when the coming meta-step starts a new one; every run restarts then."""
        index = self._phase_at(self.steps + self.skipped_steps)
        if index == self.phase:
            return
        self.phase = index
        self._initialise_phase(self.phases[index])
        self._apply_phase()
        if self.sync_runs:
            self._new_cohort()
        self.runs = [self._new_run(run.slot, run_generator(run)) for run in self.runs]

    def _estimate_runs(self) -> RunEstimates:
        """Each family's runs through its own estimator (one call for families with equal
        estimators); rows in the order of ``self.runs``."""
        groups: list[tuple[GradientEstimator, list[int]]] = []
        for index, run in enumerate(self.runs):
            estimator = self.estimators[run.slot % len(self.families)]
            group = next((g for g in groups if g[0] == estimator), None)
            if group is None:
                groups.append((estimator, [index]))
            else:
                group[1].append(index)
        if len(groups) == 1:
            return groups[0][0].estimate_runs(self.rule, self.runs, self.unroll_steps)
        rows: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(self.runs)
        for estimator, indices in groups:
            part = estimator.estimate_runs(self.rule, [self.runs[i] for i in indices], self.unroll_steps)
            for k, index in enumerate(indices):
                rows[index] = (part.grads[k], part.meta_losses[k], part.inner_steps[k])
        grads, losses, inner = zip(*rows, strict=True)
        return RunEstimates(torch.stack(grads), torch.stack(losses), torch.stack(inner))

    def _restore_run(self, saved: dict[str, Any]) -> TaskRun:
        task_index = saved["task_index"]
        seed = split_seed(TRAIN, task_index)
        task = self.family_of(saved["slot"]).sample(seed)
        generator = torch.Generator()
        generator.set_state(saved["generator"])
        if "params" not in saved:  # saved before its first step (_saved_run): started again as _new_run did
            return TaskRun.start(task, task_index, seed, task.init_params(seed), self.rule, saved["num_steps"],
                                 slot=saved["slot"], generator=generator, offset=saved["offset"])
        return TaskRun(
            task=task,
            task_index=task_index,
            params=saved["params"],
            state=OptimizerState.from_dict(saved["state"]),
            train_batches=ReplayableBatches(task.train_batches, seed, saved["train_drawn"]),
            valid_batches=ReplayableBatches(task.valid_batches, seed, saved["valid_drawn"]),
            steps_done=saved["steps_done"],
            num_steps=saved["num_steps"],
            slot=saved["slot"],
            generator=generator,
            estimator_state=self.estimators[saved["slot"] % len(self.families)].restore_run_state(
                saved["estimator_state"]),
            diverged=saved["diverged"],
            offset=saved.get("offset", 0),
        )

    def step(self) -> MetaOptTrainResult:
        """One meta-step: estimate, clip, apply (or skip when non-finite), replace finished runs."""
        self._enter_phase()
        local = self._estimate_runs()
        rows = gather_slot_rows(local, self.slots, self.tasks_per_step, self.communicator)
        estimate = rows.mean(self.rule)
        self.inner_steps += estimate.inner_steps
        result = apply_estimate(
            self.meta_optimizer, list(meta_parameters(self.rule).values()), estimate, self.gradient_clipping,
            self.steps, self.skipped_steps,
        )
        self.steps, self.skipped_steps = result.steps, result.skipped_total
        self._replace_runs(result.skipped)
        return result

    def train(self, num_steps: int, callback: Callable[[MetaOptTrainResult], None] | None = None) -> list[MetaOptTrainResult]:
        """Run ``num_steps`` meta-steps, calling ``callback`` after each."""
        check_positive("num_steps", num_steps, integer=True)
        results = []
        for _ in range(num_steps):
            result = self.step()
            results.append(result)
            if callback is not None:
                callback(result)
        return results

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: rule, meta-optimizer, counters and every slot's run.

        With several processes this is a collective call: the runs of all processes are gathered,
        so every process returns the same, process-count-independent dict.
        """
        local = [_saved_run(run) for run in self.runs]
        gathered = self.communicator.all_gather_object(local)
        return {
            "rule": self.rule.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "inner_steps": self.inner_steps,
            "phase": self.phase,
            "cohort": dict(self.cohort),
            "cohort_generator": self.cohort_generator.get_state(),
            "runs": sorted((run for part in gathered for run in part), key=lambda run: run["slot"]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (from any number of processes) into this trainer's slots.

        The trainer keeps copies: it never shares tensors with ``state``.
        """
        state = _renamed_legacy_keys(copy.deepcopy(state))
        slots = [run["slot"] for run in state["runs"]]
        if slots != list(range(self.tasks_per_step)):
            raise ValueError(
                f"the state holds runs for slots {slots}, but this trainer has tasks_per_step={self.tasks_per_step}"
            )
        self.rule.load_state_dict(state["rule"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.steps = state["steps"]
        self.skipped_steps = state["skipped_steps"]
        self.inner_steps = state["inner_steps"]
        self.phase = state.get("phase", 0)
        self.cohort = dict(state.get("cohort", {}))
        if "cohort_generator" in state:
            self.cohort_generator.set_state(state["cohort_generator"])
        self._apply_phase()
        self.runs = [self._restore_run(state["runs"][slot]) for slot in self.slots]


def _saved_run(run: TaskRun) -> dict[str, Any]:
    """``run`` in checkpoint form. A run that has not taken a step is saved without its parameters
    and rule state (they are its task's initial parameters and the rule's fresh state, rebuilt on
    restore), so a checkpoint taken when a synchronised cohort restarts holds no per-run tensors:
    a large rule's state (an LSTM's, per coordinate and particle) is not written at all."""
    saved = {
        "slot": run.slot,
        "task_index": run.task_index,
        "train_drawn": run.train_batches.drawn,
        "valid_drawn": run.valid_batches.drawn,
        "steps_done": run.steps_done,
        "num_steps": run.num_steps,
        "generator": run_generator(run).get_state(),
        "estimator_state": {} if run.estimator_state is None else run.estimator_state.to_dict(),
        "diverged": run.diverged,
        "offset": run.offset,
    }
    if run.steps_done or run.estimator_state is not None:
        saved["params"], saved["state"] = run.params, run.state.to_dict()
    return saved


def _renamed_legacy_keys(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the run length under its current key: checkpoints written before the rename
    hold it as ``"horizon"`` in every run and in the cohort."""
    for table in (*state["runs"], state.get("cohort", {})):
        if "horizon" in table:
            table["num_steps"] = table.pop("horizon")
    return state
