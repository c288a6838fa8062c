"""The Celo recipe's meta-training tasks: one-hidden-layer MLPs on 8x8 images, 10 classes.

Every task is ``64 -> hidden (32) -> 10`` with ReLU (2,410 parameters at 32 hidden units),
minibatches of 64, cross-entropy; inputs are standardised by the task's training part. The
families differ only in their images, so all their tasks compute the same loss function and run
in one vmapped call:

* :class:`Digits8Family`: scikit-learn's digits (already 8x8), a seeded shuffle per task;
* :class:`MNIST8Family`: MNIST's training split area-downsampled to 8x8, a seeded subset per task;
* :class:`Omniglot8Family`: Omniglot's background split downsampled to 8x8; a task is a seeded
  choice of 10 classes among the 964 characters x 4 rotations, 20 drawings each;
* :class:`Synthetic8Family`: 10 smooth random class prototypes per task, examples are a
  prototype plus Gaussian noise of a per-task level (no data files).

MNIST and Omniglot are read from a local data folder (``root``, or ``$METAOPT_DATA_DIR``).
"""

from __future__ import annotations

import os
from abc import abstractmethod
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metaoptimizer._validation import check_positive
from metaoptimizer.tasks.base import ModuleTask, TaskFamily
from metaoptimizer.tasks.datasets import data_dir, load_mnist, load_omniglot, resize_images
from metaoptimizer.tasks.digits import ClassifierSpec, build_classifier, load_digits_tensors, standardised_split
from metaoptimizer.tasks.sampling import DATA_STREAM, check_fraction, task_rng

__all__ = ["Digits8Family", "Image8Family", "MNIST8Family", "Omniglot8Family", "Synthetic8Family"]

IMAGE_SIZE = 8
NUM_CLASSES = 10
INPUT_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)


class Image8Family(TaskFamily):
    """Base of the 8x8 families: ``examples(seed)`` gives a task's images and labels, this class
    turns them into an MLP task with ``hidden`` units, ``batch_size`` and ``valid_fraction``
    of the examples held out for validation batches."""

    def __init__(
        self, *, hidden: int = 32, batch_size: int = 64, valid_fraction: float = 0.2,
        device: torch.device | str | None = None,
    ) -> None:
        check_positive("hidden", hidden, integer=True)
        check_positive("batch_size", batch_size, integer=True)
        check_fraction("valid_fraction", valid_fraction)
        self.hidden = hidden
        self.batch_size = batch_size
        self.valid_fraction = valid_fraction
        self.device = device

    @abstractmethod
    def examples(self, seed: int) -> tuple[Tensor, Tensor]:
        """Task ``seed``'s images ``float (N, 1, 8, 8)`` and labels ``int64 (N,)`` in 0..9, shuffled."""

    def sample(self, seed: int) -> ModuleTask:
        x, y = self.examples(seed)
        n_valid = min(len(x) - 1, max(1, round(len(x) * self.valid_fraction)))
        train, valid = standardised_split(x.to(self.device), y.to(self.device), n_valid)
        spec = ClassifierSpec("mlp", (self.hidden,), "relu", 1.0, len(x))
        device = self.device
        return ModuleTask(
            name=f"{self.name}:seed={seed}",
            model_factory=lambda: build_classifier(spec, INPUT_SHAPE, NUM_CLASSES).to(device),
            train_data=train,
            valid_data=valid,
            batch_size=self.batch_size,
        )


class _SubsetFamily(Image8Family):
    """A family whose task ``seed`` is a seeded subset of ``n_examples`` of fixed images."""

    def __init__(self, images: tuple[Tensor, Tensor], n_examples: int, source: str, **options) -> None:
        super().__init__(**options)
        self.x, self.y = images
        check_positive("n_examples", n_examples, integer=True)
        if n_examples > len(self.x):
            raise ValueError(f"n_examples={n_examples} exceeds the {len(self.x)} {source}")
        self.n_examples = n_examples

    def examples(self, seed: int) -> tuple[Tensor, Tensor]:
        rows = torch.from_numpy(task_rng(seed, DATA_STREAM).permutation(len(self.x))[: self.n_examples])
        return self.x[rows], self.y[rows]


