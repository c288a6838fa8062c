"""Tasks: a parameter initialiser, a loss on a batch, and train/validation batch streams.

A task's parameters are a plain dict (name -> tensor) so that an unroll can replace them step by
step; models are evaluated with ``torch.func.functional_call``.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Batch = tuple[Tensor, Tensor]
Params = dict[str, Tensor]

TRAIN = "train"
HELDOUT = "heldout"
SPLITS = (TRAIN, HELDOUT)


def split_seed(split: str, index: int) -> int:
    """Task seed for ``index`` in ``split``: train seeds are even, held-out seeds odd (disjoint)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not supported; accepted values: {SPLITS}")
    if index < 0:
        raise ValueError(f"task index must be >= 0, got {index}")
    return 2 * index + (0 if split == TRAIN else 1)


class Task(ABC):
    """One optimisation problem."""

    name: str = "task"

    @abstractmethod
    def init_params(self, seed: int) -> Params:
        """Fresh parameters, deterministic in ``seed``."""

    @abstractmethod
    def loss(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        """Scalar training loss of ``params`` on ``batch`` (differentiable in ``params``)."""

    @abstractmethod
    def train_batches(self, seed: int) -> Iterator[Batch]:
        """An endless, seeded stream of training batches."""

    @abstractmethod
    def valid_batches(self, seed: int) -> Iterator[Batch]:
        """An endless, seeded stream of validation batches."""

    def loss_signature(self) -> Hashable | None:
        """A hashable that tasks computing the same ``loss(params, batch)`` function share, so that
        their unrolls can run in one vmapped call; None (the default) when this task's unrolls run
        alone. Everything that differs between tasks of equal signature must live in the
        parameters or the batches."""
        return None

    def metrics(self, params: Mapping[str, Tensor], batch: Batch) -> dict[str, float]:
        """Evaluation metrics on ``batch``; the loss always, accuracy for classifiers."""
        with torch.no_grad():
            return {"loss": float(self.loss(params, batch))}


class TaskFamily(ABC):
    """A distribution over tasks, sampled deterministically from a seed."""

    name: str = "family"

    @abstractmethod
    def sample(self, seed: int) -> Task:
        """The task for ``seed``."""

    def task(self, index: int, split: str = TRAIN) -> Task:
        """The ``index``-th task of ``split``; train and held-out tasks never share a seed."""
        return self.sample(split_seed(split, index))


LossFn = Callable[[Tensor, Tensor], Tensor]
LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


def loss_fn(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"loss={name!r} is not supported; accepted values: {sorted(LOSSES)}")
    return LOSSES[name]


def sample_batches(x: Tensor, y: Tensor, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless minibatches drawn without replacement within each pass, reshuffled each pass."""
    n = x.shape[0]
    if n == 0:
        raise ValueError("cannot draw batches from an empty data set")
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            idx = order[start : start + size]
            yield x[idx], y[idx]


class _LinearStack:
    """The forward of an ``nn.Sequential`` of ``nn.Linear`` layers and parameter-free modules (an
    MLP), taking the linear layers' weights from a params dict: the same ``F.linear`` calls as
    ``functional_call``, without its per-call swapping of the module's parameters (a sixth of a
    meta-training inner step on a small MLP)."""

    def __init__(self, model: nn.Sequential) -> None:
        self.modules = tuple(model._modules.values())
        self.layers = [
            (f"{name}.weight", f"{name}.bias" if layer.bias is not None else None) if type(layer) is nn.Linear else layer
            for name, layer in model._modules.items()
        ]
        self.parameter_names = [name for layer in self.layers if isinstance(layer, tuple) for name in layer if name]

    def __call__(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        for layer in self.layers:
            if isinstance(layer, tuple):
                weight, bias = layer
                x = F.linear(x, params[weight], None if bias is None else params[bias])
            else:
                x = layer(x)
        return x


_LINEAR_STACKS: weakref.WeakKeyDictionary[nn.Module, _LinearStack | None] = weakref.WeakKeyDictionary()


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _linear_stack(model: nn.Module) -> _LinearStack | None:
    """``model``'s :class:`_LinearStack`, or None when it is not an ``nn.Sequential`` of plain
    ``nn.Linear`` layers and modules without parameters or buffers, none of them hooked (checked
    at every call: layers may be replaced or hooked after the first)."""
    if type(model) is not nn.Sequential or _hooked(model):
        return None
    stack = _LINEAR_STACKS.get(model)
    if stack is None or stack.modules != tuple(model._modules.values()):
        plain = all(
            type(layer) is nn.Linear or not (any(True for _ in layer.parameters()) or any(True for _ in layer.buffers()))
            for layer in model
        )
        stack = _LINEAR_STACKS[model] = _LinearStack(model) if plain else None
    if stack is None or any(_hooked(layer) for layer in stack.modules):
        return None
    return stack


class ModuleTask(Task):
    """A task defined by an ``nn.Module`` factory, a loss and in-memory train/validation tensors.

    ``model_factory()`` builds the module (under the global RNG, which :meth:`init_params` seeds);
    its parameters become the task's params.
    """

    def __init__(
        self,
        name: str,
        model_factory: Callable[[], nn.Module],
        train_data: Batch,
        valid_data: Batch,
        loss: str = "cross_entropy",
        batch_size: int = 32,
    ) -> None:
        self.name = name
        self.model_factory = model_factory
        with torch.random.fork_rng(devices=[]):  # building the template must not advance the caller's RNG
            self.model = model_factory()
        self.train_data = train_data
        self.valid_data = valid_data
        self.loss_name = loss
        self._loss = loss_fn(loss)
        self.batch_size = batch_size

    def init_params(self, seed: int) -> Params:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_factory()
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        layers = _linear_stack(self.model)
        if layers is not None and all(name in params for name in layers.parameter_names):
            return layers(params, x)
        return functional_call(self.model, dict(params), (x,))

    def loss(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        x, y = batch
        return self._loss(self.forward(params, x), y)

    def loss_signature(self) -> Hashable | None:
        """The module's architecture and the loss (a subclass that overrides ``loss`` is not covered)."""
        if type(self).loss is not ModuleTask.loss:
            return None
        return type(self), repr(self.model), self.loss_name

    def train_batches(self, seed: int) -> Iterator[Batch]:
        return sample_batches(*self.train_data, self.batch_size, seed)

    def valid_batches(self, seed: int) -> Iterator[Batch]:
        return sample_batches(*self.valid_data, self.batch_size, seed + 1)

    def metrics(self, params: Mapping[str, Tensor], batch: Batch) -> dict[str, float]:
        with torch.no_grad():
            x, y = batch
            out = self.forward(params, x)
            result = {"loss": float(self._loss(out, y))}
            if self.loss_name == "cross_entropy":
                result["accuracy"] = float((out.argmax(-1) == y).float().mean())
            return result
