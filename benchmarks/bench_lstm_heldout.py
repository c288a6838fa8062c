"""Issue 16 item 5: learned optimizers on digits MLPs as a user writes them, outside the shipped
LSTM's meta-training family, against learning-rate-tuned Adam.

The tasks (:class:`UserDigitsMLPFamily`): scikit-learn's digits with the pixels divided by 16 (in
[0, 1], as users commonly feed them; the ``digits_mlp`` family standardises its inputs to mean 0
and standard deviation 1), ``Linear(64, width) -> activation -> Linear(width, 10)`` at torch's
default initialisation (width 32, 64 or 128, drawn per task seed), cross-entropy, a seeded 80/20
split of the 1,797 images. The suite (:func:`outside_family_suite`): activations sigmoid, tanh and
ELU x batch sizes 32, 64 and 128 x 2 held-out task seeds = 18 task-seeds, 200 steps each, every
optimizer told the budget. ``--inputs standardised`` runs the same tasks on inputs standardised
as the family does, to separate the input scale from the rest.

Adam's learning rate is tuned per task-seed on the default grid (1e-4 .. 0.32, 2 per decade); the
speedup is tuned Adam's steps to its best smoothed loss over the optimizer's steps to that loss
(:mod:`metaoptimizer.evaluate.metrics`; capped at Adam's steps / 200 and flagged "never" when the
optimizer does not get there). Printed per task-seed with both final smoothed training losses,
then the median speedup, the number of task-seeds that reach the target and the final-loss ratios.
``--step-scales 0.5,1.4`` also runs each optimizer with its updates multiplied by those factors,
to tell a miss of the step size (some factor reaches) from a miss of the update itself (none does).

    python benchmarks/bench_lstm_heldout.py [--optimizer lstm-digits-mlp] [--optimizer runs/x/snapshots/step_000100.pt]
        [--inputs unit|standardised] [--seeds 1] [--json FILE] [--step-scales 0.5,0.7,1.4]
        [--select runs/lstm_recipe --config configs/lstm_recipe.toml]

An optimizer is anything ``metaopt eval --optimizer`` takes (a pretrained name or a saved
``MetaOptimizer`` file). ``--select RUN`` first scores every snapshot of a meta-training run
(``RUN/snapshots/*.pt``) on meta-validation tasks: held-out tasks 0-1 of each family of
``--config`` (``split='heldout'`` seeds, which meta-training never samples), without augmentation,
200 steps, against tuned Adam; the snapshot with the best median speedup there is then run on the
outside-family suite (which never takes part in the choice). One thread,
seeded: the figures repeat exactly on one machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaoptimizer._validation import check_choice, check_positive
from metaoptimizer.evaluate.baselines import default_baselines
from metaoptimizer.evaluate.loading import load_optimizer
from metaoptimizer.evaluate.runner import SuiteResult, run_suite
from metaoptimizer.evaluate.suites import Suite, SuiteEntry
from metaoptimizer.meta.loop import TrainingConfig
from metaoptimizer.rules import UpdateRule
from metaoptimizer.rules.combine import chain
from metaoptimizer.rules.transforms import scale
from metaoptimizer.tasks import make_family
from metaoptimizer.tasks.base import HELDOUT, ModuleTask, TaskFamily
from metaoptimizer.tasks.digits import ACTIVATIONS, load_digits_tensors, standardised_split
from metaoptimizer.tasks.sampling import ARCHITECTURE_STREAM, DATA_STREAM, pick, task_rng

FAMILY = "user_digits_mlp"
INPUTS = ("unit", "standardised")
WIDTHS = (32, 64, 128)
ACTIVATION_NAMES = ("sigmoid", "tanh", "elu")
BATCH_SIZES = (32, 64, 128)
STEPS = 200
VALID_FRACTION = 0.2


class UserDigitsMLPFamily(TaskFamily):
    """One-hidden-layer MLPs on the digits as a user builds them: ``inputs='unit'`` feeds pixels / 16,
    ``'standardised'`` standardises them as the ``digits_mlp`` family does; torch's default
    initialisation; a task seed draws the width from :data:`WIDTHS` and the 80/20 split."""

    name = FAMILY

    def __init__(self, *, activation: str, batch_size: int, inputs: str = "unit") -> None:
        check_choice("activation", activation, tuple(ACTIVATIONS))
        check_positive("batch_size", batch_size, integer=True)
        check_choice("inputs", inputs, INPUTS)
        self.activation, self.batch_size, self.inputs = activation, batch_size, inputs

    def sample(self, seed: int) -> ModuleTask:
        width = pick(task_rng(seed, ARCHITECTURE_STREAM), WIDTHS)
        images, labels = load_digits_tensors()
        rows = torch.from_numpy(task_rng(seed, DATA_STREAM).permutation(len(images)))
        x, y = images[rows].reshape(len(rows), -1), labels[rows]
        n_valid = round(VALID_FRACTION * len(rows))
        if self.inputs == "standardised":
            train, valid = standardised_split(x, y, n_valid)
        else:
            x = x / 16.0
            train, valid = (x[:-n_valid], y[:-n_valid]), (x[-n_valid:], y[-n_valid:])
        activation = ACTIVATIONS[self.activation]
        return ModuleTask(
            name=f"{FAMILY}[{width},{self.activation},batch={self.batch_size},{self.inputs}]:seed={seed}",
            model_factory=lambda: nn.Sequential(nn.Linear(64, width), activation(), nn.Linear(width, 10)),
            train_data=train, valid_data=valid, batch_size=self.batch_size,
        )


def build_family(name: str, **options: Any) -> TaskFamily:
    """``run_suite``'s family factory: this benchmark's family by its name, the library's otherwise."""
    return UserDigitsMLPFamily(**options) if name == FAMILY else make_family(name, **options)


