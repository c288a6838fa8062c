"""End to end: a tiny digits suite with a diverging rule, written as markdown, JSON and PNG."""

import json
import math

import numpy as np
import pytest
import torch

from metaoptimizer.evaluate import metrics
from metaoptimizer.evaluate.baselines import TuningResult
from metaoptimizer.evaluate.report import curve_to_dict, plot_curves, result_to_dict, write_report
from metaoptimizer.evaluate.runner import Curve, SuiteResult, TaskResult, compare, run_suite
from metaoptimizer.evaluate.suites import Suite, SuiteEntry
from metaoptimizer.rules.hand import SGD, Adam

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test setting
    kwargs = {"widths": 16, "depths": 1, "activations": "relu", "n_examples": 200}
    entries = (
        SuiteEntry("relu_a", "digits_mlp", (0,), 12, (0,), kwargs, eval_batches=2),
        SuiteEntry("relu_b", "digits_mlp", (1,), 12, (0,), kwargs, eval_batches=2),
    )
    suite = Suite("tiny", "two tiny digits entries", entries)
    optimizers = {"adam_fixed": lambda: Adam(lr=0.01), "sgd_huge": lambda: SGD(lr=1e30)}
    return run_suite(suite, optimizers)


@pytest.fixture(scope="module")
def files(result, tmp_path_factory):
    return write_report(result, tmp_path_factory.mktemp("report"), extra={"optimizer": "hand rules", "training": {"steps": 3, "seed": 0}})


def test_report_writes_markdown_json_and_plots(files):
    assert files.markdown.name == "report.md" and files.json.name == "results.json"
    assert sorted(p.name for p in files.plots) == [
        "curves_relu_a.png", "curves_relu_b.png", "profile.png", "speedup.png", "speedup_table.png"]
    for plot in files.plots:
        assert plot.read_bytes().startswith(PNG_SIGNATURE) and plot.stat().st_size > 5000


def test_markdown_has_protocol_summaries_per_entry_and_every_task(files, result):
    text = files.markdown.read_text()
    for heading in ("## Protocol", "## Summary over tasks", "### relu_a", "### relu_b", "### all tasks",
                    "## Per-task results", "## Tuned learning rates"):
        assert heading in text
    assert "- optimizer: hand rules" in text
    assert "- training:\n  - steps: 3\n  - seed: 0\n" in text  # nested extras one per line
    for plot in ("speedup.png", "speedup_table.png", "profile.png", "curves_relu_a.png"):
        assert f"]({plot})" in text
    assert "IQM 95% CI" in text and "time/step vs adam (median)" in text
    assert "final train loss below ..." in text and "final valid loss below ..." in text
    for task in result.tasks:
        assert f"`{task.task_name}`" in text
    huge = [line for line in text.splitlines() if "| sgd_huge |" in line and "`digits_mlp:" in line]
    assert len(huge) == 2 and all("*" in line.split("|")[5] for line in huge)  # capped, never reached


def test_json_holds_every_number_and_encodes_divergence_as_strings(files, result):
    data = json.loads(files.json.read_text())
    assert data["suite"]["name"] == "tiny" and data["protocol"]["reference"] == "adam"
    assert data["extra"] == {"optimizer": "hand rules", "training": {"steps": 3, "seed": 0}}
    assert len(data["tasks"]) == 2
    for stored, task in zip(data["tasks"], result.tasks, strict=True):
        for name, comparison in task.comparisons.items():
            assert stored["comparisons"][name]["speedup"] == pytest.approx(comparison.speedup.value)
            assert stored["comparisons"][name]["reached"] == comparison.speedup.reached
        adam = stored["baselines"]["adam"]
        assert adam["best_lr"] == task.baselines["adam"].best_lr and len(adam["lrs"]) == 8
        assert len(adam["runs"][str(adam["best_lr"])][0]["train_loss"]) == 12
        huge = stored["optimizers"]["sgd_huge"][0]
        assert huge["diverged_at"] is not None and huge["train_loss"][-1] == "inf"
        assert stored["comparisons"]["sgd_huge"]["diverged_seeds"] == 1
    speedups = [t["comparisons"]["adam_fixed"]["speedup"] for t in data["tasks"]]
    summary = data["summary"]["all"]["adam_fixed"]["speedup"]
    assert summary["median"] == pytest.approx(float(np.median(speedups)))
    assert summary["iqm"] == pytest.approx(metrics.interquartile_mean(speedups))
    assert data["summary"]["groups"]["relu_b"]["adam_fixed"]["speedup"]["count"] == 1
    assert summary["iqm_low"] <= summary["iqm"] <= summary["iqm_high"]


