"""Write a suite's results: a markdown report, a JSON file of every number, and PNG plots.

``results.json`` holds the suite definition, the protocol, the summaries, and per task every
comparison, every tuned learning rate and every run's full curves. JSON has no infinities, so
non-finite numbers are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (``"inf"`` in a
loss curve means the run had diverged by then). Plots are drawn on ``matplotlib.figure.Figure``
objects, never through pyplot, so writing a report changes no global plotting state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from metaoptimizer.evaluate import metrics
from metaoptimizer.evaluate.runner import Comparison, Curve, SuiteResult, TaskResult

PROTOCOL = (
    "Baselines ({baselines}) have their learning rate tuned on each "
    "evaluated task itself, with the same seeds that are evaluated (the learned_optimization "
    "protocol; it favours the baselines). Curves are the trailing running mean of the per-step "
    "training loss over {window_percent:g}% of the budget, averaged over seeds (seeds are paired: "
    "same initialisation and batches for every optimizer). The tuned reference ({reference}) is "
    "the lower envelope of its seed-mean curves over its learning rates; the target is that "
    "envelope's minimum. Speedup = reference steps to the target / optimizer steps to the target; "
    "when an optimizer never reaches the target, its speedup is capped at reference steps / budget "
    "and marked with `*`. Loss ratios are optimizer / tuned reference (lower is better), accuracy "
    "ratios likewise (higher is better), at the end of the budget. A run whose loss becomes NaN/Inf "
    "is diverged: loss +inf (accuracy 0) from then on. Budget-aware rules (a learned schedule over "
    "the training fraction) are told the step budget before each run, as a cosine schedule would be; "
    "the baselines use a constant learning rate."
)


@dataclass(frozen=True)
class ReportFiles:
    """Paths of everything :func:`write_report` wrote."""

    markdown: Path
    json: Path
    plots: tuple[Path, ...]


def _number(value: float, digits: int = 9) -> float | str:
    """A JSON-safe number: finite values to ``digits`` significant digits, others as strings."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(f"{value:.{digits}g}")


def _numbers(values: np.ndarray | Sequence[float]) -> list[float | str]:
    return [_number(v) for v in np.asarray(values, dtype=np.float64).tolist()]


def curve_to_dict(curve: Curve) -> dict[str, Any]:
    """One run as JSON-ready data (non-finite numbers as strings)."""
    return {
        "train_loss": _numbers(curve.train_loss),
        "eval_steps": [int(s) for s in curve.eval_steps],
        "eval_metrics": {name: _numbers(values) for name, values in curve.eval_metrics.items()},
        "diverged_at": curve.diverged_at,
        "seconds": _number(curve.seconds, 4),
    }


def _comparison_to_dict(comparison: Comparison) -> dict[str, Any]:
    speedup = comparison.speedup
    return {
        "speedup": _number(speedup.value),
        "reached": speedup.reached,
        "target": _number(speedup.target),
        "reference_steps": speedup.baseline_steps,
        "steps": speedup.rule_steps,
        "budget": speedup.budget,
        **{key: _number(value) for key, value in asdict(comparison).items()
           if key not in ("speedup", "diverged_seeds")},
        "diverged_seeds": comparison.diverged_seeds,
    }


def _task_to_dict(task: TaskResult) -> dict[str, Any]:
    return {
        "entry": task.entry.label,
        "family": task.entry.family,
        "index": task.index,
        "task": task.task_name,
        "steps": task.entry.steps,
        "seeds": list(task.entry.seeds),
        "window": task.window,
        "comparisons": {name: _comparison_to_dict(c) for name, c in task.comparisons.items()},
        "baselines": {
            name: {
                "best_lr": tuning.best_lr,
                "lrs": tuning.lrs,
                "best_loss": {str(lr): _number(tuning.objective(lr)) for lr in tuning.lrs},
                "runs": {str(lr): [curve_to_dict(c) for c in tuning.runs[lr]] for lr in tuning.lrs},
            }
            for name, tuning in task.baselines.items()
        },
        "optimizers": {name: [curve_to_dict(c) for c in curves] for name, curves in task.optimizers.items()},
    }


def _summary_to_dict(table: Mapping[str, Mapping[str, metrics.Summary]]) -> dict[str, Any]:
    return {
        name: {figure: {k: _number(v) if isinstance(v, float) else v for k, v in asdict(s).items()}
               for figure, s in figures.items()}
        for name, figures in table.items()
    }


def protocol_text(result: SuiteResult) -> str:
    baselines = ", ".join(dict.fromkeys(name for task in result.tasks for name in task.baselines))
    return PROTOCOL.format(window_percent=100 * result.window_fraction, reference=result.reference, baselines=baselines)


