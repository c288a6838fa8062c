"""MLP classifiers on MNIST read from a local folder (for benchmarks; tests use digits)."""

from __future__ import annotations

import os

from metaoptimizer.tasks.datasets import load_mnist
from metaoptimizer.tasks.digits import ClassifierFamily


class MNISTMLPFamily(ClassifierFamily):
    """MLPs on the 784 MNIST pixels of the training split in ``root`` (or ``$METAOPT_DATA_DIR``);
    each task uses a seeded subset of the 60,000 images. Options as in :class:`ClassifierFamily`."""

    def __init__(self, root: str | os.PathLike | None = None, **options) -> None:
        images, labels = load_mnist(root, "train")
        options.setdefault("n_examples", (2000, 5000, 10000))
        super().__init__(images.unsqueeze(1), labels, name="mnist_mlp", architecture="mlp", **options)
