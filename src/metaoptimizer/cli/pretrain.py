"""``metaopt pretrain NAME``: meta-train a shipped optimizer from scratch with its recipe.

The recipe is the ``metaopt meta-train`` config shipped beside the weights
(``metaoptimizer/pretrained/NAME.toml``); the run writes ``checkpoint.pt`` and ``log.csv`` as
``meta-train`` does (``--resume`` continues it) and the trained rule as ``NAME.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metaoptimizer import pretrained
from metaoptimizer.checkpoint import CheckpointError
from metaoptimizer.cli._common import out_option, progress_display
from metaoptimizer.meta.loop import CHECKPOINT_NAME

__all__ = ["pretrain"]


def pretrain(
    name: Annotated[str, typer.Argument(help=f"Pretrained optimizer to rebuild: {', '.join(pretrained.TRAINED)}.")],
    out: Annotated[Path, out_option("Folder for the trained rule, the run's checkpoint and its log.")],
    meta_steps: Annotated[int | None, typer.Option(min=1, help="Meta-steps (default: the recipe's).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Meta-training seed (default: the recipe's).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress (a bar on a terminal, lines in a log).")] = True,
) -> None:
    """Meta-train a shipped optimizer from scratch with its recipe (the config beside its weights)."""
    if name not in pretrained.TRAINED:
        raise typer.BadParameter(
            f"{name!r} has no recipe; names `metaopt pretrain` rebuilds: {', '.join(pretrained.TRAINED)} "
            f"(available pretrained optimizers: {', '.join(pretrained.available())})", param_hint="NAME")
    if (out / CHECKPOINT_NAME).exists() and not resume:
        raise typer.BadParameter(f"{out} already holds a checkpoint; pass --resume to continue it or use another "
                                 "folder", param_hint="--out")
    with progress_display(progress) as report:
        try:
            rule_file = pretrained.train(name, out, meta_steps=meta_steps, seed=seed, resume=resume, progress=report)
        except CheckpointError as error:
            raise typer.BadParameter(f"cannot resume: {error}", param_hint="--resume") from error
    typer.echo(f"trained rule: {rule_file} (recipe: {pretrained.recipe_path(name)})")
