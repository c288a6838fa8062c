"""The tasks of the ``general`` evaluation suite: small problems of many kinds that none of the
learned optimizers was meta-trained on.

The shipped LSTM was meta-trained on MLPs (16-64 units, 1-2 layers) over scikit-learn's 8x8
digits, Celo on MLPs with 32 hidden units over 8x8 images. The tasks here change the data, the
architecture or the loss: deep and wide MLPs with other activations on synthetic data and on
MNIST, CNNs, a residual MLP with LayerNorm, a Transformer and a GRU language model on tiny
Shakespeare, an autoencoder, a regression and a logistic regression.

Data come from a local folder (``root``, or ``$METAOPT_DATA_DIR``; see
:mod:`metaoptimizer.tasks.datasets`): MNIST, Omniglot and tiny Shakespeare. Without a folder the
image tasks fall back to scikit-learn's digits and the language models to a synthetic Markov
text; a task's name says which data it runs on (``...:mnist`` or ``...:digits``), so reports and
cached baselines never mix the two. The fallbacks share the LSTM's meta-training images, so
measured results should use the data folder.

Every task is tiny (at most 64k parameters, batches of 32 examples or 16 sequences), so a
step costs about a millisecond on one CPU core and the whole suite runs in minutes per optimizer.
The task seed draws the data subset; the run seed draws the initialisation and batch order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaoptimizer.tasks.base import Batch, ModuleTask, Task, TaskFamily
from metaoptimizer.tasks.datasets import DATA_DIR_ENV, load_mnist, load_omniglot, load_tiny_shakespeare, resize_images
from metaoptimizer.tasks.digits import ACTIVATIONS, load_digits_tensors, standardised_split
from metaoptimizer.tasks.sampling import DATA_STREAM, task_rng
from metaoptimizer.tasks.sequence import RecurrentLM, SequenceTask, markov_text, next_token_windows

BATCH_SIZE = 32
TEXT_BATCH_SIZE = 16
IMAGE_EXAMPLES = 4000
VALID_FRACTION = 0.2


def resolve_data_dir(root: str | os.PathLike | None) -> Path | None:
    """``root``, else ``$METAOPT_DATA_DIR``, else None (fallback data); a given folder must exist."""
    chosen = root if root is not None else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {str(path)!r} does not exist or is not a folder")
    return path


# --- data -----------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _mnist(root: Path) -> tuple[Tensor, Tensor]:
    images, labels = load_mnist(root, "train")
    return images.float().div_(255).unsqueeze(1), labels


def image_data(root: Path | None, seed: int, size: int) -> tuple[str, Tensor, Tensor]:
    """(source, images ``(N, 1, size, size)``, labels): a seeded MNIST subset of
    :data:`IMAGE_EXAMPLES` images area-resized to ``size`` (``size`` 28 keeps them as they are),
    or scikit-learn's digits (8x8, all 1,797) without a data folder."""
    if root is None:
        images, labels = load_digits_tensors()
        return "digits", images, labels
    images, labels = _mnist(root)
    rows = torch.from_numpy(task_rng(seed, DATA_STREAM).permutation(len(images))[:IMAGE_EXAMPLES])
    chosen = images[rows]
    return "mnist", chosen if size == chosen.shape[-1] else resize_images(chosen, size), labels[rows]


@lru_cache(maxsize=1)
def _omniglot_images(root: Path) -> Tensor:
    return load_omniglot(root, "background").images


def omniglot_data(root: Path | None, seed: int, n_classes: int = 20, size: int = 14) -> tuple[str, Tensor, Tensor]:
    """(source, images, labels): ``n_classes`` seeded Omniglot background characters, all 20
    drawings each, area-resized to ``size``; scikit-learn's digits without a data folder."""
    if root is None:
        images, labels = load_digits_tensors()
        return "digits", images, labels
    characters = _omniglot_images(root)
    chosen = torch.from_numpy(task_rng(seed, DATA_STREAM).permutation(len(characters))[:n_classes])
    drawings = resize_images(characters[chosen], size)  # (classes, drawers, size, size)
    labels = torch.arange(n_classes).repeat_interleave(drawings.shape[1])
    return "omniglot", drawings.flatten(0, 1).unsqueeze(1), labels


def text_ids(root: Path | None, seed: int, n_chars: int) -> tuple[str, Tensor, int]:
    """(source, token ids, vocabulary size): a seeded ``n_chars`` stretch of tiny Shakespeare,
    or a synthetic Markov text over 16 tokens without a data folder."""
    if root is None:
        return "markov", markov_text(seed, n_chars, 16), 16
    text = load_tiny_shakespeare(root)
    vocab = {ch: i for i, ch in enumerate(sorted(set(text)))}
    start = int(task_rng(seed, DATA_STREAM).integers(len(text) - n_chars + 1))
    return "shakespeare", torch.tensor([vocab[ch] for ch in text[start : start + n_chars]]), len(vocab)