def test_beat_fractions_count_tasks_with_a_strictly_lower_final_loss(result, files):
    table = result.beat_fractions("train")
    assert set(table) == {"adam_fixed", "sgd_huge", "adam", "momentum", "rmsprop"}
    assert set(table["adam_fixed"]) == {"adam", "momentum", "rmsprop"}
    assert table["sgd_huge"]["adam"] == 0.0  # diverged: +inf never beats
    assert math.isnan(table["adam"]["adam"])
    expected = np.mean([t.final_loss("adam_fixed", "valid") < t.final_loss("rmsprop", "valid") for t in result.tasks])
    assert result.beat_fractions("valid")["adam_fixed"]["rmsprop"] == expected
    data = json.loads(files.json.read_text())
    assert data["beat_fractions"]["all"]["train"]["sgd_huge"]["adam"] == 0.0
    with pytest.raises(ValueError, match="accepted values"):
        result.beat_fractions("test")


def test_time_ratio_is_seconds_per_step_over_the_reference(result):
    task = result.tasks[0]
    adam_runs = [c for lr in task.baselines["adam"].lrs for c in task.baselines["adam"].runs[lr]]
    expected = np.mean([c.seconds for c in task.optimizers["adam_fixed"]]) / np.mean([c.seconds for c in adam_runs])
    assert task.time_ratio("adam_fixed", "adam") == pytest.approx(expected)
    assert result.summary()["adam_fixed"]["time_ratio"].count == 2


def test_diverged_optimizer_scores_zero_accuracy_and_infinite_loss(result):
    for task in result.tasks:
        huge = task.comparisons["sgd_huge"]
        assert huge.diverged_seeds == 1 and not huge.speedup.reached
        assert huge.final_valid_loss == math.inf and huge.final_accuracy == 0.0
        assert huge.accuracy_ratio == 0.0


def test_json_numbers_round_trip_non_finite_values():
    curve = Curve(np.array([1.5, math.inf]), np.array([0, 2]), {"loss": np.array([math.nan, -math.inf])}, 2, 0.123456)
    data = curve_to_dict(curve)
    assert data == {"train_loss": [1.5, "inf"], "eval_steps": [0, 2], "eval_metrics": {"loss": ["nan", "-inf"]},
                    "diverged_at": 2, "seconds": 0.1235}
    json.dumps(data, allow_nan=False)


def test_result_to_dict_is_strict_json(result):
    json.dumps(result_to_dict(result), allow_nan=False)


def test_curve_plots_hide_unused_panels_and_skip_diverged_stretches(tmp_path):
    """Five hand-made tasks on a 4-column grid; one optimizer diverges half way."""
    t = np.arange(1, 21, dtype=float)
    entry = SuiteEntry("hand", "digits_mlp", tuple(range(5)), 20, (0,))
    evaluations = {"loss": np.array([1.0, 0.5])}
    curve = lambda losses: Curve(np.asarray(losses), np.array([0, 20]), evaluations, None, 0.0)  # noqa: E731
    result = SuiteResult(Suite("hand", "hand-made curves", (entry,)), reference="adam", window_fraction=0.05,
                         tuner="grid")
    for index in entry.task_indices:
        tuning = TuningResult("adam", window=1)
        tuning.add(0.1, [curve(1 / t)])
        tuning.add(1.0, [curve(np.r_[1 / t[:10], np.full(10, np.inf)])])
        optimizers = {"fast": [curve(1 / (2 * t))], "broken": [curve(np.r_[1 / t[:10], np.full(10, np.nan)])]}
        comparisons = {name: compare(c, tuning, 1) for name, c in optimizers.items()}
        task = TaskResult(entry, index, f"hand task {index}", 1, optimizers, {"adam": tuning}, comparisons)
        result.tasks.append(task)
    path = plot_curves(result, "hand", tmp_path / "curves.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    fast, broken = result.tasks[0].comparisons.values()
    assert (fast.speedup.value, fast.speedup.reached) == (2.0, True)
    assert (broken.speedup.value, broken.speedup.reached) == (1.0, False)  # capped at 20 / 20
