"""Tasks and task families, with a registry to build a family by name."""

from __future__ import annotations

from metaoptimizer.tasks.augment import ReparamFamily
from metaoptimizer.tasks.broad import BroadImageFamily, CaseFoldedLMFamily
from metaoptimizer.tasks.base import HELDOUT, TRAIN, ModuleTask, Task, TaskFamily, split_seed
from metaoptimizer.tasks.digits import ClassifierFamily, DigitsCNNFamily, DigitsMLPFamily
from metaoptimizer.tasks.image8 import Digits8Family, MNIST8Family, Omniglot8Family, Synthetic8Family
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
    "digits8_mlp": Digits8Family,
    "mnist8_mlp": MNIST8Family,
    "omniglot8_mlp": Omniglot8Family,
    "synthetic8_mlp": Synthetic8Family,
    "general": GeneralTaskFamily,
    "broad_image": BroadImageFamily,
    "shakespeare_lc_lm": CaseFoldedLMFamily,
}


def make_family(name: str, *, augment: dict | None = None, **kwargs) -> TaskFamily:
    """The task family registered as ``name``, built with ``kwargs``.

    ``augment`` (the keyword arguments of :class:`~metaoptimizer.tasks.augment.ReparamFamily`,
    e.g. ``{"levels": ["global", "tensor"], "scale_range": [1e-3, 1e3]}``) reparameterises its tasks.
    """
    if name not in FAMILIES:
        raise ValueError(f"task family {name!r} is not known; accepted names: {sorted(FAMILIES)}")
    family = FAMILIES[name](**kwargs)
    if augment is None:
        return family
    if not isinstance(augment, dict):
        raise ValueError(f"augment must be a table of ReparamFamily options (levels, scale_range), got {augment!r}")
    return ReparamFamily(family, **augment)


__all__ = [
    "FAMILIES",
    "HELDOUT",
    "TRAIN",
    "BroadImageFamily",
    "CaseFoldedLMFamily",
    "CharRNNFamily",
    "ClassifierFamily",
    "Digits8Family",
    "DigitsCNNFamily",
    "DigitsMLPFamily",
    "MNIST8Family",
    "GeneralTaskFamily",
    "MNISTMLPFamily",
    "Omniglot8Family",
    "ModuleTask",
    "NoisyLineFamily",
    "NoisyLineTask",
    "QuadraticFamily",
    "QuadraticTask",
    "ReparamFamily",
    "SequenceTask",
    "Synthetic8Family",
    "Task",
    "TaskFamily",
    "make_family",
    "split_seed",
]
