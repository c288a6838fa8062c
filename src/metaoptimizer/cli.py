"""``metaopt``: the command-line tool. Each command is a thin wrapper over a library function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metaoptimizer import __version__
from metaoptimizer.evaluate.commands import eval_command
from metaoptimizer.evaluate.fewshot import fewshot_command
from metaoptimizer.meta.hyperparams import lr_example_command
from metaoptimizer.meta.loop import meta_train_command

app = typer.Typer(
    name="metaopt",
    help="Learned optimizers for PyTorch: meta-train, evaluate against tuned baselines, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"metaoptimizer {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """metaoptimizer's command-line tool."""


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the checkpoint, report and plots.")] = Path("demo-output"),
    minutes: Annotated[float, typer.Option(help="Wall-clock budget for meta-training.")] = 3.0,
    meta_steps: Annotated[int, typer.Option(help="Stop meta-training after this many steps (0: time only).")] = 0,
    tasks: Annotated[int, typer.Option(help="Held-out tasks to compare on.")] = 5,
    steps: Annotated[int, typer.Option(help="Inner training steps per held-out run.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed for meta-training.")] = 0,
) -> None:
    """Meta-train the LSTM optimizer on digits MLPs, then compare it with tuned Adam on held-out tasks."""
    from metaoptimizer.demo import run_demo

    report = run_demo(out, minutes=minutes, meta_steps=meta_steps or None, tasks=tasks, steps=steps, seed=seed)
    typer.echo(f"report: {report}")


@app.command()
def pretrain(
    name: Annotated[str, typer.Argument(help="Pretrained optimizer to rebuild, e.g. lstm-digits-mlp.")],
    out: Annotated[Path, typer.Option(help="Folder for the checkpoint and its meta-training log.")],
    meta_steps: Annotated[int, typer.Option(help="Meta-steps (0: as the shipped checkpoint).")] = 0,
    seed: Annotated[int, typer.Option(help="Meta-training seed (-1: as the shipped checkpoint).")] = -1,
) -> None:
    """Meta-train a shipped optimizer from scratch, as its model card describes."""
    from metaoptimizer.pretrained import train

    checkpoint = train(name, out, meta_steps=meta_steps or None, seed=None if seed < 0 else seed)
    typer.echo(f"checkpoint: {checkpoint}")


# Commands whose implementation lives beside the library code they wrap.
app.command("eval")(eval_command)
app.command("meta-train")(meta_train_command)
app.command("fewshot")(fewshot_command)
app.command("lr-example")(lr_example_command)
