"""``metaopt eval``: run an optimizer on a suite against tuned baselines and write the report.

:func:`make_eval_command` builds the command around a rule loader, so a caller can inject how an
``--optimizer`` string becomes an update rule; :data:`eval_command` uses
:func:`~metaoptimizer.evaluate.loading.load_optimizer` (pretrained names, checkpoint files,
hand-designed rules by spec).

This module does not use postponed annotations: typer reads the options from the ``Annotated``
hints, which refer to ``optimizer_help`` in a closure.
"""

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from metaoptimizer.cli._common import out_option, progress_display, usage_errors
from metaoptimizer.evaluate.baselines import TUNERS, default_baselines
from metaoptimizer.evaluate.loading import RuleLoader, load_optimizer
from metaoptimizer.evaluate.report import ReportFiles, write_report
from metaoptimizer.evaluate.runner import SuiteResult, run_suite
from metaoptimizer.evaluate.suites import SUITES, make_suite

__all__ = ["LOAD_OPTIMIZER_HELP", "eval_command", "make_eval_command"]

LOAD_OPTIMIZER_HELP = (
    "A pretrained name (e.g. lstm-digits-mlp), a MetaOptimizer checkpoint file, or a hand-designed rule "
    "such as adam:lr=0.001."
)


def _summary_table(result: SuiteResult) -> Table:
    table = Table(title=f"suite {result.suite.name}: speedup over tuned {result.reference}")
    for column in ("optimizer", "speedup median", "speedup IQM", "accuracy ratio median"):
        table.add_column(column)
    fmt = lambda v: f"{v:.3g}" if not math.isnan(v) else "nan"  # noqa: E731
    for name, figures in result.summary().items():
        table.add_row(name, fmt(figures["speedup"].median), fmt(figures["speedup"].iqm),
                      fmt(figures["accuracy_ratio"].median))
    return table


def make_eval_command(
    load_rule: RuleLoader = load_optimizer, optimizer_help: str = LOAD_OPTIMIZER_HELP
) -> Callable[..., ReportFiles]:
    """The ``metaopt eval`` command, turning ``--optimizer`` into a rule with ``load_rule``
    (``optimizer_help`` describes what that loader accepts)."""

    def eval_command(
        optimizer: Annotated[str, typer.Option(help=optimizer_help)],
        suite: Annotated[str, typer.Option(help=f"Suite: {', '.join(SUITES)}.")] = "heldout",
        out: Annotated[Path, out_option("Folder for report.md, results.json and plots.")] = Path("eval"),
        name: Annotated[str | None, typer.Option(help="Label of the optimizer in the report.")] = None,
        num_tasks: Annotated[int | None, typer.Option(help="Tasks per suite entry (suite default if unset).")] = None,
        steps: Annotated[int | None, typer.Option(help="Step budget (the meta-training horizon).")] = None,
        seeds: Annotated[int | None, typer.Option(help="Seeds per task: 0 .. seeds-1.")] = None,
        tuner: Annotated[str, typer.Option(help=f"Baseline learning-rate search: {', '.join(TUNERS)}.")] = "grid",
        trials: Annotated[int, typer.Option(help="Optuna trials per baseline and task (tuner=optuna).")] = 12,
        data_dir: Annotated[Path | None, typer.Option(help="Tiny Shakespeare folder (architectures suite).")] = None,
        device: Annotated[str | None, typer.Option(help="Torch device for the runs, e.g. cuda.")] = None,
        progress: Annotated[bool, typer.Option(help="Show progress (a bar on a terminal, lines in a log).")] = True,
        baseline_cache: Annotated[Path | None, typer.Option(
            help="Folder caching the tuned baselines' runs, reused by later evaluations of the same suite.",
            envvar="METAOPT_BASELINE_CACHE")] = None,
    ) -> ReportFiles:
        """Evaluate an optimizer on a suite against learning-rate-tuned Adam, momentum and RMSProp."""
        overrides = {"num_tasks": num_tasks, "steps": steps, "data_dir": data_dir}
        overrides = {key: value for key, value in overrides.items() if value is not None}
        if seeds is not None:
            overrides["seeds"] = tuple(range(seeds))
        label = name or (Path(optimizer).stem if Path(optimizer).is_file() else optimizer)
        baseline_names = [b.name for b in default_baselines()]
        if label in baseline_names:
            raise typer.BadParameter(f"the label {label!r} is a baseline's name ({baseline_names}); pass --name")
        with usage_errors():
            chosen = make_suite(suite, **overrides)
            rule = load_rule(optimizer)
        with progress_display(progress) as report:
            result = run_suite(chosen, {label: lambda: rule}, tuner=tuner, trials=trials, device=device,
                               progress=report, cache=baseline_cache)
        files = write_report(result, out, extra={"optimizer": optimizer, "label": label})
        console = Console()
        console.print(_summary_table(result))
        console.print(f"report: {files.markdown}\nnumbers: {files.json}")
        return files

    return eval_command


eval_command = make_eval_command()
