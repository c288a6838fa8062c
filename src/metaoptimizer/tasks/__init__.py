"""Tasks and task families, with a registry to build a family by name."""

from __future__ import annotations

from metaoptimizer.tasks.base import HELDOUT, TRAIN, ModuleTask, Task, TaskFamily, split_seed
from metaoptimizer.tasks.digits import ClassifierFamily, DigitsCNNFamily, DigitsMLPFamily
from metaoptimizer.tasks.general import GeneralTaskFamily
from metaoptimizer.tasks.line import NoisyLineFamily, NoisyLineTask
from metaoptimizer.tasks.mnist import MNISTMLPFamily
from metaoptimizer.tasks.quadratic import QuadraticFamily, QuadraticTask
from metaoptimizer.tasks.sequence import CharRNNFamily, SequenceTask

FAMILIES: dict[str, type[TaskFamily]] = {
    "quadratic": QuadraticFamily,
    "digits_mlp": DigitsMLPFamily,
    "digits_cnn": DigitsCNNFamily,
    "char_rnn": CharRNNFamily,
    "mnist_mlp": MNISTMLPFamily,
    "noisy_line": NoisyLineFamily,
    "general": GeneralTaskFamily,
}


def make_family(name: str, **kwargs) -> TaskFamily:
    """The task family registered as ``name``, built with ``kwargs``."""
    if name not in FAMILIES:
        raise ValueError(f"task family {name!r} is not known; accepted names: {sorted(FAMILIES)}")
    return FAMILIES[name](**kwargs)


__all__ = [
    "FAMILIES",
    "HELDOUT",
    "TRAIN",
    "CharRNNFamily",
    "ClassifierFamily",
    "DigitsCNNFamily",
    "DigitsMLPFamily",
    "GeneralTaskFamily",
    "MNISTMLPFamily",
    "ModuleTask",
    "NoisyLineFamily",
    "NoisyLineTask",
    "QuadraticFamily",
    "QuadraticTask",
    "SequenceTask",
    "Task",
    "TaskFamily",
    "make_family",
    "split_seed",
]
