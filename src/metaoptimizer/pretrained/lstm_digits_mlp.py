"""The recipe of the shipped ``lstm-digits-mlp``: its rule, task family, horizon and meta-training loop.

``metaopt pretrain lstm-digits-mlp`` and ``metaopt demo`` both meta-train with it, so the demo
shows how the shipped checkpoint was made.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metaoptimizer.config import MetaOptimizerConfig, check_positive
from metaoptimizer.facade import MetaOptimizer
from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.progress import Progress, ProgressCallback
from metaoptimizer.tasks import make_family

__all__ = ["CONFIG", "FAMILY", "HORIZON", "LOG_FIELDS", "META_STEPS", "SEED", "meta_train", "start"]

FAMILY = "digits_mlp"
HORIZON = 200
META_STEPS = 200
SEED = 0
#: The spec's LSTM plus a skip path that starts it as Adam (lr 0.04, betas 0.9 and 0.999) under a
#: learned schedule of the training fraction, initialised as warmup + cosine over ``HORIZON``
#: steps; meta-trained on log training loss (see rules/lstm.py and meta/unroll.py).
CONFIG = MetaOptimizerConfig(
    method="lstm", meta_lr=1e-3, unroll_steps=20, meta_objective="log_train_loss",
    rule_options={"init_lr": 0.04, "momentum_decay": 0.9, "rms_decay": 0.999, "num_steps": HORIZON},
)
LOG_FIELDS = ("step", "meta_loss", "meta_grad_norm", "skipped", "seconds")


def start(config: MetaOptimizerConfig = CONFIG, seed: int = SEED) -> tuple[MetaOptimizer, MetaTrainer]:
    """The untrained optimizer and its trainer on the family; ``seed`` seeds the rule's initial
    weights and the trainer's task draws."""
    torch.manual_seed(seed)
    meta = MetaOptimizer(None, config)
    trainer = MetaTrainer(
        meta.rule, make_family(FAMILY), meta_lr=config.meta_lr, unroll_steps=config.unroll_steps,
        horizon=HORIZON, gradient_clipping=config.gradient_clipping, meta_objective=config.meta_objective,
        second_order=config.second_order, seed=seed,
    )
    return meta, trainer


def meta_train(
    meta: MetaOptimizer, trainer: MetaTrainer, num_steps: int, *, log_path: str | Path,
    progress: ProgressCallback | None = None, after_step: Callable[[int], None] | None = None,
) -> None:
    """Run ``num_steps`` meta-steps of ``trainer`` (applied or skipped), one CSV row each in
    ``log_path`` (columns :data:`LOG_FIELDS`); ``meta`` records the counts. After each step
    ``after_step(steps_done)`` runs (e.g. a meta-validation), then ``progress`` hears of it."""
    check_positive("num_steps", num_steps, integer=True)
    started = time.monotonic()
    with Path(log_path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LOG_FIELDS)
        for done in range(1, num_steps + 1):
            result = trainer.step()
            writer.writerow([done, result.meta_loss, result.meta_grad_norm, int(result.skipped),
                             round(time.monotonic() - started, 3)])
            handle.flush()
            if after_step is not None:
                after_step(done)
            if progress is not None:
                progress(Progress("meta-training", done, num_steps, f"meta-loss {result.meta_loss:.3f}"))
    meta.meta_steps, meta.skipped_meta_steps = trainer.steps, trainer.skipped_steps
