"""``metaopt meta-train``: meta-train a learned optimizer from a TOML file, with checkpoints,
``--resume`` and, with ``[training] snapshot_every``, the rule saved every so many meta-steps as a
``MetaOptimizer`` file (``snapshots/step_NNNNNN.pt``, step 0 included, for ``metaopt eval --optimizer``); under ``torchrun`` (``torchrun --nproc-per-node N -m metaoptimizer.cli meta-train
--config FILE``) the meta-batch is split over the processes (``docs/distributed.md``)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated

import typer

from metaoptimizer.checkpoint import CheckpointError
from metaoptimizer.cli._common import out_option, progress_display, usage_errors
from metaoptimizer.config import MetaOptTrainResult
from metaoptimizer.facade import MetaOptimizer
from metaoptimizer.meta.distributed import SingleProcess, communicator_from_environment, shutdown
from metaoptimizer.meta.loop import CHECKPOINT_NAME, TrainingConfig, build_trainer, run_meta_training
from metaoptimizer.progress import Progress
from metaoptimizer.rules.base import UpdateRule

__all__ = ["meta_train", "save_snapshot"]

SNAPSHOT_DIR = "snapshots"


def save_snapshot(rule: UpdateRule, path: Path) -> None:
    """``rule`` as a ``MetaOptimizer`` file (loadable by ``metaopt eval``), its meta-parameters all
    trainable in the file, as in any saved optimizer, whatever the current phase has frozen."""
    snapshot = copy.deepcopy(rule).requires_grad_(True)
    MetaOptimizer(None, rule=snapshot).save(path)


def meta_train(
    config: Annotated[Path, typer.Option(
        "--config", "-c", exists=True, dir_okay=False, help="TOML file describing the run (see configs/).")],
    out: Annotated[Path, out_option("Folder for checkpoint.pt and log.csv.")] = Path("runs/meta-train"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")] = False,
    steps: Annotated[int | None, typer.Option(min=1, help="Meta-steps in total (overrides [training] steps).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(
        min=1, help="Meta-steps between checkpoints (overrides [training] checkpoint_every).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress (a bar on a terminal, lines in a log).")] = True,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", metavar="SECTION.KEY=VALUE",
        help="Set one setting of the config (VALUE in TOML: --set optimizer.meta_lr=3e-4); repeatable. "
             "A resumed run needs the same settings as the run that wrote its checkpoint.")] = None,
) -> None:
    """Meta-train a learned optimizer from a TOML config, with checkpoints, logs and --resume."""
    with usage_errors("--config" if not overrides else "--config/--set"):
        settings = TrainingConfig.from_toml(config, overrides or ())
    total = steps if steps is not None else settings.steps
    every = checkpoint_every if checkpoint_every is not None else settings.checkpoint_every
    if (out / CHECKPOINT_NAME).exists() and not resume:
        raise typer.BadParameter(f"{out} already holds a checkpoint; pass --resume to continue it or use another "
                                 "folder", param_hint="--out")
    communicator = communicator_from_environment()
    try:
        with usage_errors("--config"):
            trainer = build_trainer(settings, communicator)
        with progress_display(progress and communicator.rank == 0) as report:

            def snapshot(iteration: int) -> None:
                if settings.snapshot_every and iteration % settings.snapshot_every == 0 and communicator.rank == 0:
                    save_snapshot(trainer.rule, out / SNAPSHOT_DIR / f"step_{iteration:06d}.pt")

            if not (out / CHECKPOINT_NAME).exists():
                snapshot(0)  # the rule the run starts from

            def on_step(iteration: int, result: MetaOptTrainResult) -> None:
                snapshot(iteration)
                if report is not None:
                    status = f"meta-loss {result.meta_loss:.4g}  skipped {result.skipped_total}"
                    report(Progress("meta-train", iteration, total, status))

            try:
                results = run_meta_training(
                    trainer, out, total, every, resume=resume, log_csv=settings.log_csv,
                    tensorboard=settings.tensorboard, config=settings.to_dict(), callback=on_step,
                )
            except CheckpointError as error:
                raise typer.BadParameter(f"cannot resume: {error}", param_hint="--resume") from error
        if communicator.rank == 0:
            last = results[-1].meta_loss if results else math.nan
            typer.echo(f"{len(results)} meta-steps run, last meta-loss {last:.4g}; checkpoint in {out / CHECKPOINT_NAME}")
    finally:
        if not isinstance(communicator, SingleProcess):
            shutdown()
