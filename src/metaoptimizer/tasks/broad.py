"""The broader meta-training families of issue 16 (item 2): varied MLPs, small CNNs and character
language models, kept apart from the ``general`` evaluation suite (:mod:`metaoptimizer.tasks.general`).

* :class:`BroadImageFamily` (``broad_image``): classifiers whose task seed picks the depth (1-3
  hidden layers by default), each layer's width (16-256), the activation (ReLU, tanh, GELU, ELU,
  sigmoid), the initialisation scale and the data subset; ``architecture="cnn"`` gives 3x3
  convolutions (4-16 channels) with 2x2 average pooling. The images are never the general
  suite's: ``source="digits"`` is scikit-learn's 8x8 digits, ``source="omniglot_eval"`` the
  Omniglot *evaluation* characters (the suite uses the background characters, at 14x14; here
  16x16 by default, with 10 classes of (character, rotation) per task), ``source="mnist_test"``
  MNIST's *test* images at 10x10 (the suite uses the training images at 14x14 and 28x28).
  The suite uses the digits only as a fallback without a data folder; the MLP stacks of
  its classifiers (:data:`GENERAL_SUITE_MLPS`) are never drawn here, so even that fallback shares
  no task with this family. The CNN pools by averaging after every convolution stack (the suite's
  CNNs max-pool after each of two stages).
* :class:`CaseFoldedLMFamily` (``shakespeare_lc_lm``): next-character prediction on tiny Shakespeare
  folded to 29 tokens (lowercase letters, space, newline, one token for all punctuation; the
  suite keeps the 65 characters), windows of 24 characters (the suite: 16 and 32), with a GRU or
  tanh-RNN of 16-48 units or a one-layer, width-16 Transformer (the suite: a GRU of 64, a
  2-layer width-32 Transformer).

Every task is tiny (at most ``max_params``, 20k by default, parameters): a step costs well under
a millisecond to a few milliseconds on one CPU core. Tasks of one architecture compute the same
loss function, so the vectorised PES path vmaps them together; tasks that differ in shape (most
pairs here) each run their particles in their own vmapped call.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor, nn

from metaoptimizer._validation import check_positive
from metaoptimizer.tasks.base import ModuleTask, TaskFamily
from metaoptimizer.tasks.datasets import data_dir, load_mnist, load_omniglot, load_tiny_shakespeare, resize_images
from metaoptimizer.tasks.digits import ACTIVATIONS, ClassifierSpec, build_classifier, load_digits_tensors, standardised_split
from metaoptimizer.tasks.general import TransformerLM
from metaoptimizer.tasks.sampling import ARCHITECTURE_STREAM, DATA_STREAM, as_choices, check_fraction, pick, task_rng
from metaoptimizer.tasks.sequence import CELL_GATES, RecurrentLM, SequenceTask, next_token_windows

__all__ = ["BroadImageFamily", "CaseFoldedLMFamily", "GENERAL_SUITE_MLPS", "fold_text"]

#: Hidden stacks and activations of the general suite's MLP classifiers and regressor (see
#: tasks/general.py); :class:`BroadImageFamily` redraws an MLP that matches one.
GENERAL_SUITE_MLPS = frozenset({
    ((32, 32, 32, 32), "gelu"), ((32,) * 8, "relu"), ((256,), "tanh"), ((64, 64, 64), "relu"),
    ((64, 64), "softplus"), ((64, 64), "tanh"), ((64, 16, 64), "elu"),
})
IMAGE_SOURCES = ("digits", "omniglot_eval", "mnist_test")
DEFAULT_IMAGE_SIZE = {"digits": 8, "omniglot_eval": 16, "mnist_test": 10}
NUM_CLASSES = 10
#: Omniglot tasks: 10 (character, rotation) classes, all 20 drawings of each.
OMNIGLOT_ROTATIONS = 4
#: Architecture draws before giving up on choices that only allow general-suite MLPs.
MAX_DRAWS = 100


@lru_cache(maxsize=2)
def _omniglot_eval(root: str, size: int) -> Tensor:
    """Evaluation characters at ``size``: ``(659, 20, size, size)`` ink fractions."""
    return resize_images(load_omniglot(root, "evaluation").images, size)


@lru_cache(maxsize=2)
def _mnist_test(root: str, size: int) -> tuple[Tensor, Tensor]:
    images, labels = load_mnist(root, "test")
    return resize_images(images, size).unsqueeze(1), labels


class BroadImageFamily(TaskFamily):
    """Image classifiers of varied shape on data the general suite never uses (module docstring).

    ``depths``, ``widths`` (per layer), ``activations`` and ``init_scales`` are the choices a task
    seed picks from (one value fixes it); an architecture over ``max_params`` has its widest
    layer halved until it fits. ``n_examples`` (digits, MNIST test) is each task's seeded subset;
    an Omniglot task is a seeded choice of 10 classes among the 659 characters x 4 rotations.
    """

    def __init__(
        self,
        source: str = "digits",
        root: str | os.PathLike | None = None,
        *,
        architecture: str = "mlp",
        image_size: int | None = None,
        depths: int | tuple[int, ...] = (1, 2, 3),
        widths: int | tuple[int, ...] | None = None,
        activations: str | tuple[str, ...] = ("relu", "tanh", "gelu", "elu", "sigmoid"),
        init_scales: float | tuple[float, ...] = (0.5, 1.0, 2.0),
        n_examples: int = 1500,
        max_params: int = 20_000,
        batch_size: int = 32,
        valid_fraction: float = 0.2,
        device: torch.device | str | None = None,
    ) -> None:
        if source not in IMAGE_SOURCES:
            raise ValueError(f"source={source!r} is not supported; accepted values: {IMAGE_SOURCES}")
        if architecture not in ("mlp", "cnn"):
            raise ValueError(f"architecture={architecture!r} is not supported; accepted values: ('mlp', 'cnn')")
        size = DEFAULT_IMAGE_SIZE[source] if image_size is None else image_size
        check_positive("image_size", size, integer=True)
        if source == "digits" and size != 8:
            raise ValueError(f"the digits are 8x8 images; image_size={size} is not supported for source='digits'")
        for label, value in (("n_examples", n_examples), ("max_params", max_params), ("batch_size", batch_size)):
            check_positive(label, value, integer=True)
        check_fraction("valid_fraction", valid_fraction)
        self.depths = as_choices("depths", depths, integer=True)
        default_widths = (16, 32, 64, 128, 256) if architecture == "mlp" else (4, 8, 16)
        self.widths = as_choices("widths", default_widths if widths is None else widths, integer=True)
        self.activations = as_choices("activations", activations, tuple(ACTIVATIONS))
        self.init_scales = as_choices("init_scales", init_scales)
        self.source, self.architecture, self.image_size = source, architecture, size
        self.max_params, self.batch_size, self.valid_fraction, self.device = max_params, batch_size, valid_fraction, device
        self.name = f"broad_{architecture}:{source}{size}"
        if source == "digits":
            self.images: Tensor | tuple[Tensor, Tensor] = load_digits_tensors()
        elif source == "mnist_test":
            self.images = _mnist_test(str(data_dir(root)), size)
        else:
            self.images = _omniglot_eval(str(data_dir(root)), size)
        if source != "omniglot_eval" and n_examples > len(self.images[0]):
            raise ValueError(f"n_examples={n_examples} exceeds the {len(self.images[0])} {source} images")
        self.n_examples = n_examples

    def examples(self, seed: int) -> tuple[Tensor, Tensor]:
        """Task ``seed``'s images ``(N, 1, size, size)`` and labels in 0..9, shuffled."""
        rng = task_rng(seed, DATA_STREAM)
        if self.source != "omniglot_eval":
            x, y = self.images
            rows = torch.from_numpy(rng.permutation(len(x))[: self.n_examples])
            return x[rows], y[rows]
        characters, drawers = self.images.shape[:2]
        classes = rng.choice(characters * OMNIGLOT_ROTATIONS, NUM_CLASSES, replace=False)
        x = torch.stack([
            torch.rot90(self.images[c // OMNIGLOT_ROTATIONS], int(c % OMNIGLOT_ROTATIONS), dims=(-2, -1))
            for c in classes
        ])
        y = torch.arange(NUM_CLASSES).repeat_interleave(drawers)
        order = torch.from_numpy(rng.permutation(len(y)))
        return x.reshape(-1, 1, self.image_size, self.image_size)[order], y[order]

    def spec(self, seed: int) -> ClassifierSpec:
        """The architecture task ``seed`` draws (redrawn when it is a general-suite MLP stack)."""
        rng = task_rng(seed, ARCHITECTURE_STREAM)
        input_shape = (1, self.image_size, self.image_size)
        for _ in range(MAX_DRAWS):
            depth = pick(rng, self.depths)
            widths = [pick(rng, self.widths) for _ in range(depth)]
            activation = pick(rng, self.activations)
            init_scale = pick(rng, self.init_scales)
            if self.architecture == "cnn" or (tuple(widths), activation) not in GENERAL_SUITE_MLPS:
                break
        else:
            raise ValueError(
                f"{MAX_DRAWS} draws from depths={self.depths}, widths={self.widths}, activations={self.activations} "
                "gave only general-suite MLPs (GENERAL_SUITE_MLPS); widen the choices"
            )
        n_examples = self.n_examples if self.source != "omniglot_eval" else NUM_CLASSES * self.images.shape[1]
        while True:
            spec = ClassifierSpec(self.architecture, tuple(widths), activation, init_scale, n_examples)
            count = sum(p.numel() for p in build_classifier(spec, input_shape, NUM_CLASSES).parameters())
            if count <= self.max_params or max(widths) == 1:
                return spec
            widest = widths.index(max(widths))
            widths[widest] = max(1, widths[widest] // 2)

    def sample(self, seed: int) -> ModuleTask:
        spec = self.spec(seed)
        x, y = self.examples(seed)
        n_valid = min(len(x) - 1, max(1, round(len(x) * self.valid_fraction)))
        train, valid = standardised_split(x.to(self.device), y.to(self.device), n_valid)
        input_shape, device = (1, self.image_size, self.image_size), self.device
        return ModuleTask(
            name=f"{self.name}:{spec.label()}:batch={self.batch_size}:seed={seed}",  # the name keys cached baselines
            model_factory=lambda: build_classifier(spec, input_shape, NUM_CLASSES).to(device),
            train_data=train,
            valid_data=valid,
            batch_size=self.batch_size,
        )


#: The folded alphabet: lowercase letters, space, newline, and "." standing for all punctuation.
FOLDED_VOCAB = "\n .abcdefghijklmnopqrstuvwxyz"
LM_MODELS = (*CELL_GATES, "transformer")


def fold_text(text: str) -> Tensor:
    """Token ids over :data:`FOLDED_VOCAB`: letters lowercased, any other non-space character -> "."."""
    index = {ch: i for i, ch in enumerate(FOLDED_VOCAB)}
    dot = index["."]
    return torch.tensor([index.get(ch.lower(), dot) for ch in text], dtype=torch.long)


@lru_cache(maxsize=2)
def _folded_shakespeare(root: str) -> Tensor:
    return fold_text(load_tiny_shakespeare(root))


class CaseFoldedLMFamily(TaskFamily):
    """Character models on case-folded tiny Shakespeare (29 tokens, see the module docstring).

    A task seed picks the model from ``models`` (``gru``, ``rnn``: a recurrent cell of a size from
    ``hidden_sizes``; ``transformer``: one pre-LayerNorm block of width 16, 2 heads) and a seeded
    ``n_chars`` stretch of the text, whose last ``valid_fraction`` is its validation text.
    """

    name = "shakespeare_lc_lm"

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        models: str | tuple[str, ...] = ("gru", "rnn", "transformer"),
        hidden_sizes: int | tuple[int, ...] = (16, 32, 48),
        seq_len: int = 24,
        batch_size: int = 16,
        n_chars: int = 16384,
        valid_fraction: float = 0.1,
        device: torch.device | str | None = None,
    ) -> None:
        self.models = as_choices("models", models, LM_MODELS)
        self.hidden_sizes = as_choices("hidden_sizes", hidden_sizes, integer=True)
        for label, value in (("seq_len", seq_len), ("batch_size", batch_size), ("n_chars", n_chars)):
            check_positive(label, value, integer=True)
        check_fraction("valid_fraction", valid_fraction)
        self.text_ids = _folded_shakespeare(str(data_dir(root)))
        n_valid = round(n_chars * valid_fraction)
        if n_chars > len(self.text_ids) or min(n_valid, n_chars - n_valid) < seq_len + 1:
            raise ValueError(
                f"n_chars={n_chars} with valid_fraction={valid_fraction} must fit the text ({len(self.text_ids)} "
                f"characters) and leave at least seq_len + 1 = {seq_len + 1} characters for training and validation"
            )
        self.seq_len, self.batch_size, self.n_chars, self.n_valid = seq_len, batch_size, n_chars, n_valid
        self.device = device

    def sample(self, seed: int) -> SequenceTask:
        rng = task_rng(seed, ARCHITECTURE_STREAM)
        model, hidden = pick(rng, self.models), pick(rng, self.hidden_sizes)
        start = int(task_rng(seed, DATA_STREAM).integers(len(self.text_ids) - self.n_chars + 1))
        ids = self.text_ids[start : start + self.n_chars].to(self.device)
        split = self.n_chars - self.n_valid
        vocab, seq_len, device = len(FOLDED_VOCAB), self.seq_len, self.device

        def factory() -> nn.Module:
            if model == "transformer":
                return TransformerLM(vocab, 16, 1, 2, seq_len).to(device)
            return RecurrentLM(vocab, hidden, model).to(device)

        label = "transformer[w=16,l=1]" if model == "transformer" else f"{model}[h={hidden}]"
        return SequenceTask(
            name=f"{self.name}:{label}:seq={seq_len}:batch={self.batch_size}:seed={seed}",
            model_factory=factory,
            train_data=next_token_windows(ids[:split], seq_len),
            valid_data=next_token_windows(ids[split:], seq_len),
            batch_size=self.batch_size,
        )