def result_to_dict(result: SuiteResult, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every number of ``result`` as JSON-ready data; ``extra`` (e.g. the optimizer's source) is kept as given."""
    return {
        "suite": result.suite.to_dict(),
        "protocol": {
            "text": protocol_text(result),
            "reference": result.reference,
            "tuner": result.tuner,
            "window_fraction": result.window_fraction,
        },
        "seconds": _number(result.seconds, 4),
        "extra": dict(extra or {}),
        "summary": {
            "all": _summary_to_dict(result.summary()),
            "entries": {label: _summary_to_dict(result.summary(label)) for label in result.labels()},
        },
        "tasks": [_task_to_dict(task) for task in result.tasks],
    }


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else ("nan" if math.isnan(value) else "inf")


def _speedup_cell(comparison: Comparison) -> str:
    return _fmt(comparison.speedup.value) + ("" if comparison.speedup.reached else "*")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _summary_lines(result: SuiteResult, label: str | None) -> list[str]:
    tasks = [t for t in result.tasks if label is None or t.entry.label == label]
    rows = []
    for name, figures in result.summary(label).items():
        compared = [t.comparisons[name] for t in tasks if name in t.comparisons]
        reached = sum(c.speedup.reached for c in compared)
        diverged = sum(c.diverged_seeds for c in compared)
        runs = sum(len(t.entry.seeds) for t in tasks if name in t.comparisons)
        rows.append([
            name, _fmt(figures["speedup"].median), _fmt(figures["speedup"].iqm), f"{reached}/{len(compared)}",
            _fmt(figures["train_loss_ratio"].median), _fmt(figures["valid_loss_ratio"].median),
            _fmt(figures["accuracy_ratio"].median), f"{diverged}/{runs}",
        ])
    header = ["optimizer", "speedup median", "speedup IQM", "reached target", "train loss ratio (median)",
              "valid loss ratio (median)", "accuracy ratio (median)", "diverged runs"]
    return _table(header, rows)


def _task_lines(result: SuiteResult) -> list[str]:
    rows = []
    for task in result.tasks:
        for name, c in task.comparisons.items():
            rows.append([
                task.entry.label, str(task.index), f"`{task.task_name}`", name, _speedup_cell(c),
                str(c.speedup.rule_steps or "-"), str(c.speedup.baseline_steps), _fmt(c.speedup.target, 4),
                _fmt(c.final_train_loss, 4), _fmt(c.train_loss_ratio), _fmt(c.valid_loss_ratio),
                _fmt(c.accuracy_ratio), str(c.diverged_seeds),
            ])
    header = ["entry", "#", "task", "optimizer", "speedup", "steps", "reference steps", "target",
              "final train loss", "train loss ratio", "valid loss ratio", "accuracy ratio", "diverged seeds"]
    return _table(header, rows)


def _tuning_lines(result: SuiteResult) -> list[str]:
    rows = []
    for task in result.tasks:
        for name, tuning in task.baselines.items():
            diverged = sum(any(c.diverged for c in tuning.runs[lr]) for lr in tuning.lrs)
            grid = f"{min(tuning.lrs):.3g} ... {max(tuning.lrs):.3g} ({len(tuning.lrs)})"
            rows.append([task.entry.label, str(task.index), name, f"{tuning.best_lr:.3g}",
                         _fmt(tuning.objective(tuning.best_lr), 4), grid, str(diverged)])
    header = ["entry", "#", "baseline", "tuned lr", "best smoothed loss", "lrs tried", "lrs with a diverged seed"]
    return _table(header, rows)


def _plottable(curve: np.ndarray) -> np.ndarray:
    """Non-finite values become NaN so that matplotlib leaves a gap instead of rescaling to inf."""
    return np.where(np.isfinite(curve), curve, np.nan)


def _positive(curves: Sequence[np.ndarray]) -> bool:
    values = np.concatenate([c[np.isfinite(c)] for c in curves])
    return values.size > 0 and bool((values > 0).all())


def plot_curves(result: SuiteResult, label: str, path: Path) -> Path:
    """One panel per task of entry ``label``: every optimizer's and baseline's seed-mean smoothed
    training loss, the tuned reference's envelope and its target."""
    tasks = [t for t in result.tasks if t.entry.label == label]
    columns = min(4, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    figure = Figure(figsize=(4 * columns, 3.2 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, task in zip(axes, tasks, strict=False):
        reference = task.baselines[result.reference]
        envelope = reference.envelope()
        drawn = [envelope]
        steps = np.arange(1, envelope.size + 1)
        ax.plot(steps, _plottable(envelope), color="black", lw=2.2, label=f"tuned {result.reference} (envelope)")
        for name, tuning in task.baselines.items():
            if name != result.reference:
                curve = tuning.mean_curves[tuning.best_lr]
                drawn.append(curve)
                ax.plot(steps, _plottable(curve), lw=1, alpha=0.7, ls="--", label=f"{name} (lr {tuning.best_lr:.2g})")
        for name, curves in task.optimizers.items():
            curve = metrics.seed_mean([c.train_loss for c in curves], task.window)
            drawn.append(curve)
            ax.plot(np.arange(1, curve.size + 1), _plottable(curve), lw=1.8, label=name)
        ax.axhline(float(envelope.min()), color="grey", ls=":", lw=1, label="target")
        if _positive(drawn):
            ax.set_yscale("log")
        ax.set_title(f"{label} #{task.index}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("smoothed train loss")
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    figure.savefig(path, dpi=100)
    return path


def plot_speedups(result: SuiteResult, path: Path) -> Path:
    """Grouped bars of every compared optimizer's speedup per task, growing from 1 (as fast as the
    tuned reference) on a log axis; hatched bars never reached the target (capped values)."""
    names = result.compared()
    tasks = result.tasks
    width = 0.8 / len(names)
    figure = Figure(figsize=(max(6.0, 0.5 * len(tasks) * len(names) + 2), 4), layout="constrained")
    ax = figure.subplots()
    positions = np.arange(len(tasks))
    handles = []
    for k, name in enumerate(names):
        comparisons = [t.comparisons.get(name) for t in tasks]
        values = np.array([c.speedup.value if c else np.nan for c in comparisons])
        bars = ax.bar(positions + k * width, values - 1.0, width, bottom=1.0, color=f"C{k}")
        for bar, c in zip(bars, comparisons, strict=True):
            if c is not None and not c.speedup.reached:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
        handles.append(Patch(color=f"C{k}", label=name))
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="target never reached (capped)"))
    ax.axhline(1.0, color="black", lw=1)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 7.0, 8.0, 9.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(positions + 0.4 - width / 2, [f"{t.entry.label} #{t.index}" for t in tasks], rotation=60,
                  ha="right", fontsize=7)
    ax.set_ylabel(f"speedup over tuned {result.reference}")
    ax.set_title(f"steps-to-target speedup, suite {result.suite.name}", fontsize=9)
    ax.legend(handles=handles, fontsize=7)
    figure.savefig(path, dpi=100)
    return path


def write_report(
    result: SuiteResult, out_dir: str | Path, *, title: str | None = None, extra: Mapping[str, Any] | None = None
) -> ReportFiles:
    """Write ``report.md``, ``results.json``, ``speedup.png`` and one ``curves_<entry>.png`` per
    suite entry into ``out_dir`` (created if needed). ``extra`` is recorded in both files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(result_to_dict(result, extra), indent=1, allow_nan=False))
    plots = [plot_curves(result, label, out / f"curves_{label}.png") for label in result.labels()]
    plots.append(plot_speedups(result, out / "speedup.png"))
    lines = [f"# {title or f'Evaluation on suite `{result.suite.name}`'}", "", result.suite.description, ""]
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping):  # one nested item per line, not a dict printed on one line
            lines.append(f"- {key}:")
            lines += [f"  - {inner}: {inner_value}" for inner, inner_value in value.items()]
        else:
            lines.append(f"- {key}: {value}")
    lines += [
        f"- reference: tuned {result.reference} ({result.tuner} search); tasks: {len(result.tasks)}; "
        f"wall time: {result.seconds:.1f} s",
        "",
        "## Protocol",
        "",
        protocol_text(result),
        "",
        "## Summary over tasks",
        "",
    ]
    if len(result.labels()) > 1:
        for label in result.labels():
            lines += [f"### {label}", "", *_summary_lines(result, label), ""]
        lines += ["### all entries", ""]
    lines += [*_summary_lines(result, None), "", "![speedups](speedup.png)", ""]
    for plot in plots[:-1]:
        lines += [f"![{plot.stem}]({plot.name})", ""]
    lines += ["## Per-task results", "", "`*`: target never reached; speedup capped.", "", *_task_lines(result), ""]
    lines += ["## Tuned learning rates", "", *_tuning_lines(result), ""]
    lines += ["All numbers, including every run's curve, are in `results.json`.", ""]
    markdown = out / "report.md"
    markdown.write_text("\n".join(lines))
    return ReportFiles(markdown, json_path, tuple(plots))
