"""The main job: meta-train the LSTM optimizer on the digits-MLP family, compare it against
learning-rate-tuned Adam on held-out tasks, and write a report.

Everything runs offline on CPU in a few minutes: digits ships with scikit-learn.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from metaoptimizer.config import MetaOptimizerConfig  # noqa: E402
from metaoptimizer.evaluate.baselines import default_baselines  # noqa: E402
from metaoptimizer.evaluate.report import write_report  # noqa: E402
from metaoptimizer.evaluate.runner import run_suite  # noqa: E402
from metaoptimizer.evaluate.suites import heldout_suite  # noqa: E402
from metaoptimizer.facade import MetaOptimizer  # noqa: E402
from metaoptimizer.meta.trainer import MetaTrainer  # noqa: E402
from metaoptimizer.tasks import make_family  # noqa: E402

FAMILY = "digits_mlp"

HORIZON = 200
#: The demo's rule: the spec's LSTM plus a skip path that starts it as Adam (lr 0.04, betas 0.9 and
#: 0.999) under a learned schedule of the training fraction, initialised as warmup + cosine over
#: ``HORIZON`` steps; meta-trained on log training loss (see rules/lstm.py and meta/unroll.py).
DEMO_CONFIG = MetaOptimizerConfig(
    method="lstm", meta_lr=1e-3, unroll_steps=20, meta_objective="log_train_loss",
    rule_options={"init_lr": 0.04, "momentum_decay": 0.9, "rms_decay": 0.999, "num_steps": HORIZON},
)


def meta_train(
    config: MetaOptimizerConfig, *, minutes: float, meta_steps: int | None, seed: int, log_path: Path
) -> MetaOptimizer:
    """Meta-train ``config``'s rule on the digits-MLP family until the time or step budget ends;
    ``seed`` seeds the rule's initial weights and the trainer's task draws."""
    torch.manual_seed(seed)
    meta = MetaOptimizer(None, config)
    trainer = MetaTrainer(
        meta.rule, make_family(FAMILY), meta_lr=config.meta_lr, unroll_steps=config.unroll_steps,
        horizon=HORIZON, gradient_clipping=config.gradient_clipping, meta_objective=config.meta_objective,
        second_order=config.second_order, seed=seed,
    )
    deadline = time.monotonic() + minutes * 60.0
    columns = (TextColumn("meta-training"), BarColumn(), TextColumn("{task.completed} steps {task.fields[info]}"),
               TimeElapsedColumn())
    with log_path.open("w", newline="") as handle, Progress(*columns) as progress:
        writer = csv.writer(handle)
        writer.writerow(["step", "meta_loss", "meta_grad_norm", "skipped", "seconds"])
        bar = progress.add_task("meta", total=meta_steps, info="")
        start = time.monotonic()
        done = 0
        while time.monotonic() < deadline and (meta_steps is None or done < meta_steps):
            result = trainer.step()
            done += 1
            writer.writerow([done, result.meta_loss, result.meta_grad_norm, int(result.skipped),
                             round(time.monotonic() - start, 3)])
            handle.flush()
            progress.update(bar, advance=1, info=f"meta-loss {result.meta_loss:.3f}")
    meta.meta_steps, meta.skipped_meta_steps = trainer.steps, trainer.skipped_steps
    return meta


def plot_meta_training(log_path: Path, out_path: Path) -> Path:
    """Meta-loss per step and its running mean."""
    data = np.genfromtxt(log_path, delimiter=",", names=True)
    loss = np.atleast_1d(data["meta_loss"])
    window = max(1, len(loss) // 20)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.atleast_1d(data["step"]), loss, alpha=0.3, label="meta-loss")
    ax.plot(np.arange(window, len(loss) + 1), np.convolve(loss, np.ones(window) / window, mode="valid"),
            label=f"running mean ({window})")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("mean log training loss over the unroll")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def run_demo(
    out_dir: str | Path, *, minutes: float = 3.0, meta_steps: int | None = None, tasks: int = 5,
    steps: int = HORIZON, seed: int = 0, seeds: tuple[int, ...] = (0, 1),
) -> Path:
    """Meta-train, save the rule, compare with tuned Adam on held-out tasks; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    meta = meta_train(DEMO_CONFIG, minutes=minutes, meta_steps=meta_steps, seed=seed,
                      log_path=out / "meta_training.csv")
    meta_seconds = time.monotonic() - started
    meta.save(out / "lstm_digits_mlp.pt")
    plot_meta_training(out / "meta_training.csv", out / "meta_training.png")
    adam = [b for b in default_baselines() if b.name == "adam"]
    suite = heldout_suite(family=FAMILY, num_tasks=tasks, steps=steps, seeds=seeds)
    result = run_suite(suite, {"lstm": lambda: meta.rule}, baselines=adam)
    files = write_report(
        result, out, title="metaoptimizer demo: meta-trained LSTM vs tuned Adam on held-out digits MLPs",
        extra={
            "meta_training": {
                "family": FAMILY, "config": DEMO_CONFIG.to_dict(), "horizon": HORIZON,
                "meta_steps": meta.meta_steps, "skipped_meta_steps": meta.skipped_meta_steps,
                "seconds": round(meta_seconds, 1), "log": "meta_training.csv", "plot": "meta_training.png",
                "checkpoint": "lstm_digits_mlp.pt",
            }
        },
    )
    with files.markdown.open("a") as handle:
        handle.write(
            f"\n## Meta-training\n\n{meta.meta_steps} meta-steps ({meta.skipped_meta_steps} skipped) in "
            f"{meta_seconds:.0f} s on the {FAMILY} family, truncations of {DEMO_CONFIG.unroll_steps} steps over "
            f"{HORIZON}-step inner runs. Log: `meta_training.csv`; checkpoint: `lstm_digits_mlp.pt`.\n\n"
            "![meta-training](meta_training.png)\n"
        )
    return files.markdown
