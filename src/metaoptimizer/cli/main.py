"""The ``metaopt`` application: global options and the commands, one module each."""

from __future__ import annotations

from typing import Annotated

import torch
import typer

from metaoptimizer import __version__
from metaoptimizer.cli._common import DEFAULT_THREADS
from metaoptimizer.cli.demo import demo
from metaoptimizer.cli.eval import eval_command
from metaoptimizer.cli.fewshot import fewshot
from metaoptimizer.cli.lr_example import lr_example
from metaoptimizer.cli.meta_train import meta_train
from metaoptimizer.cli.pretrain import pretrain

app = typer.Typer(
    name="metaopt",
    help="Learned optimizers for PyTorch: meta-train, evaluate against tuned baselines, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[training]" is a TOML section, not markup
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"metaoptimizer {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    threads: Annotated[int, typer.Option(
        min=1, envvar="METAOPT_THREADS",
        help="Torch intra-op threads. 1 suits this library's small tensors and a shared machine; on a quiet "
             "many-core machine more speed up meta-training and large models (BENCHMARKS.md, Thread count).",
    )] = DEFAULT_THREADS,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """metaoptimizer's command-line tool."""
    torch.set_num_threads(threads)


app.command("demo")(demo)
app.command("pretrain")(pretrain)
app.command("eval")(eval_command)
app.command("meta-train")(meta_train)
app.command("fewshot")(fewshot)
app.command("lr-example")(lr_example)
