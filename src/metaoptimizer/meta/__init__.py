"""Meta-training: unrolls, gradient estimators (truncated BPTT, ES, PES), the meta-trainer and its
fault-tolerant loop, episodic few-shot learners (MAML, Meta-SGD, Warp-Grad) and learned
hyperparameters of hand rules."""

from __future__ import annotations

from metaoptimizer.meta.estimators import ESTIMATORS, make_estimator
from metaoptimizer.meta.gradient_learner import GradientMetaLearner
from metaoptimizer.meta.hyperparams import LearnedHyperparameters
from metaoptimizer.meta.loop import TrainingConfig, build_trainer, run_meta_training
from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.meta.unroll import unroll
from metaoptimizer.meta.warp_grad import WarpGradLearner

__all__ = [
    "ESTIMATORS",
    "GradientMetaLearner",
    "LearnedHyperparameters",
    "MetaTrainer",
    "TrainingConfig",
    "WarpGradLearner",
    "build_trainer",
    "make_estimator",
    "run_meta_training",
    "unroll",
]