class Digits8Family(_SubsetFamily):
    """scikit-learn's digits; each task a seeded shuffle of ``n_examples`` of the 1,797 images."""

    name = "digits8_mlp"

    def __init__(self, n_examples: int = 1797, **options) -> None:
        super().__init__(load_digits_tensors(), n_examples, "digits images", **options)


@lru_cache(maxsize=2)
def _mnist8(root: str) -> tuple[Tensor, Tensor]:
    images, labels = load_mnist(root, "train")
    return resize_images(images, IMAGE_SIZE).unsqueeze(1), labels


class MNIST8Family(_SubsetFamily):
    """MNIST's 60,000 training images at 8x8; each task a seeded subset of ``n_examples``."""

    name = "mnist8_mlp"

    def __init__(self, root: str | os.PathLike | None = None, n_examples: int = 10000, **options) -> None:
        super().__init__(_mnist8(str(data_dir(root))), n_examples, "MNIST training images", **options)


@lru_cache(maxsize=2)
def _omniglot8(root: str) -> Tensor:
    """Background characters at 8x8, with rotations: ``(964, 4, 20, 8, 8)`` ink fractions."""
    small = resize_images(load_omniglot(root, "background").images, IMAGE_SIZE)
    return torch.stack([torch.rot90(small, k, dims=(-2, -1)) for k in range(4)], dim=1)


class Omniglot8Family(Image8Family):
    """Omniglot background characters at 8x8: each task classifies 10 seeded (character,
    rotation) classes, all 20 drawings of each (200 examples)."""

    name = "omniglot8_mlp"

    def __init__(self, root: str | os.PathLike | None = None, **options) -> None:
        super().__init__(**options)
        self.images = _omniglot8(str(data_dir(root)))

    def examples(self, seed: int) -> tuple[Tensor, Tensor]:
        characters, rotations, drawers = self.images.shape[:3]
        rng = task_rng(seed, DATA_STREAM)
        classes = rng.choice(characters * rotations, NUM_CLASSES, replace=False)
        x = torch.stack([self.images[c // rotations, c % rotations] for c in classes])  # (10, 20, 8, 8)
        y = torch.arange(NUM_CLASSES).repeat_interleave(drawers)
        order = torch.from_numpy(rng.permutation(len(y)))
        return x.reshape(-1, *INPUT_SHAPE)[order], y[order]


class Synthetic8Family(Image8Family):
    """Synthetic 8x8 images: per task, 10 smooth random prototypes (Gaussian noise blurred by a
    3x3 box filter, unit RMS) and ``n_examples`` examples, each a prototype plus pixel noise of
    a level drawn log-uniformly from ``noise_range``."""

    name = "synthetic8_mlp"

    def __init__(self, n_examples: int = 2000, noise_range: tuple[float, float] = (0.3, 1.5), **options) -> None:
        super().__init__(**options)
        check_positive("n_examples", n_examples, integer=True)
        if n_examples < 2:
            raise ValueError(f"n_examples must be >= 2 (training and validation), got {n_examples}")
        if not isinstance(noise_range, (list, tuple)) or len(noise_range) != 2:
            raise ValueError(f"noise_range must be a pair (low, high), got {noise_range!r}")
        for value in noise_range:
            check_positive("noise_range bound", value)
        if noise_range[0] > noise_range[1]:
            raise ValueError(f"noise_range needs low <= high, got {tuple(noise_range)}")
        self.n_examples = n_examples
        self.noise_range = (float(noise_range[0]), float(noise_range[1]))

    def examples(self, seed: int) -> tuple[Tensor, Tensor]:
        rng = task_rng(seed, DATA_STREAM)
        raw = torch.from_numpy(rng.standard_normal((NUM_CLASSES, 1, IMAGE_SIZE + 2, IMAGE_SIZE + 2)).astype(np.float32))
        prototypes = F.avg_pool2d(raw, 3, stride=1)
        prototypes = prototypes / prototypes.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
        noise = float(np.exp(rng.uniform(*np.log(self.noise_range))))
        y = torch.from_numpy(rng.integers(NUM_CLASSES, size=self.n_examples))
        pixels = torch.from_numpy(rng.standard_normal((self.n_examples, *INPUT_SHAPE)).astype(np.float32))
        return prototypes[y] + noise * pixels, y