def _shuffled_split(x: Tensor, y: Tensor, seed: int, standardise: bool = True) -> tuple[Batch, Batch]:
    """A seeded shuffle split into train and validation (the last :data:`VALID_FRACTION`)."""
    order = torch.from_numpy(task_rng(seed, DATA_STREAM).permutation(len(x)))
    x, y = x[order], y[order]
    n_valid = round(len(x) * VALID_FRACTION)
    if standardise:
        return standardised_split(x, y, n_valid)
    return (x[:-n_valid], y[:-n_valid]), (x[-n_valid:], y[-n_valid:])


# --- models ---------------------------------------------------------------------------------


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Flatten, then Linear layers of ``sizes`` with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Pre-LayerNorm residual MLP block: ``x + W2 gelu(W1 LayerNorm(x))``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, hidden)
        self.outer = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.outer(F.gelu(self.inner(self.norm(x))))


def residual_mlp(n_in: int, width: int, blocks: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(n_in, width), *(ResidualBlock(width, 2 * width) for _ in range(blocks)),
        nn.LayerNorm(width), nn.Linear(width, n_out),
    )


def cnn(channels: tuple[int, int], size: int, n_out: int) -> nn.Sequential:
    """Two 3x3 conv + ReLU + 2x2 max-pool stages, then a linear read-out."""
    first, second = channels
    return nn.Sequential(
        nn.Conv2d(1, first, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(first, second, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(second * (size // 4) ** 2, n_out),
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TransformerLM(nn.Module):
    """A pre-LayerNorm decoder-only Transformer: tokens ``(B, T)`` -> logits ``(B, T, vocab)``."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embedding(tokens) + self.position[: tokens.shape[1]]
        return self.readout(self.norm(self.blocks(x)))


# --- tasks ----------------------------------------------------------------------------------


def _classifier(name: str, model: Callable[[int, int], nn.Module], data: tuple[str, Tensor, Tensor], seed: int,
                *, flatten: bool = False) -> ModuleTask:
    """A classifier task on ``data``; ``model(n_inputs, n_classes)`` builds its network."""
    source, x, y = data
    train, valid = _shuffled_split(x.flatten(1) if flatten else x, y, seed)
    n_inputs, n_classes = int(np.prod(x.shape[1:])), int(y.max()) + 1
    return ModuleTask(f"general:{name}:{source}:seed={seed}", lambda: model(n_inputs, n_classes), train, valid,
                      batch_size=BATCH_SIZE)


def synthetic_classification(seed: int, n_features: int, n_classes: int) -> tuple[str, Tensor, Tensor]:
    """4,000 points of scikit-learn's ``make_classification`` (half the features informative)."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=IMAGE_EXAMPLES, n_features=n_features, n_informative=n_features // 2,
                               n_classes=n_classes, n_clusters_per_class=2, class_sep=1.0, random_state=seed)
    return "synthetic", torch.from_numpy(x).float(), torch.from_numpy(y).long()


def mlp_gelu_4x32(seed: int, root: Path | None) -> Task:
    """Four GELU layers of 32 on 32-feature, 8-class synthetic data."""
    return _classifier("mlp_gelu_4x32", lambda i, o: mlp([i, 32, 32, 32, 32, o], "gelu"),
                       synthetic_classification(seed, 32, 8), seed)


def mlp_relu_8x32(seed: int, root: Path | None) -> Task:
    """A deep, narrow ReLU MLP (8 layers of 32) on the same kind of synthetic data."""
    return _classifier("mlp_relu_8x32", lambda i, o: mlp([i, *[32] * 8, o], "relu"),
                       synthetic_classification(seed, 32, 8), seed)


def mlp_tanh_1x256(seed: int, root: Path | None) -> Task:
    """A wide, shallow tanh MLP (one layer of 256) on 14x14 MNIST."""
    return _classifier("mlp_tanh_1x256", lambda i, o: mlp([i, 256, o], "tanh"), image_data(root, seed, 14), seed)


def mlp_relu_3x64(seed: int, root: Path | None) -> Task:
    """Three ReLU layers of 64 on 14x14 MNIST."""
    return _classifier("mlp_relu_3x64", lambda i, o: mlp([i, 64, 64, 64, o], "relu"), image_data(root, seed, 14), seed)


def mlp_softplus_2x64_omniglot(seed: int, root: Path | None) -> Task:
    """Two softplus layers of 64 classifying 20 Omniglot characters (14x14)."""
    return _classifier("mlp_softplus_2x64_omniglot", lambda i, o: mlp([i, 64, 64, o], "softplus"),
                       omniglot_data(root, seed), seed)


def cnn_mnist(seed: int, root: Path | None) -> Task:
    """A two-stage CNN (8 and 16 channels) on 14x14 MNIST."""
    data = image_data(root, seed, 14)
    return _classifier("cnn_mnist", lambda i, o: cnn((8, 16), data[1].shape[-1], o), data, seed)


def cnn_omniglot(seed: int, root: Path | None) -> Task:
    """A two-stage CNN (8 and 16 channels) classifying 20 Omniglot characters (14x14)."""
    data = omniglot_data(root, seed)
    return _classifier("cnn_omniglot", lambda i, o: cnn((8, 16), data[1].shape[-1], o), data, seed)


def resmlp_layernorm(seed: int, root: Path | None) -> Task:
    """A residual MLP: width 64, three pre-LayerNorm blocks, on 14x14 MNIST."""
    return _classifier("resmlp_layernorm", lambda i, o: residual_mlp(i, 64, 3, o), image_data(root, seed, 14), seed)


def logistic_regression(seed: int, root: Path | None) -> Task:
    """Multinomial logistic regression (one linear layer) on 28x28 MNIST."""
    return _classifier("logistic_regression", lambda i, o: nn.Sequential(nn.Flatten(), nn.Linear(i, o)),
                       image_data(root, seed, 28), seed)


def autoencoder(seed: int, root: Path | None) -> Task:
    """A 196-64-16-64-196 ELU autoencoder of 14x14 MNIST images (pixels in [0, 1]), mean squared error."""
    source, x, _ = image_data(root, seed, 14)
    pixels = x.flatten(1) / x.amax()
    (train, _), (valid, _) = _shuffled_split(pixels, pixels, seed, standardise=False)
    n = pixels.shape[1]
    return ModuleTask(f"general:autoencoder:{source}:seed={seed}",
                      lambda: nn.Sequential(mlp([n, 64, 16, 64, n], "elu"), nn.Sigmoid()),
                      (train, train), (valid, valid), loss="mse", batch_size=BATCH_SIZE)


def regression(seed: int, root: Path | None) -> Task:
    """An MLP (two tanh layers of 64) regressing scikit-learn's Friedman #1 target (10 features,
    4,000 points, noise 1), standardised."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=IMAGE_EXAMPLES, n_features=10, noise=1.0, random_state=seed)
    x, y = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    y = ((y - y.mean()) / y.std()).unsqueeze(1)
    train, valid = _shuffled_split(x, y, seed)
    return ModuleTask(f"general:regression:friedman1:seed={seed}", lambda: mlp([10, 64, 64, 1], "tanh"),
                      train, valid, loss="mse", batch_size=BATCH_SIZE)


def _language_model(name: str, model: Callable[[int], nn.Module], seed: int, root: Path | None,
                    seq_len: int) -> Task:
    source, ids, vocab_size = text_ids(root, seed, 65536)
    split = len(ids) - round(len(ids) * VALID_FRACTION)
    return SequenceTask(f"general:{name}:{source}:seed={seed}", lambda: model(vocab_size),
                        next_token_windows(ids[:split], seq_len), next_token_windows(ids[split:], seq_len),
                        batch_size=TEXT_BATCH_SIZE)


def transformer_lm(seed: int, root: Path | None) -> Task:
    """A 2-layer, 2-head, width-32 Transformer character model, 32-character windows."""
    return _language_model("transformer_lm", lambda v: TransformerLM(v, 32, 2, 2, 32), seed, root, 32)


def gru_lm(seed: int, root: Path | None) -> Task:
    """A GRU character model (64 hidden units), 16-character windows."""
    return _language_model("gru_lm", lambda v: RecurrentLM(v, 64, "gru"), seed, root, 16)


#: The general suite's tasks: name -> ``(task seed, data folder or None) -> Task``.
GENERAL_TASKS: Mapping[str, Callable[[int, Path | None], Task]] = {
    fn.__name__: fn for fn in (
        mlp_gelu_4x32, mlp_relu_8x32, mlp_tanh_1x256, mlp_relu_3x64, mlp_softplus_2x64_omniglot, cnn_mnist,
        cnn_omniglot, resmlp_layernorm, transformer_lm, gru_lm, autoencoder, regression, logistic_regression,
    )
}


class GeneralTaskFamily(TaskFamily):
    """One task of :data:`GENERAL_TASKS` (``task``), its data drawn by the task seed, read from
    ``root`` (or ``$METAOPT_DATA_DIR``; fallback data when neither is set)."""

    name = "general"

    def __init__(self, task: str, root: str | os.PathLike | None = None) -> None:
        if task not in GENERAL_TASKS:
            raise ValueError(f"task={task!r} is not a general task; accepted values: {', '.join(GENERAL_TASKS)}")
        self.task_name = task
        self.root = resolve_data_dir(root)

    def sample(self, seed: int) -> Task:
        return GENERAL_TASKS[self.task_name](seed, self.root)


def parameter_count(task: Task, seed: int = 0) -> int:
    """Number of trainable scalars of ``task``."""
    return sum(math.prod(p.shape) for p in task.init_params(seed).values())
