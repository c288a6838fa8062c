"""Classifier task families: small MLPs and CNNs on image data, one architecture and data subset
per task seed. The data are scikit-learn's digits (1,797 8x8 images, 10 classes, shipped with
scikit-learn, no download) here, MNIST in :mod:`metaoptimizer.tasks.mnist`.

Each task seed picks, independently: per-layer widths (hidden units or conv channels), a depth,
an activation, a weight-init scale and a random subset of the examples, split into training and
validation parts. Inputs are standardised with the training part's mean and standard deviation.
Pass a single value (or one-element tuple) to any choice to fix it, e.g.
``DigitsMLPFamily(widths=128, depths=3, activations="relu")`` for a deeper, wider ReLU MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from metaoptimizer.config import check_positive
from metaoptimizer.tasks.base import Batch, ModuleTask, TaskFamily
from metaoptimizer.tasks.sampling import (
    ARCHITECTURE_STREAM,
    DATA_STREAM,
    as_choices,
    check_fraction,
    pick,
    task_rng,
)

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
}
ARCHITECTURES = ("mlp", "cnn")
DEFAULT_WIDTHS = {"mlp": (16, 32, 64), "cnn": (4, 8, 16)}
# Sigmoid CNNs sit on a plateau for 100+ Adam steps at these sizes, so CNNs leave it out.
DEFAULT_ACTIVATIONS = {"mlp": ("relu", "tanh", "sigmoid", "elu"), "cnn": ("relu", "tanh", "elu")}


@dataclass(frozen=True)
class ClassifierSpec:
    """What a task seed chose: layer widths (hidden units or channels), activation, init scale
    and the number of examples (training + validation) the task uses."""

    architecture: str
    widths: tuple[int, ...]
    activation: str
    init_scale: float
    n_examples: int

    def label(self) -> str:
        widths = "x".join(map(str, self.widths))
        return f"{self.architecture}[{widths},{self.activation},scale={self.init_scale:g},n={self.n_examples}]"


def build_classifier(spec: ClassifierSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The network for ``spec``: an MLP on flattened inputs, or 3x3 same-padding convolutions
    followed by 2x2 average pooling and a linear read-out (inputs ``(C, H, W)``)."""
    activation = ACTIVATIONS[spec.activation]
    layers: list[nn.Module] = []
    if spec.architecture == "mlp":
        width = int(np.prod(input_shape))
        layers.append(nn.Flatten())
        for hidden in spec.widths:
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
    else:
        channels, height, width_px = input_shape
        for out_channels in spec.widths:
            layers += [nn.Conv2d(channels, out_channels, 3, padding=1), activation()]
            channels = out_channels
        layers += [nn.AvgPool2d(2), nn.Flatten()]
        width = channels * (height // 2) * (width_px // 2)
    layers.append(nn.Linear(width, num_classes))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                p.mul_(spec.init_scale)
    return model


def standardised_split(x: Tensor, y: Tensor, n_valid: int) -> tuple[Batch, Batch]:
    """(train, valid) with the last ``n_valid`` rows for validation, inputs standardised by the
    training rows' overall mean and standard deviation."""
    x = x.float()
    train_x, valid_x = x[: len(x) - n_valid], x[len(x) - n_valid :]
    mean, std = train_x.mean(), train_x.std().clamp_min(1e-6)
    return ((train_x - mean) / std, y[: len(y) - n_valid]), ((valid_x - mean) / std, y[len(y) - n_valid :])


class ClassifierFamily(TaskFamily):
    """MLP or CNN classifiers on ``(x, y)`` (``x (N, ...)``, ``y (N,)`` class ids), one
    architecture and data subset per task seed.

    ``widths``, ``depths``, ``activations``, ``init_scales`` and ``n_examples`` are the choices a
    task seed picks from (a single value fixes one); each layer's width is drawn independently.
    ``None`` takes the architecture's defaults (``DEFAULT_WIDTHS``, ``DEFAULT_ACTIVATIONS``) or,
    for ``n_examples``, all the examples.
    ``valid_fraction`` of each task's examples are held out for its validation batches.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        name: str,
        architecture: str = "mlp",
        widths: int | tuple[int, ...] | None = None,
        depths: int | tuple[int, ...] = (1, 2),
        activations: str | tuple[str, ...] | None = None,
        init_scales: float | tuple[float, ...] = (0.5, 1.0, 2.0),
        n_examples: int | tuple[int, ...] | None = None,
        valid_fraction: float = 0.2,
        batch_size: int = 32,
        device: torch.device | str | None = None,
    ) -> None:
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={architecture!r} is not supported; accepted values: {ARCHITECTURES}")
        if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise ValueError(
                f"need x (N, ...) and y (N,) with the same N > 0, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if architecture == "cnn" and x.ndim != 4:
            raise ValueError(f"architecture='cnn' needs images x (N, C, H, W), got shape {tuple(x.shape)}")
        check_fraction("valid_fraction", valid_fraction)
        check_positive("batch_size", batch_size, integer=True)
        self.name = name
        self.x, self.y = x, y
        self.num_classes = int(y.max()) + 1
        self.architecture = architecture
        if widths is None:
            widths = DEFAULT_WIDTHS[architecture]
        self.widths = as_choices("widths", widths, integer=True)
        self.depths = as_choices("depths", depths, integer=True)
        if activations is None:
            activations = DEFAULT_ACTIVATIONS[architecture]
        self.activations = as_choices("activations", activations, tuple(ACTIVATIONS))
        self.init_scales = as_choices("init_scales", init_scales)
        self.n_examples = as_choices("n_examples", len(x) if n_examples is None else n_examples, integer=True)
        too_many = [n for n in self.n_examples if n > len(x)]
        if too_many:
            raise ValueError(f"n_examples {too_many} exceed the {len(x)} examples available")
        too_few = [n for n in self.n_examples if round(n * valid_fraction) < 1 or round(n * valid_fraction) >= n]
        if too_few:
            raise ValueError(f"n_examples {too_few} leave no training or no validation example at {valid_fraction=}")
        self.valid_fraction = valid_fraction
        self.batch_size = batch_size
        self.device = device

    def spec(self, seed: int) -> ClassifierSpec:
        """The architecture and data size chosen by task ``seed``."""
        rng = task_rng(seed, ARCHITECTURE_STREAM)
        depth = pick(rng, self.depths)
        return ClassifierSpec(
            architecture=self.architecture,
            widths=tuple(pick(rng, self.widths) for _ in range(depth)),
            activation=pick(rng, self.activations),
            init_scale=pick(rng, self.init_scales),
            n_examples=pick(rng, self.n_examples),
        )

    def sample(self, seed: int) -> ModuleTask:
        spec = self.spec(seed)
        rows = torch.from_numpy(task_rng(seed, DATA_STREAM).permutation(len(self.x))[: spec.n_examples])
        x, y = self.x[rows].to(self.device), self.y[rows].to(self.device)
        train, valid = standardised_split(x, y, round(spec.n_examples * self.valid_fraction))
        input_shape, num_classes, device = tuple(self.x.shape[1:]), self.num_classes, self.device
        return ModuleTask(
            name=f"{self.name}:{spec.label()}:batch={self.batch_size}:seed={seed}",  # the name keys cached baselines
            model_factory=lambda: build_classifier(spec, input_shape, num_classes).to(device),
            train_data=train,
            valid_data=valid,
            batch_size=self.batch_size,
        )


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``float32 (1797, 1, 8, 8)`` images (0..16) and ``int64`` labels."""
    images, labels = _digits_arrays()
    return torch.from_numpy(images).unsqueeze(1).clone(), torch.from_numpy(labels).clone()


class DigitsMLPFamily(ClassifierFamily):
    """MLP classifiers on the 64 digit pixels; options as in :class:`ClassifierFamily`."""

    def __init__(self, **options) -> None:
        options.setdefault("n_examples", (600, 1200, 1797))
        super().__init__(*load_digits_tensors(), name="digits_mlp", architecture="mlp", **options)


class DigitsCNNFamily(ClassifierFamily):
    """Small CNNs on the 1x8x8 digit images; ``widths`` are conv channels per layer."""

    def __init__(self, **options) -> None:
        options.setdefault("n_examples", (600, 1200, 1797))
        super().__init__(*load_digits_tensors(), name="digits_cnn", architecture="cnn", **options)
