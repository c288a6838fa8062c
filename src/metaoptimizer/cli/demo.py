"""``metaopt demo``: the shipped optimizer's recipe, run small and shown whole.

Meta-trains the LSTM rule of ``lstm-digits-mlp`` with its recipe (the shipped config
``pretrained/lstm-digits-mlp.toml``, as ``metaopt pretrain`` does, :func:`metaoptimizer.pretrained.recipe`)
for a fixed number of meta-steps, scoring it on meta-validation tasks as it goes, then compares
the rule before and after meta-training beside learning-rate-tuned Adam on held-out tasks. The
budget is counted in meta-steps, not minutes, so what the demo ships follows from its options and
seed alone, not from the machine's load.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from matplotlib.figure import Figure

from metaoptimizer import pretrained
from metaoptimizer.cli._common import out_option, progress_display
from metaoptimizer.config import MetaOptTrainResult
from metaoptimizer.evaluate.baselines import default_baselines
from metaoptimizer.evaluate.report import write_report
from metaoptimizer.evaluate.runner import run_rule, run_suite
from metaoptimizer.evaluate.suites import heldout_suite
from metaoptimizer.meta.loop import build_trainer
from metaoptimizer.progress import Progress, ProgressCallback
from metaoptimizer.rules.base import UpdateRule
from metaoptimizer.tasks import make_family
from metaoptimizer.tasks.base import TRAIN, Task

__all__ = ["demo", "meta_validation_loss", "plot_meta_training", "run_demo"]

UNTRAINED, TRAINED = "lstm untrained", "lstm meta-trained"
RECIPE_NAME = "lstm-digits-mlp"
#: The shipped optimizer's meta-training run (family, run length, meta-steps, seed), read from its config.
RECIPE = pretrained.recipe(RECIPE_NAME)
LOG_FIELDS = ("step", "meta_loss", "meta_grad_norm", "skipped", "seconds")


def meta_validation_loss(rule: UpdateRule, tasks: list[Task], steps: int) -> float:
    """The meta-objective on whole runs: mean log training loss over ``steps`` updates from a
    fresh start, averaged over ``tasks`` (inf when a run diverges). ``rule`` is not changed."""
    per_task = []
    for task in tasks:
        curve = run_rule(copy.deepcopy(rule), task, steps=steps, seed=0)
        per_task.append(float(np.mean(np.log(curve.train_loss))))
    return float(np.mean(per_task))


def plot_meta_training(validation: list[tuple[int, float]], meta_losses: list[float], path: Path) -> Path:
    """Meta-validation loss against meta-steps (top) and the training meta-loss per step (bottom)."""
    fig = Figure(figsize=(6, 5))
    top, bottom = fig.subplots(2, sharex=True)
    steps, losses = zip(*validation, strict=True)
    top.plot(steps, losses, marker="o")
    top.set_ylabel("meta-validation loss\n(mean log train loss)")
    top.set_title("Meta-training the LSTM optimizer on digits MLPs")
    bottom.plot(range(1, len(meta_losses) + 1), meta_losses, alpha=0.4, label="meta-loss (one truncation)")
    window = min(len(meta_losses), RECIPE.run_steps // RECIPE.optimizer.unroll_steps)  # the truncations of one run
    smooth = np.convolve(meta_losses, np.ones(window) / window, mode="valid")
    bottom.plot(range(window, len(meta_losses) + 1), smooth, label=f"mean over one inner run ({window} truncations)")
    bottom.set_xlabel("meta-step")
    bottom.set_ylabel("training meta-loss")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def run_demo(
    out: str | Path, *, meta_steps: int = RECIPE.steps, validate_every: int = 20, validation_tasks: int = 3,
    tasks: int = 5, steps: int = RECIPE.run_steps, seed: int = RECIPE.optimizer.seed, seeds: tuple[int, ...] = (0, 1),
    progress: ProgressCallback | None = None,
) -> Path:
    """Meta-train for ``meta_steps``, validating every ``validate_every`` steps on
    ``validation_tasks`` training-split tasks (meta-training draws its tasks from 2**31 indices,
    so these are practically unseen); save the rule; compare it untrained and meta-trained with
    tuned Adam on ``tasks`` held-out tasks x ``seeds``, runs of ``steps`` steps. Returns the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    settings = replace(RECIPE, optimizer=replace(RECIPE.optimizer, seed=seed))
    trainer = build_trainer(settings)
    untrained = copy.deepcopy(trainer.rule)
    family = make_family(settings.family, **settings.family_options)
    validation_set = [family.task(index, TRAIN) for index in range(validation_tasks)]
    validation = [(0, meta_validation_loss(trainer.rule, validation_set, steps))]
    meta_losses: list[float] = []
    with (out / "meta_training.csv").open("w", newline="") as handle:
        log = csv.writer(handle)
        log.writerow(LOG_FIELDS)

        def after_step(result: MetaOptTrainResult) -> None:
            meta_losses.append(result.meta_loss)
            done = len(meta_losses)
            log.writerow([done, result.meta_loss, result.meta_grad_norm, int(result.skipped),
                          round(time.monotonic() - started, 3)])
            handle.flush()
            if done % validate_every == 0 or done == meta_steps:
                validation.append((done, meta_validation_loss(trainer.rule, validation_set, steps)))
            if progress is not None:
                status = f"meta-loss {result.meta_loss:.3f}  meta-validation {validation[-1][1]:.3f}"
                progress(Progress("meta-training", done, meta_steps, status))

        trainer.train(meta_steps, callback=after_step)
    meta_seconds = time.monotonic() - started
    meta = pretrained.trained_optimizer(trainer, settings)
    meta.save(out / "lstm_digits_mlp.pt")
    with (out / "meta_validation.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("meta_step", "meta_validation_loss"), *validation])
    plot_meta_training(validation, meta_losses, out / "meta_training.png")

    adam = [b for b in default_baselines() if b.name == "adam"]
    suite = heldout_suite(family=settings.family, num_tasks=tasks, steps=steps, seeds=seeds)
    result = run_suite(suite, {UNTRAINED: lambda: untrained, TRAINED: lambda: meta.rule}, baselines=adam,
                       progress=progress)
    summary = result.summary()
    speedups = {name: summary[name]["speedup"].median for name in (UNTRAINED, TRAINED)}
    files = write_report(
        result, out, title="metaoptimizer demo: the LSTM optimizer before and after meta-training, beside tuned Adam",
        extra={
            "meta_training": {
                "recipe": RECIPE_NAME, "config": settings.to_dict(), "seed": seed, "meta_steps": meta.meta_steps,
                "skipped_meta_steps": meta.skipped_meta_steps, "seconds": round(meta_seconds, 1), "meta_validation": validation, "log": "meta_training.csv",
                "plot": "meta_training.png", "checkpoint": "lstm_digits_mlp.pt",
            },
            "median_speedup": speedups,
        },
    )
    with files.markdown.open("a") as handle:
        handle.write(_meta_training_section(meta.meta_steps, meta.skipped_meta_steps, meta_seconds, validation,
                                            validation_tasks, speedups))
    return files.markdown


def _meta_training_section(
    applied: int, skipped: int, seconds: float, validation: list[tuple[int, float]], validation_tasks: int,
    speedups: dict[str, float],
) -> str:
    rows = "\n".join(f"| {step} | {loss:.4f} |" for step, loss in validation)
    fmt = lambda v: "nan" if math.isnan(v) else f"{v:.3f}"  # noqa: E731
    return (
        f"\n## Meta-training\n\n{applied} meta-steps ({skipped} skipped) in {seconds:.0f} s on the "
        f"{RECIPE.family} family, truncations of {RECIPE.optimizer.unroll_steps} steps over {RECIPE.run_steps}-step "
        f"inner runs. Median speedup over tuned Adam: {fmt(speedups[UNTRAINED])} untrained (the rule starts as "
        f"Adam under a warmup-cosine schedule), {fmt(speedups[TRAINED])} meta-trained: the difference, not the "
        "second figure alone, is meta-training's effect.\n\n"
        f"Meta-validation loss (mean log training loss over whole runs, {validation_tasks} training-split "
        f"tasks that meta-training never drew):\n\n| meta-step | meta-validation loss |\n|---|---|\n{rows}\n\n"
        "Log: `meta_training.csv`, `meta_validation.csv`; checkpoint: `lstm_digits_mlp.pt`.\n\n"
        "![meta-training](meta_training.png)\n"
    )


def demo(
    out: Annotated[Path, out_option("Folder for the checkpoint, report and plots.")] = Path("demo-output"),
    meta_steps: Annotated[int, typer.Option(
        min=1, help=f"Meta-training budget in meta-steps (the shipped checkpoint's recipe used {RECIPE.steps}).")
    ] = RECIPE.steps,
    validate_every: Annotated[int, typer.Option(min=1, help="Meta-steps between meta-validations.")] = 20,
    validation_tasks: Annotated[int, typer.Option(min=1, help="Tasks scored at each meta-validation.")] = 3,
    tasks: Annotated[int, typer.Option(min=1, help="Held-out tasks to compare on.")] = 5,
    steps: Annotated[int, typer.Option(min=1, help="Inner training steps per run.")] = RECIPE.run_steps,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the rule's initial weights and the task draws.")] = RECIPE.optimizer.seed,
    progress: Annotated[bool, typer.Option(help="Show progress (a bar on a terminal, lines in a log).")] = True,
) -> None:
    """Meta-train the LSTM optimizer on digits MLPs, then compare it, before and after, with tuned Adam."""
    with progress_display(progress) as report:
        path = run_demo(out, meta_steps=meta_steps, validate_every=validate_every, validation_tasks=validation_tasks,
                        tasks=tasks, steps=steps, seed=seed, progress=report)
    typer.echo(f"report: {path}")
