"""Warped task learners: warp layers interleaved with the layers of a task learner (Warp-Grad).

A task learner is an ``nn.Sequential`` of task layers (``nn.Linear`` / ``nn.Conv2d``, with
normalisation, activations and pooling between them). :func:`interleave_warps` inserts one
:class:`WarpLayer` after every task layer's block but the last, i.e. between every two
consecutive task layers, as in the paper's warped conv nets (Flennerhag et al. 2020, and its
Omniglot model): a ``Linear(d, d)`` after a linear layer of width ``d``, a ``Conv2d(c, c, k)``
after a conv block with ``c`` channels (placed before a trailing ``nn.Flatten``, so it still sees
feature maps; the last conv block is thus followed by a warp too). Warp layers keep the shape of
their input, so the task layers are unchanged and keep their names; warp layers are named
``warp1``, ``warp2``, ... and listed in :attr:`WarpedSequential.warp_layer_names`. They start as
the identity, so the warped learner computes its plain learner's function until meta-trained.

Warp-Grad adapts only the task layers to a task; the warp layers stay fixed during adaptation, so
the backward pass through them (their Jacobians) preconditions the task gradients, and they are
meta-learned across tasks.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from metaoptimizer.config import check_positive

TASK_LAYERS = (nn.Linear, nn.Conv2d)


class WarpLayer(nn.Module):
    """A shape-preserving, meta-learned layer: a ``Linear(features, features)`` (``kind='linear'``)
    or a ``Conv2d(features, features, kernel_size, padding=kernel_size // 2)`` (``kind='conv'``).

    This is the paper's default warp (a linear map, no normalisation). ``activation`` adds a ReLU
    after the map (a non-linear warp, whose preconditioning depends on the input); ``residual``
    returns ``x + map(x)``.

    ``init='identity'`` (the default) starts the warp as the identity, so a warped learner starts
    as its plain learner (same function, same task gradients) and meta-training only adds
    preconditioning: the map's weight is the identity matrix / Dirac kernel (zero with
    ``residual``) and its bias zero. With ``activation`` the warp is then the identity on
    non-negative inputs, which is what interleaved warps see after ReLU blocks. ``init='random'``
    keeps PyTorch's default initialisation (the first version of this module; an ablation).
    """

    KINDS = ("linear", "conv")
    INITS = ("identity", "random")

    def __init__(
        self,
        kind: str,
        features: int,
        *,
        kernel_size: int = 3,
        activation: bool = False,
        residual: bool = False,
        init: str = "identity",
    ) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"kind={kind!r} is not supported; accepted values: {self.KINDS}")
        if init not in self.INITS:
            raise ValueError(f"init={init!r} is not supported; accepted values: {self.INITS}")
        check_positive("features", features, integer=True)
        check_positive("kernel_size", kernel_size, integer=True)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so the warp keeps the feature-map size, got {kernel_size}")
        for flag, value in (("activation", activation), ("residual", residual)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
        self.kind, self.residual = kind, residual
        if kind == "linear":
            layers: list[nn.Module] = [nn.Linear(features, features)]
        else:
            layers = [nn.Conv2d(features, features, kernel_size, padding=kernel_size // 2)]
        if init == "identity":
            _identity_init(layers[0], zero=residual)
        if activation:
            layers.append(nn.ReLU())
        self.transform = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.transform(x)
        return x + out if self.residual else out


def _identity_init(layer: nn.Linear | nn.Conv2d, *, zero: bool) -> None:
    """Set ``layer`` to the identity map (``zero``: to the zero map), bias zero."""
    with torch.no_grad():
        layer.bias.zero_()
        if zero:
            layer.weight.zero_()
        elif isinstance(layer, nn.Linear):
            layer.weight.copy_(torch.eye(layer.out_features))
        else:
            nn.init.dirac_(layer.weight)


class WarpedSequential(nn.Sequential):
    """An ``nn.Sequential`` that knows which of its children are warp layers."""

    def __init__(self, children: Mapping[str, nn.Module], warp_layer_names: tuple[str, ...]) -> None:
        unknown = sorted(set(warp_layer_names) - set(children))
        if unknown:
            raise ValueError(f"warp layers {unknown} are not children of the model; children: {list(children)}")
        super().__init__(OrderedDict(children))
        self.warp_layer_names = tuple(warp_layer_names)


def _warp_for(layer: nn.Module, **options) -> WarpLayer:
    if isinstance(layer, nn.Linear):
        return WarpLayer("linear", layer.out_features, **options)
    return WarpLayer("conv", layer.out_channels, **options)


def interleave_warps(
    model: nn.Sequential,
    *,
    kernel_size: int = 3,
    activation: bool = False,
    residual: bool = False,
    init: str = "identity",
    seed: int | None = None,
) -> WarpedSequential:
    """A copy of ``model`` with a :class:`WarpLayer` between every two consecutive task layers.

    ``model`` is left unchanged (its modules are deep-copied). ``kernel_size``, ``activation``,
    ``residual`` and ``init`` shape the warp layers (see :class:`WarpLayer`). ``seed`` seeds
    ``init='random'`` warps (the caller's RNG is not advanced; None: the global RNG); identity
    warps draw nothing, so a seed is rejected with them.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be a torch.nn.Sequential of task layers, got {type(model).__name__}")
    if isinstance(model, WarpedSequential):
        raise ValueError(f"model already has warp layers {list(model.warp_layer_names)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    if seed is not None and init != "random":
        raise ValueError(f"seed applies to init='random' warps only; init={init!r} draws no random numbers")
    if sum(isinstance(m, TASK_LAYERS) for m in model) < 2:
        raise ValueError(
            "interleaving warps needs at least two task layers (nn.Linear or nn.Conv2d) in the model, "
            f"found {sum(isinstance(m, TASK_LAYERS) for m in model)}"
        )
    options = {"kernel_size": kernel_size, "activation": activation, "residual": residual, "init": init}
    children: list[tuple[str, nn.Module]] = []
    warp_names: list[str] = []
    previous: nn.Module | None = None
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for name, module in model.named_children():
            if isinstance(module, TASK_LAYERS):
                if previous is not None:
                    at = len(children)
                    while at > 0 and isinstance(children[at - 1][1], nn.Flatten):
                        at -= 1  # a conv warp must see the feature maps, not the flattened vector
                    warp_name = f"warp{len(warp_names) + 1}"
                    if warp_name in model._modules:
                        raise ValueError(f"model already has a child named {warp_name!r}; rename it first")
                    children.insert(at, (warp_name, _warp_for(previous, **options)))
                    warp_names.append(warp_name)
                previous = module
            children.append((name, copy.deepcopy(module)))
    return WarpedSequential(dict(children), tuple(warp_names))
