"""Few-shot episodes and seeded samplers over task distributions.

An :class:`Episode` is one task of a few-shot problem: a support set to adapt on and a query set
to evaluate (or meta-train) on. A :class:`TaskDistributionSampler` draws episodes as a pure
function of ``(split, seed, index)``, so a batch of episodes, or a 600-episode meta-test, is the
same on every run and every machine. Meta-learners (MAML, Meta-SGD, Warp-Grad) only see episodes,
never the data sets behind them.

Class splits (meta-train and meta-test classes never overlap):

* digits (scikit-learn, 10 classes of 8x8 images): digits 0-4 are meta-train, 5-9 meta-test.
  Each digit also gives a 90-degree-rotated class (as rotations do for Omniglot), so each split
  holds 10 classes and a 5-way episode picks 5 of them. 180/270-degree rotations are left out by
  default: they make 0, 1 and 8 near-copies of themselves and turn 6 into 9.
* Omniglot (a local folder): the background alphabets (964 characters) are meta-train, the
  evaluation alphabets (659 characters) meta-test; each character rotated by 0/90/180/270 degrees
  is a class (Santoro et al. 2016; Finn et al. 2017). Images are downsampled to 28x28, ink = 1.
"""

from __future__ import annotations

import functools
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metaoptimizer.config import check_positive
from metaoptimizer.tasks.base import Batch
from metaoptimizer.tasks.datasets import load_omniglot, resize_images

SPLITS = ("train", "valid", "test")
DIGITS_CLASSES = {"train": (0, 1, 2, 3, 4), "test": (5, 6, 7, 8, 9)}
DIGITS_ROTATIONS = (0, 90)
OMNIGLOT_SPLITS = {"train": "background", "test": "evaluation"}
OMNIGLOT_ROTATIONS = (0, 90, 180, 270)


