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
    "the training fraction, a warmup-cosine schedule) are told the step budget before each run. "
    "Baselines with a single learning rate are run untuned at that value. The IQM's 95% interval is a "
    "percentile bootstrap over tasks (2000 resamples). 'Beats' compares final losses (seed means; "
    "train: smoothed training loss at the last step, valid: validation loss at the last evaluation, "
    "taken at a schedule-free optimizer's averaged iterate). Time per step is a run's wall time "
    "(gradients, updates, evaluations) per step over the reference's mean at every learning rate; "
    "baselines read from the cache keep the times of the process that ran them."
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
        "group": task.entry.group,
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
        "final_loss": {name: {metric: _number(task.final_loss(name, metric)) for metric in FINAL_METRICS}
                       for name in task.names()},
        "seconds_per_step": {name: _number(task.seconds_per_step(name), 4) for name in task.names()},
    }


def _summary_to_dict(table: Mapping[str, Mapping[str, metrics.Summary]]) -> dict[str, Any]:
    return {
        name: {figure: {k: _number(v) if isinstance(v, float) else v for k, v in asdict(s).items()}
               for figure, s in figures.items()}
        for name, figures in table.items()
    }


FINAL_METRICS = ("train", "valid")


def _fractions_to_dict(result: SuiteResult, group: str | None) -> dict[str, Any]:
    return {metric: {a: {b: _number(v) for b, v in row.items()} for a, row in
                     result.beat_fractions(metric, group).items()} for metric in FINAL_METRICS}


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
            "groups": {group: _summary_to_dict(result.summary(group)) for group in result.groups()},
        },
        "beat_fractions": {
            "all": _fractions_to_dict(result, None),
            "groups": {group: _fractions_to_dict(result, group) for group in result.groups()},
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


def _summary_lines(result: SuiteResult, group: str | None) -> list[str]:
    tasks = result.tasks_of(group)
    rows = []
    for name, figures in result.summary(group).items():
        compared = [t.comparisons[name] for t in tasks if name in t.comparisons]
        reached = sum(c.speedup.reached for c in compared)
        diverged = sum(c.diverged_seeds for c in compared)
        runs = sum(len(t.entry.seeds) for t in tasks if name in t.comparisons)
        speedup = figures["speedup"]
        rows.append([
            name, _fmt(speedup.median), _fmt(speedup.iqm), f"{_fmt(speedup.iqm_low)} - {_fmt(speedup.iqm_high)}",
            f"{reached}/{len(compared)}", _fmt(figures["train_loss_ratio"].median),
            _fmt(figures["valid_loss_ratio"].median), _fmt(figures["accuracy_ratio"].median), f"{diverged}/{runs}",
            _fmt(figures["time_ratio"].median),
        ])
    header = ["optimizer", "speedup median", "speedup IQM", "IQM 95% CI", "reached target",
              "train loss ratio (median)", "valid loss ratio (median)", "accuracy ratio (median)", "diverged runs",
              f"time/step vs {result.reference} (median)"]
    return _table(header, rows)


def _beat_lines(result: SuiteResult, metric: str, group: str | None) -> list[str]:
    table = result.beat_fractions(metric, group)
    baselines = list(next(iter(table.values())))
    rows = [[name, *("-" if math.isnan(v) else f"{v:.0%}" for v in row.values())] for name, row in table.items()]
    return _table([f"final {metric} loss below ...", *baselines], rows)


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


def plot_curves(result: SuiteResult, group: str, path: Path) -> Path:
    """One panel per task of ``group``: every optimizer's and baseline's seed-mean smoothed
    training loss, the tuned reference's envelope and its target."""
    tasks = result.tasks_of(group)
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
        ax.set_title(f"{task.entry.label} #{task.index}", fontsize=9)
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


def _speedup_matrix(result: SuiteResult) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(compared names, speedups ``(tasks, names)`` with NaN where not compared, reached flags)."""
    names = result.compared()
    comparisons = [[t.comparisons.get(name) for name in names] for t in result.tasks]
    values = np.array([[c.speedup.value if c else np.nan for c in row] for row in comparisons])
    reached = np.array([[bool(c and c.speedup.reached) for c in row] for row in comparisons])
    return names, values, reached


def plot_speedup_table(result: SuiteResult, path: Path) -> Path:
    """A heat map of speedups, one row per task and one column per compared optimizer, each cell
    printed; blue is faster than the tuned reference, red slower (log colour scale, 0.25 to 4),
    ``*`` marks capped values (target never reached)."""
    from matplotlib.colors import LogNorm

    names, values, reached = _speedup_matrix(result)
    tasks = result.tasks
    figure = Figure(figsize=(2.0 + 1.3 * len(names), 1.2 + 0.28 * len(tasks)), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(np.clip(values, 0.25, 4.0), cmap="RdBu", norm=LogNorm(0.25, 4.0), aspect="auto")
    for i in range(len(tasks)):
        for j in range(len(names)):
            if not math.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}" + ("" if reached[i, j] else "*"), ha="center", va="center",
                        fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), [t.entry.label for t in tasks], fontsize=7)
    ax.set_title(f"speedup over tuned {result.reference} (* = target never reached, capped)", fontsize=9)
    bar = figure.colorbar(image, ax=ax, shrink=0.8, label="speedup")
    bar.minorticks_off()
    bar.set_ticks([0.25, 0.5, 1.0, 2.0, 4.0], labels=["<=0.25", "0.5", "1", "2", ">=4"])
    figure.savefig(path, dpi=100)
    return path


def plot_profile(result: SuiteResult, path: Path) -> Path:
    """Performance profile: for every compared optimizer, the fraction of tasks whose speedup over
    the tuned reference is at least ``tau``, against ``tau`` (log axis). A task whose target it never
    reached counts as a failure at every ``tau`` (its capped value is an upper bound, not a speed).
    Higher and further right is better; the height at ``tau = 1`` is the fraction of tasks where it
    reaches the target at least as fast as the reference."""
    names, values, reached = _speedup_matrix(result)
    values = np.where(reached | np.isnan(values), values, 0.0)
    finite = values[np.isfinite(values) & (values > 0)]
    taus = np.geomspace(min(0.1, finite.min(initial=1.0)), max(10.0, finite.max(initial=1.0)), 400)
    figure = Figure(figsize=(6.5, 4), layout="constrained")
    ax = figure.subplots()
    for k, name in enumerate(names):
        column = values[:, k][~np.isnan(values[:, k])]
        ax.step(taus, [(column >= tau).mean() for tau in taus], where="post", lw=1.8, color=f"C{k}", label=name)
    ax.axvline(1.0, color="black", lw=1, ls=":")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"tau: speedup over tuned {result.reference}")
    ax.set_ylabel("fraction of tasks: target reached, speedup >= tau")
    ax.set_title(f"performance profile, suite {result.suite.name} ({len(result.tasks)} tasks)", fontsize=9)
    ax.legend(fontsize=7)
    figure.savefig(path, dpi=100)
    return path


#: Grouped bars get unreadable beyond this many bars; the heat map shows every suite.
MAX_BARS = 60


def write_report(
    result: SuiteResult, out_dir: str | Path, *, title: str | None = None, extra: Mapping[str, Any] | None = None
) -> ReportFiles:
    """Write ``report.md``, ``results.json``, ``speedup_table.png`` (heat map), ``profile.png``
    (performance profile), ``speedup.png`` (bars, for suites of at most :data:`MAX_BARS` bars) and
    one ``curves_<group>.png`` per entry group into ``out_dir`` (created if needed). ``extra`` is
    recorded in both files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(result_to_dict(result, extra), indent=1, allow_nan=False))
    summary_plots = [plot_speedup_table(result, out / "speedup_table.png"), plot_profile(result, out / "profile.png")]
    if len(result.tasks) * len(result.compared()) <= MAX_BARS:
        summary_plots.append(plot_speedups(result, out / "speedup.png"))
    curve_plots = [plot_curves(result, group, out / f"curves_{_file_part(group)}.png") for group in result.groups()]
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
    if len(result.groups()) > 1:
        for group in result.groups():
            lines += [f"### {group}", "", *_summary_lines(result, group), ""]
        lines += ["### all tasks", ""]
    lines += [*_summary_lines(result, None), ""]
    for metric in FINAL_METRICS:
        lines += [f"Fraction of tasks on which each optimizer's final {metric} loss is below each baseline's:", "",
                  *_beat_lines(result, metric, None), ""]
    for plot in [*summary_plots, *curve_plots]:
        lines += [f"![{plot.stem}]({plot.name})", ""]
    lines += ["## Per-task results", "", "`*`: target never reached; speedup capped.", "", *_task_lines(result), ""]
    lines += ["## Tuned learning rates", "", *_tuning_lines(result), ""]
    lines += ["All numbers, including every run's curve, are in `results.json`.", ""]
    markdown = out / "report.md"
    markdown.write_text("\n".join(lines))
    return ReportFiles(markdown, json_path, tuple(summary_plots + curve_plots))


def _file_part(text: str) -> str:
    """``text`` with every character other than letters, digits, '-' and '_' replaced by '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)
