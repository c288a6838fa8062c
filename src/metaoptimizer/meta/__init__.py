"""Meta-training: unrolls, gradient estimators (truncated BPTT, ES, PES), the meta-trainer and its
fault-tolerant loop, episodic few-shot learners (MAML, Meta-SGD, Warp-Grad) and learned
hyperparameters of hand rules.

Public modules: ``unroll`` (the inner step and unrolls), ``runs`` (inner runs in progress),
``estimators``, ``trainer``, ``loop`` (``TrainingConfig``, checkpoints), ``distributed``,
``gradient_learner``, ``warp_grad``, ``hyperparams``. ``_vectorized`` (the ``torch.func`` unroll
of many particles and tasks) and ``_step`` (clipping and applying a meta-gradient) are internal:
the estimators and trainers use them, and their names may change.
"""

from __future__ import annotations

from metaoptimizer.meta.estimators import (
    ESTIMATORS,
    PES,
    FullES,
    PESParticles,
    TaskNormalization,
    TruncatedBPTT,
    TruncatedES,
    make_estimator,
)
from metaoptimizer.meta.gradient_learner import GradientMetaLearner
from metaoptimizer.meta.hyperparams import LearnedHyperparameters
from metaoptimizer.meta.loop import TrainingConfig, build_trainer, run_meta_training
from metaoptimizer.meta.runs import TaskRun
from metaoptimizer.meta.trainer import MetaTrainer, Phase
from metaoptimizer.meta.unroll import unroll
from metaoptimizer.meta.warp_grad import WarpGradLearner

__all__ = [
    "ESTIMATORS",
    "PES",
    "FullES",
    "GradientMetaLearner",
    "LearnedHyperparameters",
    "MetaTrainer",
    "PESParticles",
    "Phase",
    "TaskNormalization",
    "TaskRun",
    "TrainingConfig",
    "TruncatedBPTT",
    "TruncatedES",
    "WarpGradLearner",
    "build_trainer",
    "make_estimator",
    "run_meta_training",
    "unroll",
]