@dataclass(frozen=True)
class Episode:
    """Support and query sets of one few-shot task.

    ``num_classes`` marks a classification episode (integer labels in ``[0, num_classes)``);
    ``None`` marks regression (floating targets). Construction validates everything a
    meta-learner relies on and raises ``ValueError``/``TypeError`` naming the problem.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    task_id: str
    num_classes: int | None = None

    def __post_init__(self) -> None:
        _validate_episode(self)

    @property
    def support(self) -> Batch:
        return self.support_x, self.support_y

    @property
    def query(self) -> Batch:
        return self.query_x, self.query_y

    @property
    def is_classification(self) -> bool:
        return self.num_classes is not None

    def to(self, device: torch.device | str) -> Episode:
        """The same episode with every tensor on ``device``."""
        move = lambda t: t.to(device)  # noqa: E731
        return Episode(
            move(self.support_x), move(self.support_y), move(self.query_x), move(self.query_y),
            self.task_id, self.num_classes,
        )


def _validate_episode(episode: Episode) -> None:
    sets = {"support": (episode.support_x, episode.support_y), "query": (episode.query_x, episode.query_y)}
    for set_name, (x, y) in sets.items():
        for part, tensor in (("x", x), ("y", y)):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{set_name}_{part} must be a torch.Tensor, got {type(tensor).__name__}")
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"the {set_name} set is empty; an episode needs at least one {set_name} example")
        if y.ndim == 0 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{set_name}_x has {x.shape[0]} examples but {set_name}_y has "
                f"{y.shape[0] if y.ndim else 'a scalar'}; they must have the same length"
            )
        if not x.is_floating_point():
            raise TypeError(f"{set_name}_x must be a floating-point tensor, got dtype {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{set_name}_x contains NaN or Inf values")
    if episode.support_x.shape[1:] != episode.query_x.shape[1:]:
        raise ValueError(
            f"support and query features differ in shape: {tuple(episode.support_x.shape[1:])} vs "
            f"{tuple(episode.query_x.shape[1:])}"
        )
    if episode.support_x.device != episode.query_x.device or any(
        t.device != episode.support_x.device for t in (episode.support_y, episode.query_y)
    ):
        raise ValueError("all tensors of an episode must be on the same device")
    if not isinstance(episode.task_id, str):
        raise TypeError(f"task_id must be a str, got {type(episode.task_id).__name__}")
    if episode.num_classes is None:
        _validate_regression_targets(episode)
    else:
        _validate_labels(episode)


def _validate_regression_targets(episode: Episode) -> None:
    for set_name, y in (("support", episode.support_y), ("query", episode.query_y)):
        if not y.is_floating_point():
            raise TypeError(
                f"{set_name}_y has dtype {y.dtype}; regression targets must be floating point "
                "(pass num_classes=N for a classification episode)"
            )
        if not torch.isfinite(y).all():
            raise ValueError(f"{set_name}_y contains NaN or Inf values")
    if episode.support_y.shape[1:] != episode.query_y.shape[1:]:
        raise ValueError(
            f"support and query targets differ in shape: {tuple(episode.support_y.shape[1:])} vs "
            f"{tuple(episode.query_y.shape[1:])}"
        )


def _validate_labels(episode: Episode) -> None:
    n = episode.num_classes
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_classes must be a positive integer or None (regression), got {n!r}")
    for set_name, y in (("support", episode.support_y), ("query", episode.query_y)):
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"{set_name}_y must hold integer class labels, got dtype {y.dtype}")
        if y.ndim != 1:
            raise ValueError(f"{set_name}_y must be a vector of labels, got shape {tuple(y.shape)}")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= n:
            raise ValueError(
                f"{set_name}_y has labels in [{low}, {high}] but num_classes={n} requires labels in [0, {n - 1}]"
            )


def _check_split(split: str, accepted: Sequence[str]) -> None:
    if split not in accepted:
        raise ValueError(f"split={split!r} is not supported here; accepted values: {tuple(accepted)}")


def _episode_seed(split: str, seed: int, index: int) -> int:
    """A well-mixed 63-bit generator seed for episode ``index`` of ``(split, seed)``."""
    words = np.random.SeedSequence([SPLITS.index(split), seed, index]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class TaskDistributionSampler(ABC):
    """A seeded distribution over episodes of one split.

    ``episode(index, seed)`` is a pure function of ``(split, seed, index)``; ``batches`` yields
    consecutive indices, so meta-training batch ``b`` of seed ``s`` is always the same episodes.
    Tensors are created on the CPU from a ``torch.Generator`` and moved to ``device``.
    """

    name: str = "episodes"

    def __init__(self, split: str, device: torch.device | str | None = None) -> None:
        _check_split(split, SPLITS)
        self.split = split
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    @abstractmethod
    def _draw(self, generator: torch.Generator, task_id: str) -> Episode:
        """One episode on the CPU, using only ``generator`` for randomness."""

    def episode(self, index: int, seed: int = 0) -> Episode:
        for name, value in (("index", index), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        generator = torch.Generator().manual_seed(_episode_seed(self.split, seed, index))
        episode = self._draw(generator, f"{self.name}/{self.split}/seed={seed}/index={index}")
        return episode if self.device.type == "cpu" else episode.to(self.device)

    def episodes(self, count: int, seed: int = 0, start: int = 0) -> list[Episode]:
        """Episodes ``start, ..., start + count - 1`` of ``seed``."""
        check_positive("count", count, integer=True)
        return [self.episode(start + i, seed) for i in range(count)]

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[list[Episode]]:
        """An endless stream of meta-batches of ``batch_size`` episodes."""
        check_positive("batch_size", batch_size, integer=True)
        start = 0
        while True:
            yield self.episodes(batch_size, seed, start)
            start += batch_size


class SinusoidSampler(TaskDistributionSampler):
    """K-shot sinusoid regression (Finn et al. 2017): y = A sin(x - phase), A ~ U[0.1, 5],
    phase ~ U[0, pi], x ~ U[-5, 5]. Splits differ only in their episode seeds."""

    name = "sinusoid"

    def __init__(
        self,
        k_shot: int,
        query_size: int = 10,
        split: str = "train",
        *,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(split, device)
        check_positive("k_shot", k_shot, integer=True)
        check_positive("query_size", query_size, integer=True)
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(f"{name} must be a finite (low, high) pair with low <= high, got {(low, high)}")
        self.k_shot, self.query_size = k_shot, query_size
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def _draw(self, generator: torch.Generator, task_id: str) -> Episode:
        def uniform(bounds: tuple[float, float], *shape: int) -> Tensor:
            return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(*shape, generator=generator)

        amplitude, phase = uniform(self.amplitude, 1), uniform(self.phase, 1)
        x = uniform(self.x_range, self.k_shot + self.query_size, 1)
        y = amplitude * torch.sin(x - phase)
        k = self.k_shot
        return Episode(x[:k], y[:k], x[k:], y[k:], task_id)


class FewShotClassificationSampler(TaskDistributionSampler):
    """N-way K-shot episodes over a pool of classes (one tensor of examples per class).

    With ``rotations`` (multiples of 90 degrees) every class rotated by every angle is a class of
    its own, so the pool has ``len(classes) * len(rotations)`` classes; images are rotated when
    drawn, not stored once per angle. Each episode picks ``n_way`` distinct classes, labels them
    0..n_way-1 in random order, and draws ``k_shot`` support and ``query_shots`` query examples
    per class without replacement.
    """

    name = "fewshot"

    def __init__(
        self,
        classes: Sequence[Tensor],
        n_way: int,
        k_shot: int,
        query_shots: int = 15,
        split: str = "train",
        *,
        rotations: Sequence[int] = (0,),
        name: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(split, device)
        check_positive("n_way", n_way, integer=True)
        check_positive("k_shot", k_shot, integer=True)
        check_positive("query_shots", query_shots, integer=True)
        self.rotations = _check_rotations(rotations)
        if len(classes) * len(self.rotations) < n_way:
            raise ValueError(
                f"n_way={n_way} needs at least {n_way} classes; this split has {len(classes) * len(self.rotations)}"
            )
        shapes = {tuple(c.shape[1:]) for c in classes}
        if len(shapes) != 1:
            raise ValueError(f"all classes must have examples of one shape; found {sorted(shapes)}")
        (shape,) = shapes
        if self.rotations != (0,) and (len(shape) < 2 or shape[-1] != shape[-2]):
            raise ValueError(f"rotating classes needs square images (..., H, H); examples have shape {shape}")
        needed = k_shot + query_shots
        for index, examples in enumerate(classes):
            if examples.shape[0] < needed:
                raise ValueError(
                    f"class {index} has {examples.shape[0]} examples but k_shot + query_shots = {needed} are needed"
                )
            if not examples.is_floating_point():
                raise TypeError(f"class {index} examples must be floating point, got dtype {examples.dtype}")
        self.classes = list(classes)
        self.n_way, self.k_shot, self.query_shots = n_way, k_shot, query_shots
        if name is not None:
            self.name = name

    @property
    def num_classes(self) -> int:
        """Size of the class pool, rotations included."""
        return len(self.classes) * len(self.rotations)

    def _draw(self, generator: torch.Generator, task_id: str) -> Episode:
        chosen = torch.randperm(self.num_classes, generator=generator)[: self.n_way].tolist()
        support_x, query_x = [], []
        for class_index in chosen:
            examples = self.classes[class_index // len(self.rotations)]
            quarter_turns = self.rotations[class_index % len(self.rotations)] // 90
            picked = examples[torch.randperm(examples.shape[0], generator=generator)[: self.k_shot + self.query_shots]]
            picked = torch.rot90(picked, k=quarter_turns, dims=(-2, -1)) if quarter_turns else picked
            support_x.append(picked[: self.k_shot])
            query_x.append(picked[self.k_shot :])
        labels = torch.arange(self.n_way)
        return Episode(
            torch.cat(support_x), labels.repeat_interleave(self.k_shot),
            torch.cat(query_x), labels.repeat_interleave(self.query_shots),
            task_id, num_classes=self.n_way,
        )


def _check_rotations(rotations: Sequence[int]) -> tuple[int, ...]:
    """Rotations as distinct angles in {0, 90, 180, 270}."""
    if (
        isinstance(rotations, (str, bytes))
        or not rotations
        or any(isinstance(r, bool) or not isinstance(r, int) or r % 90 for r in rotations)
    ):
        raise ValueError(f"rotations must be a non-empty list of multiples of 90 degrees, got {rotations!r}")
    angles = tuple(r % 360 for r in rotations)
    if len(set(angles)) != len(angles):
        raise ValueError(f"rotations must be distinct angles, got {rotations!r}")
    return angles


@functools.cache
def _digits() -> tuple[Tensor, Tensor]:
    """All scikit-learn digits as (1797, 1, 8, 8) images in [0, 1] and their labels (read once)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(data.target)


