"""Fault-tolerant meta-training: periodic atomic checkpoints, exact resume, CSV/TensorBoard logs.

:func:`run_meta_training` drives a :class:`~metaoptimizer.meta.trainer.MetaTrainer` and every
``checkpoint_every`` steps writes ``checkpoint.pt`` atomically (a temporary file renamed over the
old one, :func:`metaoptimizer.checkpoint.save_checkpoint`), so a kill at any moment leaves the
previous checkpoint or the new one, never a broken file. A checkpoint holds the meta-parameters,
the meta-optimizer state, every inner run (parameters, rule state, batches drawn, PES particles),
each slot's generator, the global torch / numpy / Python RNG states and the counters: resuming
from it continues bit for bit as if the run had never stopped (on CPU).

:class:`TrainingConfig` describes a run in a TOML file and :func:`build_trainer` builds its rule,
task family and estimator; ``metaopt meta-train`` (:mod:`metaoptimizer.cli.meta_train`) runs them,
on all processes under ``torchrun`` (see ``docs/distributed.md``).
"""

from __future__ import annotations

import csv
import os
import random
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaoptimizer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metaoptimizer.config import MetaOptimizerConfig, MetaOptTrainResult, build_rule, check_positive
from metaoptimizer.meta.distributed import Communicator
from metaoptimizer.meta.estimators import ESTIMATORS, make_estimator
from metaoptimizer.meta.trainer import META_OPTIMIZERS, MetaTrainer, Phase
from metaoptimizer.rules.base import RULES, from_spec
from metaoptimizer.tasks import make_family

CHECKPOINT_KIND = "meta_training"
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.csv"
TENSORBOARD_DIR = "tensorboard"
LOG_FIELDS = (
    "iteration", "steps", "skipped", "skipped_total", "meta_loss", "meta_grad_norm",
    "inner_steps", "inner_steps_per_s", "seconds",
)
TENSORBOARD_MODES = ("auto", True, False)


# -- random states --------------------------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    """The global torch (and CUDA), numpy and Python RNG states, in checkpoint-safe form."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` captured."""
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# -- logs -----------------------------------------------------------------------------------------


class _CsvLog:
    """Appends one row per meta-step; on resume keeps only the rows up to the checkpoint."""

    def __init__(self, path: Path, keep_until: int | None) -> None:
        self.path = path
        if keep_until is None or not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(LOG_FIELDS)
        else:
            with open(path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["iteration"]) <= keep_until]
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, LOG_FIELDS)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, path)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writerow(row)


def _check_tensorboard(mode: Any) -> None:
    if not (isinstance(mode, bool) or mode == "auto"):
        raise ValueError(f"tensorboard={mode!r} is not supported; accepted values: {TENSORBOARD_MODES}")


def _summary_writer(mode: bool | str, log_dir: Path, purge_step: int):
    """A TensorBoard writer when requested (``True``) or available (``'auto'``), else None."""
    if mode is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        if mode is True:
            raise ValueError("tensorboard=True needs the 'tensorboard' package (pip install tensorboard)") from error
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


# -- the loop -------------------------------------------------------------------------------------


