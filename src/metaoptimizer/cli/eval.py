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
from metaoptimizer.evaluate.baselines import TUNERS, make_baselines
from metaoptimizer.evaluate.loading import RuleLoader, load_optimizer
from metaoptimizer.evaluate.report import ReportFiles, write_report
from metaoptimizer.evaluate.runner import SuiteResult, run_suite
from metaoptimizer.evaluate.suites import SUITES, make_suite

__all__ = ["LOAD_OPTIMIZER_HELP", "eval_command", "make_eval_command"]

LOAD_OPTIMIZER_HELP = (
    "A pretrained name (e.g. lstm-digits-mlp), a MetaOptimizer checkpoint file, or a hand-designed rule "
    "such as adam:lr=0.001. Repeat to evaluate several side by side."
)


def _items(text: str | None, what: str, convert: Callable[[str], object] = str) -> tuple | None:
    """A comma-separated option as a tuple (None when not given)."""
    if text is None:
        return None
    try:
        return tuple(convert(item.strip()) for item in text.split(",") if item.strip())
    except ValueError as error:
        raise typer.BadParameter(f"{what} must be a comma-separated list, got {text!r} ({error})") from error


def _summary_table(result: SuiteResult) -> Table:
    table = Table(title=f"suite {result.suite.name}: speedup over tuned {result.reference}")
    for column in ("optimizer", "speedup median", "speedup IQM", "IQM 95% CI", "accuracy ratio median"):
        table.add_column(column)
    fmt = lambda v: f"{v:.3g}" if not math.isnan(v) else "nan"  # noqa: E731
    for name, figures in result.summary().items():
        speedup = figures["speedup"]
        table.add_row(name, fmt(speedup.median), fmt(speedup.iqm), f"{fmt(speedup.iqm_low)} - {fmt(speedup.iqm_high)}",
                      fmt(figures["accuracy_ratio"].median))
    return table


def make_eval_command(
    load_rule: RuleLoader = load_optimizer, optimizer_help: str = LOAD_OPTIMIZER_HELP
) -> Callable[..., ReportFiles]:
    """The ``metaopt eval`` command, turning ``--optimizer`` into a rule with ``load_rule``
    (``optimizer_help`` describes what that loader accepts)."""

    def eval_command(
        optimizer: Annotated[list[str], typer.Option(help=optimizer_help)],
        suite: Annotated[str, typer.Option(help=f"Suite: {', '.join(SUITES)}.")] = "heldout",
        out: Annotated[Path, out_option("Folder for report.md, results.json and plots.")] = Path("eval"),
        name: Annotated[list[str] | None, typer.Option(
            help="Label of the optimizer in the report (one per --optimizer, in order).")] = None,
        num_tasks: Annotated[int | None, typer.Option(help="Tasks per suite entry (suite default if unset).")] = None,
        steps: Annotated[int | None, typer.Option(help="Step budget (the meta-training horizon).")] = None,
        seeds: Annotated[int | None, typer.Option(help="Seeds per task: 0 .. seeds-1.")] = None,
        tuner: Annotated[str, typer.Option(help=f"Baseline learning-rate search: {', '.join(TUNERS)}.")] = "grid",
        trials: Annotated[int, typer.Option(help="Optuna trials per baseline and task (tuner=optuna).")] = 12,
        horizons: Annotated[str | None, typer.Option(
            help="General suite: step budgets, comma-separated (default 300,1000,3000).")] = None,
        tasks: Annotated[str | None, typer.Option(
            help="General suite: the tasks to run, comma-separated (default: all).")] = None,
        data_dir: Annotated[Path | None, typer.Option(
            help="Data folder: tiny Shakespeare (architectures suite); MNIST, Omniglot and tiny Shakespeare "
                 "(general suite; else $METAOPT_DATA_DIR, else fallback data).")] = None,
        device: Annotated[str | None, typer.Option(help="Torch device for the runs, e.g. cuda.")] = None,
        progress: Annotated[bool, typer.Option(help="Show progress (a bar on a terminal, lines in a log).")] = True,
        baseline_cache: Annotated[Path | None, typer.Option(
            help="Folder caching the tuned baselines' runs, reused by later evaluations of the same suite.",
            envvar="METAOPT_BASELINE_CACHE")] = None,
    ) -> ReportFiles:
        """Evaluate optimizers on a suite against the suite's baselines: learning-rate-tuned Adam,
        momentum and RMSProp; for the general suite, what users run instead."""
        overrides = {"num_tasks": num_tasks, "steps": steps, "data_dir": data_dir,
                     "horizons": _items(horizons, "--horizons", int), "tasks": _items(tasks, "--tasks")}
        overrides = {key: value for key, value in overrides.items() if value is not None}
        if seeds is not None:
            overrides["seeds"] = tuple(range(seeds))
        if name and len(name) != len(optimizer):
            raise typer.BadParameter(f"give one --name per --optimizer ({len(optimizer)}), got {len(name)}")
        labels = list(name or (Path(o).stem if Path(o).is_file() else o for o in optimizer))
        if len(set(labels)) != len(labels):
            raise typer.BadParameter(f"the optimizers' labels {labels} repeat; pass distinct --name values")
        with usage_errors():
            chosen = make_suite(suite, **overrides)
            baseline_names = [b.name for b in make_baselines(chosen.baselines)]
            for label in labels:
                if label in baseline_names:
                    raise ValueError(f"the label {label!r} is a baseline's name ({baseline_names}); pass --name")
            rules = {label: load_rule(spec) for label, spec in zip(labels, optimizer, strict=True)}
        factories = {label: (lambda rule=rule: rule) for label, rule in rules.items()}
        with progress_display(progress) as report:
            result = run_suite(chosen, factories, tuner=tuner, trials=trials, device=device, progress=report,
                               cache=baseline_cache)
        files = write_report(result, out, extra={"optimizer": ", ".join(optimizer), "label": ", ".join(labels)})
        console = Console()
        console.print(_summary_table(result))
        console.print(f"report: {files.markdown}\nnumbers: {files.json}")
        return files

    return eval_command


eval_command = make_eval_command()
