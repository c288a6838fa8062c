"""``metaopt pretrain NAME``: meta-train a shipped optimizer from scratch, as its model card describes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metaoptimizer import pretrained
from metaoptimizer.cli._common import out_option, progress_display

__all__ = ["pretrain"]


def pretrain(
    name: Annotated[str, typer.Argument(help=f"Pretrained optimizer to rebuild: {', '.join(pretrained.available())}.")],
    out: Annotated[Path, out_option("Folder for the checkpoint and its meta-training log.")],
    meta_steps: Annotated[int | None, typer.Option(min=1, help="Meta-steps (default: as the shipped checkpoint).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Meta-training seed (default: as the shipped checkpoint).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress (a bar on a terminal, lines in a log).")] = True,
) -> None:
    """Meta-train a shipped optimizer from scratch, as its model card describes."""
    if name not in pretrained.available():
        raise typer.BadParameter(f"unknown pretrained optimizer {name!r}; available: {', '.join(pretrained.available())}",
                                 param_hint="NAME")
    with progress_display(progress) as report:
        checkpoint = pretrained.train(name, out, meta_steps=meta_steps, seed=seed, progress=report)
    typer.echo(f"checkpoint: {checkpoint}")