def run_meta_training(
    trainer: MetaTrainer,
    out_dir: str | os.PathLike,
    num_steps: int,
    checkpoint_every: int,
    *,
    resume: bool = False,
    log_csv: bool = True,
    tensorboard: bool | str = "auto",
    config: dict[str, Any] | None = None,
    callback: Callable[[int, MetaOptTrainResult], None] | None = None,
) -> list[MetaOptTrainResult]:
    """Run ``trainer`` until ``num_steps`` meta-steps (applied or skipped) have been taken.

    Writes ``out_dir/checkpoint.pt`` every ``checkpoint_every`` steps and after the last one,
    ``out_dir/log.csv`` (one row per step) when ``log_csv``, and TensorBoard events in
    ``out_dir/tensorboard`` when ``tensorboard`` is True, or ``'auto'`` and the package is
    installed. ``config`` is stored in the checkpoint header. With ``resume`` the run continues
    from the checkpoint in ``out_dir`` (or starts afresh when there is none; a checkpoint written
    under another ``config`` is refused, see :func:`load_training_checkpoint`); without it an
    existing checkpoint is an error, never overwritten. ``callback(iteration, result)`` is called
    after each step. Returns the results of the steps run by this call. Only process 0 writes;
    every process must call this (checkpointing gathers the runs of all processes).
    """
    check_positive("num_steps", num_steps, integer=True)
    check_positive("checkpoint_every", checkpoint_every, integer=True)
    _check_tensorboard(tensorboard)
    out_dir = Path(out_dir)
    path = out_dir / CHECKPOINT_NAME
    writer = trainer.communicator.rank == 0
    iteration = 0
    if path.exists():
        if not resume:
            raise ValueError(f"{out_dir} already holds a checkpoint; pass resume=True to continue it or use another folder")
        iteration = load_training_checkpoint(trainer, path, config)
    if iteration > num_steps:
        raise ValueError(f"the checkpoint is at step {iteration}, past num_steps={num_steps}")
    log = board = None
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(f".{CHECKPOINT_NAME}.*.tmp"):  # left by a kill during atomic_save
            stale.unlink(missing_ok=True)
        log = _CsvLog(out_dir / LOG_NAME, iteration if iteration else None) if log_csv else None
        board = _summary_writer(tensorboard, out_dir / TENSORBOARD_DIR, iteration)
    results = []
    try:
        while iteration < num_steps:
            started = time.perf_counter()
            result = trainer.step()
            seconds = time.perf_counter() - started
            iteration += 1
            results.append(result)
            if log is not None:
                log.write(_row(iteration, result, seconds))
            if board is not None:
                for name in ("meta_loss", "meta_grad_norm"):
                    board.add_scalar(name, getattr(result, name), iteration)
                board.add_scalar("inner_steps_per_s", result.inner_steps / seconds, iteration)
            if iteration % checkpoint_every == 0 or iteration == num_steps:
                save_training_checkpoint(trainer, path, iteration, config, write=writer)
            if callback is not None:
                callback(iteration, result)
    finally:
        if board is not None:
            board.close()
    return results


def _row(iteration: int, result: MetaOptTrainResult, seconds: float) -> dict[str, Any]:
    return {
        "iteration": iteration,
        "steps": result.steps,
        "skipped": int(result.skipped),
        "skipped_total": result.skipped_total,
        "meta_loss": repr(result.meta_loss),
        "meta_grad_norm": repr(result.meta_grad_norm),
        "inner_steps": result.inner_steps,
        "inner_steps_per_s": f"{result.inner_steps / seconds:.6g}",
        "seconds": f"{seconds:.6g}",
    }


def save_training_checkpoint(
    trainer: MetaTrainer, path: str | os.PathLike, iteration: int, config: dict[str, Any] | None = None,
    *, write: bool = True,
) -> None:
    """Atomically write the trainer's full state, the RNG states and ``iteration`` to ``path``.

    Collective with several processes (the trainer's state gathers every run); only a process
    with ``write`` writes the file.
    """
    payload = {"iteration": iteration, "trainer": trainer.state_dict(), "rng": rng_states()}
    if write:
        save_checkpoint(path, kind=CHECKPOINT_KIND, payload=payload, config=config)


def load_training_checkpoint(
    trainer: MetaTrainer, path: str | os.PathLike, config: dict[str, Any] | None = None,
) -> int:
    """Restore ``trainer`` and the RNG states from ``path``; returns the iteration it was taken at.

    With ``config``, a checkpoint written under another config (apart from
    :data:`RESUMABLE_CHANGES`) is refused: its run would go on with settings it never had.
    """
    checkpoint = load_checkpoint(path, expected_kind=CHECKPOINT_KIND)
    changes = config_changes(checkpoint["config"], config) if config and checkpoint.get("config") else []
    if changes:
        raise CheckpointError(f"{path} was written under another config; resume it with the config (and "
                              "overrides) of the run that wrote it, or start a new run. Differences: "
                              + "; ".join(changes))
    trainer.load_state_dict(checkpoint["trainer"])
    set_rng_states(checkpoint["rng"])
    return int(checkpoint["iteration"])


