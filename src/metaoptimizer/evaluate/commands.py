"""Command-line adapter for evaluation: ``metaopt eval`` runs a suite and writes its report.

:func:`make_eval_command` builds the typer-ready command around a rule loader, so the CLI can
inject how an ``--optimizer`` string becomes an update rule; :data:`eval_command` uses
:func:`load_optimizer` (pretrained names, checkpoint files, hand-designed rules by spec).
"""

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from metaoptimizer import pretrained
from metaoptimizer.evaluate.baselines import TUNERS, make_baselines
from metaoptimizer.evaluate.report import ReportFiles, write_report
from metaoptimizer.evaluate.runner import RuleFactory, SuiteResult, run_suite
from metaoptimizer.evaluate.suites import SUITES, Suite, make_suite
from metaoptimizer.facade import MetaOptimizer
from metaoptimizer.rules.base import UpdateRule
from metaoptimizer.rules.hand import HAND_RULES, make_hand_rule

RuleLoader = Callable[[str], UpdateRule]


def parse_hand_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``'name'`` or ``'name:key=value,key=value'`` (numeric values) as (name, hyperparameters)."""
    name, _, options = spec.partition(":")
    hyperparameters = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        number = _as_float(value)
        if not key.strip() or number is None:
            raise ValueError(f"bad hyperparameter {item!r} in {spec!r}; write key=number, e.g. 'adam:lr=0.001'")
        hyperparameters[key.strip()] = number
    return name.strip(), hyperparameters


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def load_optimizer(spec: str) -> UpdateRule:
    """The update rule named by ``spec``: a shipped pretrained optimizer
    (:func:`metaoptimizer.pretrained.available`), the path of a saved ``MetaOptimizer``, or a
    hand-designed rule (``'adam:lr=0.001'``, names as in :data:`metaoptimizer.rules.hand.HAND_RULES`)."""
    if spec in pretrained.available():
        return pretrained.load(spec).rule
    if Path(spec).is_file():
        return MetaOptimizer.load(spec).rule
    name, hyperparameters = parse_hand_spec(spec)
    if name in HAND_RULES:
        return make_hand_rule(name, **hyperparameters)
    raise ValueError(
        f"optimizer {spec!r} is not a pretrained name ({', '.join(pretrained.available())}), an existing "
        f"checkpoint file or a hand-designed rule ({', '.join(HAND_RULES)}, e.g. 'adam:lr=0.001')"
    )


def evaluate(
    optimizers: Mapping[str, RuleFactory],
    suite: Suite,
    out_dir: str | Path,
    *,
    tuner: str = "grid",
    trials: int = 12,
    device: str | None = None,
    progress: bool = True,
    extra: Mapping[str, Any] | None = None,
    cache: str | Path | None = None,
) -> tuple[SuiteResult, ReportFiles]:
    """Run ``suite`` with ``optimizers`` and the suite's baselines (reused from the folder
    ``cache`` when given), then write the report."""
    result = run_suite(suite, optimizers, tuner=tuner, trials=trials, device=device, progress=progress,
                       cache=cache)
    return result, write_report(result, out_dir, extra=extra)


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


LOAD_OPTIMIZER_HELP = (
    "A pretrained name (e.g. lstm-digits-mlp), a MetaOptimizer checkpoint file, or a hand-designed rule "
    "such as adam:lr=0.001. Repeat to evaluate several side by side."
)


def _names(text: str | None, what: str, convert=str) -> tuple | None:
    """A comma-separated CLI list as a tuple (None when not given)."""
    if text is None:
        return None
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    try:
        return tuple(convert(item) for item in items)
    except ValueError as error:
        raise typer.BadParameter(f"{what} must be a comma-separated list, got {text!r} ({error})") from error


def make_eval_command(
    load_rule: RuleLoader = load_optimizer, optimizer_help: str = LOAD_OPTIMIZER_HELP
) -> Callable[..., ReportFiles]:
    """The ``metaopt eval`` command, turning ``--optimizer`` into a rule with ``load_rule``
    (``optimizer_help`` describes what that loader accepts).

    This module does not use postponed annotations: typer reads the options from the
    ``Annotated`` hints, which refer to ``optimizer_help`` in this closure."""

    def eval_command(
        optimizer: Annotated[list[str], typer.Option(help=optimizer_help)],
        suite: Annotated[str, typer.Option(help=f"Suite: {', '.join(SUITES)}.")] = "heldout",
        out_dir: Annotated[Path, typer.Option(help="Folder for report.md, results.json and plots.")] = Path("eval"),
        name: Annotated[list[str] | None, typer.Option(
            help="Label of the optimizer in the report (one per --optimizer, in order).")] = None,
        num_tasks: Annotated[int | None, typer.Option(help="Tasks per suite entry (suite default if unset).")] = None,
        steps: Annotated[int | None, typer.Option(help="Step budget (the meta-training horizon).")] = None,
        seeds: Annotated[int | None, typer.Option(help="Seeds per task: 0 .. seeds-1.")] = None,
        tuner: Annotated[str, typer.Option(help=f"Baseline learning-rate search: {', '.join(TUNERS)}.")] = "grid",
        trials: Annotated[int, typer.Option(help="Optuna trials per baseline and task (tuner=optuna).")] = 12,
        horizons: Annotated[str | None, typer.Option(
            help="Step budgets of the general suite, comma-separated (default 300,1000,3000).")] = None,
        tasks: Annotated[str | None, typer.Option(
            help="General suite: the tasks to run, comma-separated (default: all).")] = None,
        data_dir: Annotated[Path | None, typer.Option(
            help="Data folder: tiny Shakespeare (architectures suite); MNIST, Omniglot and tiny Shakespeare "
                 "(general suite, else $METAOPT_DATA_DIR, else fallback data).")] = None,
        device: Annotated[str | None, typer.Option(help="Torch device for the runs, e.g. cuda.")] = None,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
        baseline_cache: Annotated[Path | None, typer.Option(
            help="Folder caching the tuned baselines' runs, reused by later evaluations of the same suite.",
            envvar="METAOPT_BASELINE_CACHE")] = None,
    ) -> ReportFiles:
        """Evaluate optimizers on a suite against the suite's baselines (learning-rate-tuned Adam,
        momentum and RMSProp; for the general suite, what users run instead)."""
        overrides = {"num_tasks": num_tasks, "steps": steps, "data_dir": data_dir,
                     "horizons": _names(horizons, "--horizons", int), "tasks": _names(tasks, "--tasks")}
        overrides = {key: value for key, value in overrides.items() if value is not None}
        if seeds is not None:
            overrides["seeds"] = tuple(range(seeds))
        if name and len(name) != len(optimizer):
            raise typer.BadParameter(f"give one --name per --optimizer ({len(optimizer)}), got {len(name)}")
        labels = list(name or (Path(o).stem if Path(o).is_file() else o for o in optimizer))
        if len(set(labels)) != len(labels):
            raise typer.BadParameter(f"the optimizers' labels {labels} repeat; pass distinct --name values")
        try:
            chosen = make_suite(suite, **overrides)
            baseline_names = [b.name for b in make_baselines(chosen.baselines)]
            rules = {label: load_rule(spec) for label, spec in zip(labels, optimizer, strict=True)}
        except (ValueError, FileNotFoundError, ImportError) as error:
            raise typer.BadParameter(str(error)) from error
        for label in labels:
            if label in baseline_names:
                raise typer.BadParameter(f"the label {label!r} is a baseline's name ({baseline_names}); pass --name")
        extra = {"optimizer": ", ".join(optimizer), "label": ", ".join(labels)}
        factories = {label: (lambda rule=rule: rule) for label, rule in rules.items()}
        result, files = evaluate(factories, chosen, out_dir, tuner=tuner, trials=trials, device=device,
                                 progress=progress, extra=extra, cache=baseline_cache)
        console = Console()
        console.print(_summary_table(result))
        console.print(f"report: {files.markdown}\nnumbers: {files.json}")
        return files

    return eval_command


eval_command = make_eval_command()