def outside_family_suite(
    *, inputs: str = "unit", activations: tuple[str, ...] = ACTIVATION_NAMES,
    batch_sizes: tuple[int, ...] = BATCH_SIZES, num_tasks: int = 2, steps: int = STEPS, seeds: tuple[int, ...] = (0,),
) -> Suite:
    """One entry per activation and batch size, ``num_tasks`` held-out task seeds each."""
    entries = tuple(
        SuiteEntry(f"{activation}_batch{batch}", FAMILY, tuple(range(num_tasks)), steps, seeds,
                   {"activation": activation, "batch_size": batch, "inputs": inputs}, group="outside family")
        for activation in activations for batch in batch_sizes
    )
    return Suite("lstm_outside_family", f"user-style digits MLPs ({inputs} inputs, default init), activations "
                 f"{list(activations)}, batches {list(batch_sizes)}, {steps} steps", entries)


def validation_suite(config: TrainingConfig, *, num_tasks: int = 2, steps: int = STEPS) -> Suite:
    """Held-out tasks ``0 .. num_tasks - 1`` of every family of ``config`` (seeds meta-training
    never samples), unaugmented."""
    entries = []
    for options in config.family_entries():
        options = {k: v for k, v in options.items() if k not in ("augment", "estimator")}
        name = options.pop("name")
        entries.append(SuiteEntry(name, name, tuple(range(num_tasks)), steps, (0,), options, split=HELDOUT,
                                  group="meta-validation"))
    return Suite("lstm_meta_validation", f"held-out tasks of the meta-training families, {steps} steps",
                 tuple(entries))


def select_snapshot(
    run: Path, config: TrainingConfig, adam: list, *, num_tasks: int = 2, steps: int = STEPS
) -> tuple[str, Path]:
    """The snapshot of ``run`` with the best median speedup over tuned Adam on :func:`validation_suite`
    (ties: the later snapshot)."""
    snapshots = sorted((run / "snapshots").glob("*.pt"))
    if not snapshots:
        raise SystemExit(f"no snapshots in {run / 'snapshots'}")
    rules = {path.stem: load_optimizer(str(path)) for path in snapshots}
    result = run_suite(validation_suite(config, num_tasks=num_tasks, steps=steps), {name: (lambda rule=rule: rule) for name, rule in rules.items()},
                       baselines=adam)
    medians = {name: result.headline(name)["median"] for name in rules}
    for name in rules:
        print(f"meta-validation {result.headline_line(name)}")
    best = max(medians, key=lambda name: (medians[name], name))
    print(f"chosen on meta-validation: {best} (median speedup {medians[best]:.3f})")
    return best, run / "snapshots" / f"{best}.pt"


def step_factors(text: str) -> tuple[float, ...]:
    """``"0.5,1.4"`` -> ``(0.5, 1.4)``; anything but positive finite numbers is refused."""
    try:
        factors = tuple(float(f) for f in text.split(",") if f.strip())
        if not factors:
            raise ValueError("no factor given")
        for factor in factors:
            check_positive("a step scale", factor)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"takes positive finite factors separated by commas, got {text!r} ({error})"
        ) from error
    return factors