# -- configuration files --------------------------------------------------------------------------


#: [optimizer] fields that describe the rule; a config with a [rule] section must not set them.
RULE_FIELDS = ("method", "hidden_size", "num_layers", "preconditioning", "coordinatewise", "preprocessing",
               "preprocess_p", "output_scale", "rule_options")
SECTIONS = ("optimizer", "rule", "family", "families", "training", "estimator", "meta_optimizer", "phases")
#: [training] keys renamed when the run length took the rule contract's word (num_steps): old -> new.
RENAMED_TRAINING_KEYS = {"horizon": "run_steps", "min_horizon": "min_run_steps"}
#: TrainingConfig fields that come from their own sections (the others are [training] keys).
STRUCTURED_FIELDS = {"optimizer", "family", "family_options", "estimator_options", "rule", "families",
                     "meta_optimizer", "meta_optimizer_options", "phases"}


@dataclass
class TrainingConfig:
    """A meta-training run as described by a TOML file.

    Sections: ``[optimizer]`` (:class:`~metaoptimizer.config.MetaOptimizerConfig` fields: the rule
    and meta_lr, unroll_steps, gradient_clipping, meta_objective, second_order, seed), ``[family]``
    (``name`` and the family's keyword arguments, ``augment`` among them, see
    :func:`~metaoptimizer.tasks.make_family`), ``[training]`` (the fields below) and
    ``[estimator]`` (options of :func:`~metaoptimizer.meta.estimators.make_estimator`).
    ``steps`` counts meta-steps; ``run_steps`` is the length of an inner run (the ``num_steps``
    budget its rule is told at ``init``), drawn log-uniformly from [``min_run_steps``,
    ``run_steps``] per run when ``min_run_steps`` is set (the former keys ``horizon`` and
    ``min_horizon`` are rejected with the new names). ``device`` (e.g. ``"cuda"``) holds the rule
    there and is passed to the family.

    The recipe's sections: ``[rule]`` gives the rule as a registered name and its constructor
    arguments (``name = "celo"``; member rules of a composite as nested tables, see
    :func:`rule_table_spec`; ``pretrained = "celo"`` starts the rule from a shipped optimizer's
    weights, one of :func:`metaoptimizer.pretrained.available`) instead of ``[optimizer]``'s method
    fields; ``[[families]]`` lists
    several families (each table as ``[family]``, plus an optional ``estimator`` table overriding
    ``[estimator]`` for that family: one estimator per family); ``[meta_optimizer]`` names the
    outer optimizer (``name`` in ``adam``, ``adamw``, ``sgd``; other keys are its arguments; the
    rate is ``meta_lr``); ``[[phases]]`` train parts of the rule in turn (``steps``, ``train``,
    ``freeze``, ``init``: see :class:`~metaoptimizer.meta.trainer.Phase`), covering at least
    ``steps`` meta-steps.
    """

    optimizer: MetaOptimizerConfig
    family: str | None = None
    family_options: dict[str, Any] = field(default_factory=dict)
    estimator: str = "tbptt"
    estimator_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    run_steps: int = 200
    min_run_steps: int | None = None
    initial_offset: int = 0
    sync_runs: bool = False
    tasks_per_step: int = 1
    meta_lr_scales: dict[str, float] = field(default_factory=dict)
    checkpoint_every: int = 50
    snapshot_every: int | None = None
    log_csv: bool = True
    tensorboard: bool | str = "auto"
    device: str | None = None
    rule: dict[str, Any] | None = None
    families: list[dict[str, Any]] = field(default_factory=list)
    meta_optimizer: str = "adam"
    meta_optimizer_options: dict[str, Any] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, MetaOptimizerConfig):
            raise TypeError(f"optimizer must be a MetaOptimizerConfig, got {type(self.optimizer).__name__}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r} is not supported; accepted values: {ESTIMATORS}")
        for name in ("steps", "run_steps", "tasks_per_step", "checkpoint_every"):
            check_positive(name, getattr(self, name), integer=True)
        check_positive("initial_offset", self.initial_offset, integer=True, allow_zero=True)
        if self.min_run_steps is not None:
            check_positive("min_run_steps", self.min_run_steps, integer=True)
        if self.snapshot_every is not None:
            check_positive("snapshot_every", self.snapshot_every, integer=True)
        if not isinstance(self.meta_lr_scales, dict):
            raise ValueError(f"meta_lr_scales must be a table of name prefix = multiplier, got {self.meta_lr_scales!r}")
        for prefix, scale in self.meta_lr_scales.items():
            check_positive(f"meta_lr_scales[{prefix!r}]", scale)
        if not isinstance(self.sync_runs, bool):
            raise ValueError(f"sync_runs must be true or false, got {self.sync_runs!r}")
        if not isinstance(self.log_csv, bool):
            raise ValueError(f"log_csv must be true or false, got {self.log_csv!r}")
        _check_tensorboard(self.tensorboard)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"device={self.device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from error
        if (self.family is None) == (not self.families):
            raise ValueError("give exactly one of [family] (one task family) and [[families]] (several)")
        for entry in self.families:
            if not isinstance(entry, dict) or "name" not in entry:
                raise ValueError(f"every [[families]] entry needs a name, got {entry!r}")
            if not isinstance(entry.get("estimator", {}), dict):
                raise ValueError(f"[[families]] estimator must be a table of estimator options, got {entry['estimator']!r}")
        if self.rule is not None:
            if not isinstance(self.rule, dict) or "name" not in self.rule:
                raise ValueError(f"[rule] needs the rule's registered name, e.g. name = \"celo\"; got {self.rule!r}")
            table, start = _pretrained_start(self.rule)
            rule_table_spec(table)
            if start is not None:
                from metaoptimizer import pretrained  # deferred: the package imports the facade, which imports meta

                if start not in pretrained.available():
                    raise ValueError(f"[rule] pretrained={start!r} is not a shipped optimizer; "
                                     f"accepted values: {pretrained.available()}")
        if self.meta_optimizer not in META_OPTIMIZERS:
            raise ValueError(
                f"meta_optimizer={self.meta_optimizer!r} is not supported; accepted values: {sorted(META_OPTIMIZERS)}"
            )
        phases = self.build_phases()
        if phases and sum(phase.steps for phase in phases) < self.steps:
            raise ValueError(
                f"the phases cover {sum(phase.steps for phase in phases)} meta-steps but the run has steps={self.steps}"
            )

    def build_phases(self) -> list[Phase]:
        try:
            return [Phase(**entry) for entry in self.phases]
        except TypeError as error:
            raise ValueError(f"bad [[phases]] entry ({error}); accepted keys: steps, train, freeze, init") from error

    def family_entries(self) -> list[dict[str, Any]]:
        """One ``{"name": ..., options...}`` table per family (the single ``[family]`` as a list of one)."""
        if self.families:
            return [dict(entry) for entry in self.families]
        return [{"name": self.family, **self.family_options}]

    @classmethod
    def from_toml(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainingConfig:
        """The run ``path`` describes, with ``overrides`` (see :func:`apply_overrides`) set."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise ValueError(f"no config file at {path}") from error
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path} is not valid TOML: {error}") from error
        return cls.from_dict(apply_overrides(data, overrides), source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainingConfig:
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ValueError(f"{source}: unknown sections {unknown}; accepted sections: {list(SECTIONS)}")
        family = dict(data.get("family", {}))
        if "name" not in family and (family or "families" not in data):
            raise ValueError(f"{source}: [family] needs a name, e.g. name = \"digits_mlp\"")
        training = dict(data.get("training", {}))
        renamed = sorted(set(training) & set(RENAMED_TRAINING_KEYS))
        if renamed:
            raise ValueError(f"{source}: [training] keys were renamed: " + ", ".join(
                f"{old} is now {RENAMED_TRAINING_KEYS[old]}" for old in renamed))
        accepted = {f.name for f in fields(cls)} - STRUCTURED_FIELDS
        unknown = sorted(set(training) - accepted)
        if unknown:
            raise ValueError(f"{source}: unknown [training] keys {unknown}; accepted keys: {sorted(accepted)}")
        optimizer = dict(data.get("optimizer", {}))
        if "rule" in data:
            clashes = sorted(set(optimizer) & set(RULE_FIELDS))
            if clashes:
                raise ValueError(f"{source}: [optimizer] keys {clashes} describe a rule, which [rule] already gives")
        meta_optimizer = dict(data.get("meta_optimizer", {"name": "adam"}))
        return cls(
            optimizer=MetaOptimizerConfig.from_dict(optimizer),
            family=family.pop("name", None),
            family_options=family,
            estimator_options=dict(data.get("estimator", {})),
            rule=data.get("rule"),
            families=list(data.get("families", [])),
            meta_optimizer=meta_optimizer.pop("name", "adam"),
            meta_optimizer_options=meta_optimizer,
            phases=list(data.get("phases", [])),
            **training,
        )

    def to_dict(self) -> dict[str, Any]:
        """The TOML layout back (stored in checkpoint headers)."""
        training = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in STRUCTURED_FIELDS}
        data: dict[str, Any] = {
            "optimizer": self.optimizer.to_dict(),
            "training": training,
            "estimator": dict(self.estimator_options),
            "meta_optimizer": {"name": self.meta_optimizer, **self.meta_optimizer_options},
        }
        if self.rule is not None:
            data["rule"] = dict(self.rule)
            for key in RULE_FIELDS:
                data["optimizer"].pop(key)
        if self.families:
            data["families"] = [dict(entry) for entry in self.families]
        else:
            data["family"] = {"name": self.family, **self.family_options}
        if self.phases:
            data["phases"] = [dict(entry) for entry in self.phases]
        return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` (a parsed config) with each ``SECTION.KEY=VALUE`` of ``overrides`` set.

    VALUE is written in TOML (``optimizer.meta_lr=3e-4``, ``training.estimator="pes"``,
    ``rule.pretrained="celo"``), so a run that differs from a config file in a few settings needs
    no copy of the file. Sections are the config's tables; entries of ``[[families]]`` and
    ``[[phases]]`` are set in the file.
    """
    data = {section: dict(table) if isinstance(table, dict) else table for section, table in data.items()}
    tables = [section for section in SECTIONS if section not in ("families", "phases")]
    for override in overrides:
        name, equals, raw = override.partition("=")
        section, dot, key = name.strip().partition(".")
        if not equals or not dot or not key or "." in key:
            raise ValueError(f"override {override!r} is not SECTION.KEY=VALUE (e.g. optimizer.meta_lr=3e-4)")
        if section not in tables:
            raise ValueError(f"override {override!r}: section {section!r} cannot be set; accepted sections: {tables}")
        try:
            value = tomllib.loads(f"value = {raw.strip()}")["value"]
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"override {override!r}: {raw.strip()!r} is not a TOML value "
                             "(quote strings: training.estimator=\"pes\")") from error
        data.setdefault(section, {})[key] = value
    return data


