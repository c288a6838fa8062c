"""``metaopt lr-example``: optax's meta-learning example, reproduced.

Fit ``y = 10 x + N(0, 1)`` with the model ``x * theta`` (:class:`~metaoptimizer.tasks.line.NoisyLineTask`)
by RMSProp whose learning rate (starting at 0.1, sigmoid-parametrised,
:class:`~metaoptimizer.meta.hyperparams.LearnedHyperparameters`) is meta-trained by Adam(0.03) on
7 samples per outer step (6 inner updates, the loss on the 7th sample as the meta-loss), for 2000
outer steps; plot the learned rate and theta.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from matplotlib.figure import Figure

from metaoptimizer.cli._common import out_option, usage_errors
from metaoptimizer.config import MetaOptTrainResult, check_positive
from metaoptimizer.meta.hyperparams import LearnedHyperparameters
from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.tasks.line import NoisyLineFamily

__all__ = ["LineFitTrace", "lr_example", "meta_learn_line_fit", "plot_line_fit"]


@dataclass
class LineFitTrace:
    """The learned learning rate and theta after each outer step of :func:`meta_learn_line_fit`."""

    lrs: list[float] = field(default_factory=list)
    thetas: list[float] = field(default_factory=list)
    results: list[MetaOptTrainResult] = field(default_factory=list)

    def summary(self, window: int = 100) -> dict[str, float]:
        """Start, peak and end values (steps are 1-based) and the means of the last ``window`` outer steps."""
        tail = slice(-min(window, len(self.lrs)), None)
        peak = max(range(len(self.lrs)), key=self.lrs.__getitem__)
        return {
            "outer_steps": len(self.lrs),
            "lr_after_first_step": self.lrs[0],
            "lr_max": self.lrs[peak],
            "lr_max_step": peak + 1,
            "lr_final": self.lrs[-1],
            "theta_after_first_step": self.thetas[0],
            "theta_at_lr_max": self.thetas[peak],
            "theta_final": self.thetas[-1],
            f"theta_mean_last_{window}": sum(self.thetas[tail]) / len(self.thetas[tail]),
            f"lr_mean_last_{window}": sum(self.lrs[tail]) / len(self.lrs[tail]),
        }


def meta_learn_line_fit(
    outer_steps: int = 2000,
    samples_per_step: int = 7,
    inner_lr: float = 0.1,
    meta_lr: float = 0.03,
    seed: int = 0,
) -> LineFitTrace:
    """optax's example: meta-learn RMSProp's (sigmoid) lr while it fits ``y = 10 x + N(0, 1)``.

    One inner run continues over all outer steps. Each outer step makes ``samples_per_step - 1``
    RMSProp updates of theta, one sample each, and differentiates (second order, as ``jax.grad``
    does) the loss on one more sample with respect to the lr's meta-parameter, which Adam(``meta_lr``)
    then steps. RMSProp is optax's: decay 0.9 and ``g / sqrt(v + 1e-8)``.
    """
    check_positive("outer_steps", outer_steps, integer=True)
    check_positive("samples_per_step", samples_per_step, integer=True)
    if samples_per_step < 2:
        raise ValueError(f"samples_per_step must be >= 2 (inner samples plus the meta-loss sample), got {samples_per_step}")
    inner_steps = samples_per_step - 1
    rule = LearnedHyperparameters(
        "rmsprop", inner_lr, lr_parametrisation="sigmoid", param_names=["theta"], alpha=0.9, eps=0.0, eps_root=1e-8
    )
    trainer = MetaTrainer(
        rule,
        NoisyLineFamily(),
        meta_lr=meta_lr,
        unroll_steps=inner_steps,
        run_steps=(outer_steps + 1) * inner_steps,  # never finished, so never replaced by a fresh run
        gradient_clipping=None,
        meta_objective="valid_loss",
        second_order=True,
        seed=seed,
    )
    trace = LineFitTrace()
    for _ in range(outer_steps):
        trace.results.append(trainer.step())
        trace.lrs.append(rule.learned_lr()["theta"])
        trace.thetas.append(float(trainer.runs[0].params["theta"]))
    return trace


def plot_line_fit(trace: LineFitTrace, path: str | Path) -> None:
    """Two panels, as in optax's notebook: the learned lr (log scale) and theta, per outer step."""
    steps = range(1, len(trace.lrs) + 1)
    fig = Figure(figsize=(6, 5))
    ax_lr, ax_theta = fig.subplots(2, sharex=True)
    fig.suptitle("Meta-learning RMSProp's learning rate (y = 10x + N(0, 1))")
    ax_lr.semilogy(steps, trace.lrs)
    ax_lr.set_ylabel("learned lr")
    ax_theta.plot(steps, trace.thetas)
    ax_theta.axhline(10.0, color="grey", linestyle="--", linewidth=0.8)
    ax_theta.set_ylabel("theta")
    ax_theta.set_xlabel("outer step")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def lr_example(
    out: Annotated[Path, out_option("Folder for lr_example.png and lr_example.json.")] = Path("docs/img"),
    outer_steps: Annotated[int, typer.Option(min=1, help="Outer (meta) steps.")] = 2000,
    samples_per_step: Annotated[int, typer.Option(min=2, help="Samples per outer step (inner updates + 1).")] = 7,
    inner_lr: Annotated[float, typer.Option(help="RMSProp's starting learning rate.")] = 0.1,
    meta_lr: Annotated[float, typer.Option(help="Adam's learning rate for the meta-parameter.")] = 0.03,
    seed: Annotated[int, typer.Option(help="Seed of the inner run.")] = 0,
) -> dict[str, float]:
    """Reproduce optax's meta-learning example; write the plot and the numbers, print the numbers."""
    with usage_errors():
        trace = meta_learn_line_fit(outer_steps, samples_per_step, inner_lr, meta_lr, seed)
    summary = trace.summary()
    out.mkdir(parents=True, exist_ok=True)
    plot_line_fit(trace, out / "lr_example.png")
    (out / "lr_example.json").write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(json.dumps(summary, indent=2))
    return summary