def with_step_scales(rules: dict[str, UpdateRule], factors: tuple[float, ...]) -> dict[str, UpdateRule]:
    """``rules`` plus, for each factor, each rule with its updates multiplied by it (``"name x0.5"``)."""
    scaled = {f"{name} x{factor:g}": chain(rule, scale(factor)) for name, rule in rules.items() for factor in factors}
    return {**rules, **scaled}


def rows(result: SuiteResult, name: str) -> list[dict[str, Any]]:
    """One row per task-seed: the comparison of ``name`` with tuned Adam."""
    table = []
    for task in result.tasks:
        comparison, adam = task.comparisons[name], task.baselines["adam"]
        table.append({
            "entry": task.entry.label, "task": task.index, "task_name": task.task_name, "adam_lr": adam.best_lr,
            "adam_steps": comparison.speedup.baseline_steps, "steps": comparison.speedup.rule_steps,
            "speedup": comparison.speedup.value, "reached": comparison.speedup.reached,
            "final_loss": comparison.final_train_loss, "adam_final_loss": task.final_loss("adam", "train"),
            "final_loss_ratio": comparison.train_loss_ratio,
        })
    return table


def report(name: str, table: list[dict[str, Any]], result: SuiteResult) -> list[str]:
    """The per-task-seed table and the summary line of optimizer ``name``."""
    lines = [name, f"{'task-seed':<22}{'width':>6}{'adam lr':>9}{'adam steps':>11}{'steps':>7}{'speedup':>9}"
                   f"{'final loss':>12}{'adam final':>12}{'ratio':>7}"]
    for r in table:
        steps = str(r["steps"]) if r["reached"] else "never"
        width = r["task_name"].split("[")[1].split(",")[0]
        lines.append(f"{r['entry'] + ' #' + str(r['task']):<22}{width:>6}{r['adam_lr']:>9.3g}{r['adam_steps']:>11}"
                     f"{steps:>7}{r['speedup']:>9.3f}{r['final_loss']:>12.4f}{r['adam_final_loss']:>12.4f}"
                     f"{r['final_loss_ratio']:>7.2f}")
    h = result.headline(name)
    ratios = sorted(r["final_loss_ratio"] for r in table)
    lines.append(f"median speedup {h['median']:.3f} (IQM {h['iqm']:.3f}); target reached on {h['reached']}/"
                 f"{h['tasks']} task-seeds; final loss / tuned Adam's: median {h['final_train_loss_ratio_median']:.2f}, "
                 f"range {ratios[0]:.2f}..{ratios[-1]:.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", action="append", help="Pretrained name or MetaOptimizer file (repeatable).")
    parser.add_argument("--inputs", default="unit", choices=INPUTS)
    parser.add_argument("--seeds", type=int, default=1, help="Run seeds per task-seed (default 1).")
    parser.add_argument("--json", default=None, help="Write the per-task-seed rows here.")
    parser.add_argument("--select", type=Path, default=None, help="A meta-training run whose snapshots to choose from.")
    parser.add_argument("--config", type=Path, default=None, help="The run's config (its families validate).")
    parser.add_argument("--step-scales", type=step_factors, default=(), help="Comma-separated factors: also run "
                        "each optimizer with its updates multiplied by each (e.g. 0.5,0.7,1.4).")
    args = parser.parse_args()
    if (args.select is None) != (args.config is None):
        parser.error("--select and --config go together")
    torch.set_num_threads(1)
    adam = [b for b in default_baselines() if b.name == "adam"]
    specs = list(args.optimizer or ([] if args.select else ["lstm-digits-mlp"]))
    if args.select is not None:
        specs.append(str(select_snapshot(args.select, TrainingConfig.from_toml(args.config), adam)[1]))
    rules = with_step_scales({(Path(s).stem if Path(s).is_file() else s): load_optimizer(s) for s in specs},
                             args.step_scales)
    suite = outside_family_suite(inputs=args.inputs, seeds=tuple(range(args.seeds)))
    started = time.perf_counter()
    result = run_suite(suite, {name: (lambda rule=rule: rule) for name, rule in rules.items()}, baselines=adam,
                       family_factory=build_family)
    print(f"{suite.description}; {time.perf_counter() - started:.0f} s, one thread")
    tables = {name: rows(result, name) for name in rules}
    for name, table in tables.items():
        print("\n".join(["", *report(name, table, result)]))
    if args.json:
        summary = {name: result.headline(name) for name in rules}
        Path(args.json).write_text(json.dumps({"rows": tables, "headline": summary}, indent=1, default=float))


if __name__ == "__main__":
    main()