#: [training] keys a resumed run may change: how it is run and recorded, not what it computes.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "snapshot_every", "log_csv", "tensorboard", "device")


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the config a checkpoint was written with and ``current``, one line
    per setting, leaving out the [training] keys of :data:`RESUMABLE_CHANGES`."""

    def flat(data: dict[str, Any]) -> dict[str, Any]:
        settings = {}
        for section, table in data.items():
            if not isinstance(table, dict):  # [[families]], [[phases]]: compared whole
                settings[section] = table
                continue
            settings.update({f"{section}.{key}": value for key, value in table.items()
                             if not (section == "training" and key in RESUMABLE_CHANGES)})
        return settings

    before, after = flat(stored), flat(current)
    return [f"{name}: {before.get(name, '(unset)')!r} in the checkpoint, {after.get(name, '(unset)')!r} now"
            for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]


def rule_table_spec(table: dict[str, Any]) -> dict[str, Any]:
    """The :func:`~metaoptimizer.rules.base.to_spec` form of a TOML ``[rule]`` table.

    A rule table is the rule's registered ``name`` and its constructor arguments; an argument that
    is itself a table with a registered rule ``name`` (or a list of such tables) is a member rule,
    so a composite is written as nested tables::

        [rule]
        name = "named_chain"
        [rule.lstm]
        name = "lstm"
        training_fraction = true
        [rule.schedule]
        name = "scale_by_schedule"
        schedule = { schedule = "LearnedSchedule", arguments = { total_steps = 200 } }
    """
    arguments = dict(table)
    name = arguments.pop("name")
    if name not in RULES:
        raise ValueError(f"[rule] name {name!r} is not a registered rule; registered rules: {sorted(RULES)}")
    return {"rule": name, "hyperparameters": {key: _rule_argument(value) for key, value in arguments.items()}}


def _rule_argument(value: Any) -> Any:
    if isinstance(value, dict) and value.get("name") in RULES:
        return rule_table_spec(value)
    if isinstance(value, list):
        return [_rule_argument(item) for item in value]
    return value


def build_config_rule(config: TrainingConfig):
    """The rule of ``[rule]`` (see :func:`rule_table_spec`) or of ``[optimizer]``."""
    if config.rule is None:
        return build_rule(config.optimizer)
    table, start = _pretrained_start(config.rule)
    rule = from_spec(rule_table_spec(table))
    if start is not None:  # [rule] pretrained = "celo": start from a shipped optimizer's weights
        from metaoptimizer import pretrained

        source = pretrained.load(start).rule
        if type(source) is not type(rule):
            raise ValueError(f"[rule] pretrained={start!r} is a {type(source).__name__}, not the {type(rule).__name__} "
                             f"that [rule] name = {config.rule['name']!r} builds")
        rule.load_state_dict(source.state_dict())
    return rule


def _pretrained_start(table: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """A ``[rule]`` table without its ``pretrained`` key, and that key's value (None if absent)."""
    rest = dict(table)
    return rest, rest.pop("pretrained", None)