def digits_classes(split: str) -> list[Tensor]:
    """scikit-learn digits of ``split`` ('train': 0-4, 'test': 5-9) as (n, 1, 8, 8) images in [0, 1]."""
    _check_split(split, tuple(DIGITS_CLASSES))
    images, labels = _digits()
    return [images[labels == digit] for digit in DIGITS_CLASSES[split]]


def digits_sampler(
    split: str,
    n_way: int = 5,
    k_shot: int = 1,
    query_shots: int = 15,
    *,
    rotations: Sequence[int] = DIGITS_ROTATIONS,
    device: torch.device | str | None = None,
) -> FewShotClassificationSampler:
    """N-way K-shot episodes over the digits class split (see the module docstring)."""
    return FewShotClassificationSampler(
        digits_classes(split), n_way, k_shot, query_shots, split, rotations=rotations, name="digits", device=device
    )


def omniglot_classes(root: str | os.PathLike | None, split: str, image_size: int = 28) -> list[Tensor]:
    """Omniglot characters of ``split`` ('train': background alphabets, 'test': evaluation
    alphabets) as (20, 1, image_size, image_size) ink fractions in [0, 1], one tensor per character."""
    _check_split(split, tuple(OMNIGLOT_SPLITS))
    characters = load_omniglot(root, OMNIGLOT_SPLITS[split]).images
    return list(resize_images(characters, image_size).unsqueeze(2).unbind(0))


def omniglot_sampler(
    root: str | os.PathLike | None,
    split: str,
    n_way: int = 5,
    k_shot: int = 1,
    query_shots: int = 15,
    *,
    image_size: int = 28,
    rotations: Sequence[int] = OMNIGLOT_ROTATIONS,
    device: torch.device | str | None = None,
) -> FewShotClassificationSampler:
    """N-way K-shot Omniglot episodes from the folder ``root`` (see the module docstring)."""
    return FewShotClassificationSampler(
        omniglot_classes(root, split, image_size), n_way, k_shot, query_shots, split,
        rotations=rotations, name="omniglot", device=device,
    )
