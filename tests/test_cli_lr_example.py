"""optax's meta-learning example: the noisy-line task, the line fit's direction of travel, and
``metaopt lr-example``."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from metaoptimizer.cli import app
from metaoptimizer.cli.lr_example import meta_learn_line_fit
from metaoptimizer.tasks import make_family
from metaoptimizer.tasks.line import NoisyLineFamily, NoisyLineTask


def test_noisy_line_task_loss_and_batches():
    task = NoisyLineTask(samples_per_batch=5)
    x, y = next(task.train_batches(0))
    assert x.shape == (5,) and bool((x >= 0).all() and (x <= 10).all())
    assert float((y - 10 * x).abs().max()) < 5.0
    loss = task.loss({"theta": torch.tensor(10.0)}, (x, y))
    assert float(loss) == pytest.approx(float(0.5 * (10 * x - y).square().mean()))
    again = next(task.train_batches(0))
    assert torch.equal(again[0], x)
    assert not torch.equal(next(task.valid_batches(0))[0], x)
    assert isinstance(NoisyLineFamily(noise_std=0.5).task(3), NoisyLineTask)
    assert isinstance(make_family("noisy_line").task(0), NoisyLineTask)


def test_line_fit_lr_rises_then_decays_while_theta_reaches_ten():
    """Direction of travel of optax's example over 150 outer steps (the docs run 2000)."""
    trace = meta_learn_line_fit(outer_steps=150)
    peak = max(range(len(trace.lrs)), key=trace.lrs.__getitem__)
    assert trace.lrs[peak] > trace.lrs[0]  # far from the answer, larger steps help
    assert peak < 100 and trace.lrs[-1] < trace.lrs[peak]  # once there, the noise calls for smaller ones
    summary = trace.summary(window=50)
    assert abs(summary["theta_mean_last_50"] - 10.0) < 0.5
    assert trace.thetas[0] < 5.0
    assert not any(r.skipped for r in trace.results)


def test_lr_example_command_writes_plot_and_numbers(tmp_path):
    outcome = CliRunner().invoke(app, ["lr-example", "--out", str(tmp_path), "--outer-steps", "5", "--seed", "1"])
    assert outcome.exit_code == 0, outcome.output
    assert (tmp_path / "lr_example.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "lr_example.json").read_text())
    assert summary["outer_steps"] == 5 and '"lr_final"' in outcome.output


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--outer-steps", "0"], "outer-steps"), (["--samples-per-step", "1"], "samples-per-step"),
     (["--meta-lr", "-0.1"], "meta_lr")],
)
def test_lr_example_bad_options_are_usage_errors(tmp_path, args, message):
    outcome = CliRunner().invoke(app, ["lr-example", "--out", str(tmp_path), *args])
    assert outcome.exit_code == 2 and message in outcome.output
    assert outcome.exception is None or isinstance(outcome.exception, SystemExit)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(outer_steps=0), "outer_steps"),
        (dict(samples_per_step=1), "samples_per_step"),
        (dict(meta_lr=-0.1), "meta_lr"),
    ],
)
def test_line_fit_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        meta_learn_line_fit(**kwargs)


def test_noisy_line_bad_arguments():
    with pytest.raises(ValueError, match="noise_std"):
        NoisyLineFamily(noise_std=-1.0)
    with pytest.raises(ValueError, match="samples_per_batch"):
        NoisyLineTask(samples_per_batch=0)