def build_trainer(config: TrainingConfig, communicator: Communicator | None = None) -> MetaTrainer:
    """The rule (seeded by ``optimizer.seed``, identical on every process), families, estimators and trainer."""
    opt = config.optimizer
    torch.manual_seed(opt.seed)
    rule = build_config_rule(config).to(config.device)
    families, estimators = [], []
    for entry in config.family_entries():
        options = dict(entry)
        name = options.pop("name")
        estimator_options = {**config.estimator_options, **options.pop("estimator", {})}
        if config.device is not None:
            options.setdefault("device", config.device)
        families.append(make_family(name, **options))
        estimators.append(make_estimator(
            config.estimator, meta_objective=opt.meta_objective, second_order=opt.second_order, **estimator_options,
        ))
    return MetaTrainer(
        rule,
        families,
        meta_lr=opt.meta_lr,
        unroll_steps=opt.unroll_steps,
        run_steps=config.run_steps,
        gradient_clipping=opt.gradient_clipping,
        tasks_per_step=config.tasks_per_step,
        meta_objective=opt.meta_objective,
        second_order=opt.second_order,
        seed=opt.seed,
        estimator=estimators,
        min_run_steps=config.min_run_steps,
        communicator=communicator,
        meta_lr_scales=config.meta_lr_scales,
        meta_optimizer=config.meta_optimizer,
        meta_optimizer_options=config.meta_optimizer_options,
        phases=config.build_phases() or None,
        initial_offset=config.initial_offset,
        sync_runs=config.sync_runs,
    )
