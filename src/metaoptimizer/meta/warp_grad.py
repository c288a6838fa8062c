"""Warp-Grad: meta-learned preconditioning through warp layers (Flennerhag et al. 2020).

The learner is a network whose layers are split in two: *task layers* (parameters theta), adapted
to each episode's support set by an inner rule (SGD by default), and *warp layers* (parameters
phi, see :mod:`metaoptimizer.tasks.warp_models`), held fixed while a task adapts. Because the task
gradient is backpropagated through the warp layers, their Jacobians precondition it: phi shapes
the geometry that gradient descent on theta sees. Warp layers start as the identity, so an
untrained warped learner is its plain learner.

Meta-objective (the paper's trajectory objective). Each meta-step adapts the task layers to a
batch of episodes and keeps points theta_k of the inner trajectories in a buffer (detached: they
are constants; ``trajectory_samples`` points drawn per trajectory, or all of them). At each
buffered point the inner rule takes one step with the current phi and the query loss is measured
after it::

    J(phi) = mean over buffered (episode, k) of  L_query( theta_k + u(grad L_support(theta_k; phi)); phi )

The buffer is shuffled and split into meta-updates of ``points_per_update`` points (the paper's
Algorithm 2 takes several meta-updates per batch of tasks), or used whole in one update. The
meta-gradient never backpropagates through the inner loop: its autograd memory is that of one
inner step whatever ``inner_steps`` is, and points are differentiated one at a time. The default
(second-order) variant differentiates through that one step (a Hessian-vector product through
the warp layers); ``first_order=True`` treats the step as a constant and differentiates only
``L_query(theta_{k+1}; phi)`` (the paper's Hessian-free approximation).

Initialisation. With ``learn_init=True`` (the default) the task layers' initialisation theta_0 is
meta-learned too, from the same sampled losses: each contributes its gradient with respect to
the sampled point (theta_k in the second-order variant, theta_{k+1} in the first-order one), the
path from theta_0 to that point being treated as the identity. With ``inner_steps=1`` this is
exactly MAML's meta-gradient (second order) or first-order MAML's (first order); with more steps
it is first-order MAML applied at every sampled point (a memory-flat alternative to the
paper's Warp-MAML / Warp-Leap variants). With ``learn_init=False`` every episode starts from the
model's initial task parameters and only the warp layers are learned.

A model without warp layers and ``learn_init=True`` is the MAML-like baseline through the same
code (``preconditioning=False`` in :meth:`WarpGradLearner.from_config`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaoptimizer.config import MetaOptimizerConfig, MetaOptTrainResult, check_positive
from metaoptimizer.meta._step import apply_meta_gradient
from metaoptimizer.meta.gradient_learner import EpisodicLearner
from metaoptimizer.rules.base import Params, UpdateRule, apply_updates
from metaoptimizer.rules.hand import HAND_RULES, make_hand_rule
from metaoptimizer.rules.state import OptimizerState
from metaoptimizer.tasks.base import LossFn, loss_fn
from metaoptimizer.tasks.episodes import Episode
from metaoptimizer.tasks.warp_models import interleave_warps

#: Learning rate of a named inner rule when ``inner_lr`` is not given.
DEFAULT_INNER_LR = 0.1
#: Inner steps per episode that :meth:`WarpGradLearner.from_config` uses unless ``rule_options`` say.
DEFAULT_INNER_STEPS = 5
#: ``MetaOptimizerConfig.rule_options`` keys that :meth:`WarpGradLearner.from_config` accepts.
RULE_OPTIONS = (
    "inner_steps", "inner_lr", "inner_rule", "trajectory_samples", "points_per_update", "learn_init",
    "warp_kernel_size", "warp_activation", "warp_residual", "warp_init",
)

Forward = Callable[[Mapping[str, Tensor], Tensor], Tensor]


@dataclass
class TrajectoryMetaGradient:
    """The trajectory meta-objective of one episode.

    ``meta_loss`` is the mean query loss over the sampled points (a float), ``warp_grads`` its
    gradient for each warp tensor (in the order given), ``init_grads`` its gradient with respect
    to the sampled task-parameter points (empty unless asked for), ``adapted`` the task parameters
    after the whole inner loop (detached) and ``finite`` whether the sampled losses were finite.
    With no sampled point (adaptation only) ``meta_loss`` is NaN and the gradients are zero.
    """

    meta_loss: float
    warp_grads: list[Tensor]
    init_grads: dict[str, Tensor]
    adapted: Params
    finite: bool


def _leaf(params: Mapping[str, Tensor]) -> Params:
    """Detached copies that require grad: a trajectory point treated as a constant."""
    return {n: p.detach().requires_grad_() for n, p in params.items()}


def sample_trajectory_points(steps: int, count: int | None, generator: torch.Generator | None = None) -> list[int]:
    """``count`` distinct inner-step indices in ``[0, steps)``, sorted (every index when ``count``
    is None): the points of a trajectory at which the meta-objective is taken."""
    check_positive("steps", steps, integer=True)
    if count is None:
        return list(range(steps))
    check_positive("count", count, integer=True)
    if count > steps:
        raise ValueError(f"cannot sample {count} points from a trajectory of {steps} inner steps")
    return sorted(torch.randperm(steps, generator=generator)[:count].tolist())


@dataclass(frozen=True)
class TrajectoryPoint:
    """One entry of the trajectory buffer: ``params`` (detached task parameters) and ``state``
    (the inner rule's state) before inner step ``step`` (0-based) of ``episode``."""

    episode: Episode
    step: int
    params: Params
    state: OptimizerState


def _inner_step(
    forward: Forward, rule: UpdateRule, point: Params, state: OptimizerState, batch: tuple[Tensor, Tensor],
    loss: LossFn, *, create_graph: bool,
) -> tuple[Params, OptimizerState]:
    """One step of ``rule`` on ``batch`` from ``point`` (differentiable when ``create_graph``);
    the rule sees the support loss too, for rules that read it."""
    support_loss = loss(forward(point, batch[0]), batch[1])
    grads = torch.autograd.grad(support_loss, list(point.values()), create_graph=create_graph, materialize_grads=True)
    updates, state = rule.update(dict(zip(point, grads)), state, point, loss=support_loss.detach())
    return apply_updates(point, updates), state


def collect_trajectory(
    forward: Forward, init: Mapping[str, Tensor], rule: UpdateRule, episode: Episode, loss: LossFn, steps: int,
    points: Sequence[int] = (),
) -> tuple[list[TrajectoryPoint], Params]:
    """Run ``steps`` inner steps of ``rule`` on the support set from ``init`` (warps fixed, no
    meta-graph); return the buffer entries of the inner steps listed in ``points`` and the adapted
    task parameters (detached)."""
    points = set(points)
    params = {n: p.detach() for n, p in init.items()}
    state = rule.init(params, num_steps=steps)
    buffer: list[TrajectoryPoint] = []
    with torch.enable_grad():
        for k in range(steps):
            if k in points:
                buffer.append(TrajectoryPoint(episode, k, params, state))
            following, state = _inner_step(forward, rule, _leaf(params), state, episode.support, loss, create_graph=False)
            params = {n: p.detach() for n, p in following.items()}
            state = state.detach()
    return buffer, params


def point_meta_gradient(
    forward: Forward,
    warp_params: Sequence[Tensor],
    point: TrajectoryPoint,
    rule: UpdateRule,
    loss: LossFn,
    *,
    first_order: bool,
    init_grads: bool,
) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
    """The meta-objective at one buffered point: the query loss after one inner step from it (see
    the module docstring), with its gradient for each warp tensor and, when ``init_grads``, for
    the task parameters (at the point; at the next point in the first-order variant)."""
    xq, yq = point.episode.query
    with torch.enable_grad():
        start = _leaf(point.params)
        following, _ = _inner_step(
            forward, rule, start, point.state, point.episode.support, loss, create_graph=not first_order
        )
        evaluated = _leaf(following) if first_order else following
        leaves = evaluated if first_order else start
        query_loss = loss(forward(evaluated, xq), yq)
        wrt = list(warp_params) + (list(leaves.values()) if init_grads else [])
        grads = torch.autograd.grad(query_loss, wrt, allow_unused=True, materialize_grads=True)
    init = dict(zip(leaves, grads[len(warp_params) :])) if init_grads else {}
    return query_loss.detach(), list(grads[: len(warp_params)]), init


def trajectory_meta_gradient(
    forward: Forward,
    warp_params: Sequence[Tensor],
    init: Mapping[str, Tensor],
    rule: UpdateRule,
    episode: Episode,
    loss: LossFn,
    steps: int,
    points: Sequence[int],
    *,
    first_order: bool,
    init_grads: bool,
) -> TrajectoryMetaGradient:
    """Run ``steps`` inner steps of ``rule`` on the support set from ``init`` (warps fixed) and
    take the meta-objective at the inner steps listed in ``points`` (see the module docstring),
    averaged over the points.

    ``forward(task_params, x)`` must read the warp parameters ``warp_params`` itself. Each sampled
    loss is differentiated on its own, so at most one inner step's graph is alive.
    """
    buffer, adapted = collect_trajectory(forward, init, rule, episode, loss, steps, points)
    warp_total = [torch.zeros_like(p) for p in warp_params]
    init_total = {n: torch.zeros_like(p) for n, p in init.items()} if init_grads else {}
    losses: list[Tensor] = []
    for point in buffer:
        query_loss, warp_grads, point_init = point_meta_gradient(
            forward, warp_params, point, rule, loss, first_order=first_order, init_grads=init_grads
        )
        for total, g in zip(warp_total, warp_grads):
            total.add_(g)
        for name, g in point_init.items():
            init_total[name].add_(g)
        losses.append(query_loss)
    count = max(len(losses), 1)
    mean_loss = float(torch.stack(losses).mean()) if losses else math.nan
    return TrajectoryMetaGradient(
        meta_loss=mean_loss,
        warp_grads=[g / count for g in warp_total],
        init_grads={n: g / count for n, g in init_total.items()},
        adapted=adapted,
        finite=not losses or math.isfinite(mean_loss),
    )


class WarpGradLearner(EpisodicLearner):
    """Meta-learns warp layers (and optionally the task layers' initialisation) on episodes.

    ``model`` is the warped learner; ``warp_layers`` names its submodules whose parameters are warp
    parameters (default: ``model.warp_layer_names`` of a :class:`WarpedSequential`, else none).
    Every other trainable parameter is a task parameter. ``inner_rule`` is a hand-rule name (built
    with ``lr=inner_lr``, default :data:`DEFAULT_INNER_LR`) or an :class:`UpdateRule` instance
    (then ``inner_lr`` must be None); its own parameters, if any, are not meta-learned.
    ``trajectory_samples`` points per episode are drawn from a generator seeded with ``seed``
    (None: every inner step) into the trajectory buffer of a meta-step; ``points_per_update``
    splits the shuffled buffer into meta-updates of that many points (the paper's Algorithm 2,
    several meta-updates per meta-batch of tasks; None: one update on the whole buffer).
    Meta-parameters are stepped by Adam(``meta_lr``) after global-norm clipping to
    ``gradient_clipping``; non-finite updates are skipped and counted.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        warp_layers: Sequence[str] | None = None,
        inner_steps: int = 5,
        inner_lr: float | None = None,
        inner_rule: str | UpdateRule = "sgd",
        meta_lr: float = 1e-3,
        first_order: bool = False,
        trajectory_samples: int | None = None,
        points_per_update: int | None = None,
        learn_init: bool = True,
        loss: str = "cross_entropy",
        gradient_clipping: float | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_positive("inner_steps", inner_steps, integer=True)
        check_positive("meta_lr", meta_lr)
        if trajectory_samples is not None:
            check_positive("trajectory_samples", trajectory_samples, integer=True)
            if trajectory_samples > inner_steps:
                raise ValueError(
                    f"trajectory_samples={trajectory_samples} exceeds inner_steps={inner_steps}; "
                    "a trajectory has one point per inner step (use None for all of them)"
                )
        if points_per_update is not None:
            check_positive("points_per_update", points_per_update, integer=True)
        for flag, value in (("first_order", first_order), ("learn_init", learn_init)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
        if gradient_clipping is not None:
            check_positive("gradient_clipping", gradient_clipping)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.model = model
        self.warp_layers = self._resolve_warp_layers(model, warp_layers)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        is_warp = lambda name: any(name.startswith(f"{layer}.") for layer in self.warp_layers)  # noqa: E731
        self._warp_names = [n for n, _ in trainable if is_warp(n)]
        self._task_names = [n for n, _ in trainable if not is_warp(n)]
        if not self._task_names:
            raise ValueError("model has no task parameters to adapt: every trainable parameter is in a warp layer")
        if not self._warp_names and not learn_init:
            raise ValueError(
                "nothing to meta-learn: the model has no warp parameters and learn_init=False; "
                "add warp layers (interleave_warps) or set learn_init=True"
            )
        self.inner_rule, self.inner_rule_name, self.inner_lr = self._resolve_rule(inner_rule, inner_lr)
        self.inner_steps, self.meta_lr, self.first_order = inner_steps, meta_lr, first_order
        self.trajectory_samples, self.points_per_update = trajectory_samples, points_per_update
        self.learn_init = learn_init
        self.gradient_clipping, self.seed = gradient_clipping, seed
        self.loss_name, self.loss = loss, loss_fn(loss)
        self.meta_optimizer = torch.optim.Adam(self.meta_parameters(), lr=meta_lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.skipped = 0

    @staticmethod
    def _resolve_warp_layers(model: nn.Module, warp_layers: Sequence[str] | None) -> tuple[str, ...]:
        if warp_layers is None:
            return tuple(getattr(model, "warp_layer_names", ()))
        if isinstance(warp_layers, str) or not all(isinstance(w, str) for w in warp_layers):
            raise ValueError(f"warp_layers must be a list of submodule names, got {warp_layers!r}")
        modules = dict(model.named_modules())
        for layer in warp_layers:
            if layer not in modules or layer == "":
                raise ValueError(
                    f"warp layer {layer!r} is not a submodule of the model; submodules: {sorted(modules)[1:]}"
                )
            if not any(p.requires_grad for p in modules[layer].parameters()):
                raise ValueError(f"warp layer {layer!r} has no trainable parameters")
        return tuple(warp_layers)

    @staticmethod
    def _resolve_rule(inner_rule: str | UpdateRule, inner_lr: float | None) -> tuple[UpdateRule, str, float | None]:
        if isinstance(inner_rule, UpdateRule):
            if inner_lr is not None:
                raise ValueError("inner_lr applies to a named inner_rule only; set the rate on the rule instance")
            return inner_rule, inner_rule.name, None
        if not isinstance(inner_rule, str) or inner_rule not in HAND_RULES:
            raise ValueError(
                f"inner_rule={inner_rule!r} is not supported; accepted values: an UpdateRule or one of "
                f"{tuple(HAND_RULES)}"
            )
        lr = DEFAULT_INNER_LR if inner_lr is None else inner_lr
        check_positive("inner_lr", lr)
        return make_hand_rule(inner_rule, lr=lr), inner_rule, float(lr)

    @classmethod
    def from_config(cls, model: nn.Module, config: MetaOptimizerConfig) -> WarpGradLearner:
        """The learner for ``method='warp_grad'`` (the facade's conventions).

        ``preconditioning=True``: a warped model is used as it is, a plain ``nn.Sequential`` gets
        identity-initialised warp layers interleaved in a copy (``rule_options``
        ``warp_kernel_size`` / ``warp_activation`` / ``warp_residual`` / ``warp_init``; random warps
        are seeded by ``config.seed``); ``preconditioning=False``: no layer is a warp (every layer
        is adapted), the MAML-like baseline. ``second_order=False`` selects the first-order
        objective. ``rule_options`` may also set ``inner_steps`` (default
        :data:`DEFAULT_INNER_STEPS`), ``inner_lr``, ``inner_rule``, ``trajectory_samples``,
        ``points_per_update`` and ``learn_init``; see :data:`RULE_OPTIONS`. The returned learner's
        ``model`` is the warped model: ``model`` itself when it already has warp layers (or
        without preconditioning), else the new copy; ``model`` is never modified.
        """
        if not isinstance(config, MetaOptimizerConfig):
            raise TypeError(f"config must be a MetaOptimizerConfig, got {type(config).__name__}")
        if config.method != "warp_grad":
            raise ValueError(f"config.method is {config.method!r}; WarpGradLearner needs method='warp_grad'")
        unknown = sorted(set(config.rule_options) - set(RULE_OPTIONS))
        if unknown:
            raise ValueError(f"unknown warp_grad rule_options {unknown}; accepted keys: {list(RULE_OPTIONS)}")
        options = dict(config.rule_options)
        warp_options = {
            key: options.pop(f"warp_{key}")
            for key in ("kernel_size", "activation", "residual", "init")
            if f"warp_{key}" in options
        }
        warp_layers: list[str] | None = None
        if not config.preconditioning:
            if warp_options:
                raise ValueError(f"rule_options {sorted('warp_' + k for k in warp_options)} need preconditioning=True")
            warp_layers = []
        elif not getattr(model, "warp_layer_names", ()):
            seed = config.seed if warp_options.get("init") == "random" else None
            model = interleave_warps(model, seed=seed, **warp_options)
        elif warp_options:
            raise ValueError(
                f"rule_options {sorted('warp_' + k for k in warp_options)} shape new warp layers, "
                "but the model already has warp layers"
            )
        options.setdefault("inner_steps", DEFAULT_INNER_STEPS)
        return cls(
            model,
            warp_layers=warp_layers,
            meta_lr=config.meta_lr,
            first_order=not config.second_order,
            loss=config.loss,
            gradient_clipping=config.gradient_clipping,
            seed=config.seed,
            **options,
        )

    # -- parameters -------------------------------------------------------------------------

    def warp_parameter_names(self) -> list[str]:
        """Names of the warp parameters (meta-learned, fixed during adaptation)."""
        return list(self._warp_names)

    def task_parameter_names(self) -> list[str]:
        """Names of the task parameters (adapted per episode; their initialisation is meta-learned
        when ``learn_init``)."""
        return list(self._task_names)

    def _named(self, names: Sequence[str]) -> dict[str, nn.Parameter]:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in names}

    def params(self) -> Params:
        """The task parameters' initialisation, by name."""
        return self._named(self._task_names)

    def warp_params(self) -> Params:
        """The warp parameters, by name."""
        return self._named(self._warp_names)

    def meta_parameter_names(self) -> list[str]:
        """Warp parameter names, then the task parameter names when ``learn_init``."""
        return self._warp_names + (self._task_names if self.learn_init else [])

    def meta_parameters(self) -> list[nn.Parameter]:
        """The tensors that the meta-optimizer steps, in :meth:`meta_parameter_names` order."""
        return list(self._named(self.meta_parameter_names()).values())

    # -- adaptation and meta-objective ------------------------------------------------------

    def _forward(self, task_params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The model with ``task_params`` substituted; warp parameters are the model's own."""
        return functional_call(self.model, dict(task_params), (x,))

    def _device(self) -> torch.device:
        return self.params()[self._task_names[0]].device

    def collect(self, episodes: Sequence[Episode]) -> list[TrajectoryPoint]:
        """The trajectory buffer of ``episodes``: each episode adapted from the current
        initialisation, its ``trajectory_samples`` points (drawn from the learner's generator)
        kept, in episode order."""
        buffer: list[TrajectoryPoint] = []
        for episode in self._check_episodes(episodes):
            points = sample_trajectory_points(self.inner_steps, self.trajectory_samples, self.generator)
            buffer += collect_trajectory(
                self._forward, self.params(), self.inner_rule, episode, self.loss, self.inner_steps, points
            )[0]
        return buffer

    def points_gradient(self, points: Sequence[TrajectoryPoint]) -> tuple[float, dict[str, Tensor], bool]:
        """Mean meta-objective over buffered ``points``, its gradient for every meta-parameter (by
        name: warp parameters, and task parameters when ``learn_init``), and whether it is finite."""
        warp_names = self._warp_names
        warps = list(self.warp_params().values())
        grads = {n: torch.zeros_like(p) for n, p in self._named(self.meta_parameter_names()).items()}
        losses = []
        for point in points:
            query_loss, warp_grads, init_grads = point_meta_gradient(
                self._forward, warps, point, self.inner_rule, self.loss,
                first_order=self.first_order, init_grads=self.learn_init,
            )
            for name, g in [*zip(warp_names, warp_grads), *init_grads.items()]:
                grads[name].add_(g, alpha=1 / len(points))
            losses.append(float(query_loss))
        meta_loss = sum(losses) / len(losses)
        return meta_loss, grads, math.isfinite(meta_loss)

    def meta_gradient(self, episodes: Sequence[Episode]) -> tuple[float, dict[str, Tensor], bool]:
        """:meth:`points_gradient` over the whole buffer of ``episodes`` (see :meth:`collect`)."""
        return self.points_gradient(self.collect(episodes))

    def meta_train_step(self, episodes: Sequence[Episode]) -> MetaOptTrainResult:
        """Fill the trajectory buffer from a batch of episodes, then meta-update on it: once, or
        once per ``points_per_update`` shuffled points. Non-finite updates are skipped and counted;
        the result reports the mean meta-loss and meta-gradient norm over the updates, ``skipped``
        if any update was, and ``steps`` counts applied meta-updates."""
        episodes = list(episodes)
        buffer = self.collect(episodes)
        if self.points_per_update is not None:
            order = torch.randperm(len(buffer), generator=self.generator).tolist()
            buffer = [buffer[i] for i in order]
        size = self.points_per_update or len(buffer)
        names = self.meta_parameter_names()
        losses, norms, any_skipped = [], [], False
        for start in range(0, len(buffer), size):
            meta_loss, grads, finite = self.points_gradient(buffer[start : start + size])
            norm, skipped = apply_meta_gradient(
                self.meta_optimizer, self.meta_parameters(), [grads[n] for n in names], self.gradient_clipping, finite
            )
            self.skipped += skipped
            self.steps += not skipped
            any_skipped = any_skipped or skipped
            losses.append(meta_loss)
            norms.append(norm)
        return MetaOptTrainResult(
            meta_loss=sum(losses) / len(losses),
            meta_grad_norm=sum(norms) / len(norms),
            skipped=any_skipped,
            steps=self.steps,
            skipped_total=self.skipped,
            inner_steps=self.inner_steps * len(episodes),
        )

    def adapt(self, episode: Episode, steps: int | None = None) -> Params:
        """Task parameters adapted to ``episode``'s support set, warp layers fixed (detached;
        ``steps`` defaults to ``inner_steps``)."""
        steps = self.inner_steps if steps is None else steps
        check_positive("steps", steps, integer=True)
        (episode,) = self._check_episodes([episode])
        return collect_trajectory(self._forward, self.params(), self.inner_rule, episode, self.loss, steps)[1]

    # -- checkpoints ------------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "warp_layers": list(self.warp_layers), "inner_steps": self.inner_steps, "inner_lr": self.inner_lr,
            "inner_rule": self.inner_rule_name, "meta_lr": self.meta_lr, "first_order": self.first_order,
            "trajectory_samples": self.trajectory_samples, "points_per_update": self.points_per_update,
            "learn_init": self.learn_init, "loss": self.loss_name,
            "gradient_clipping": self.gradient_clipping, "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """Model weights (warps and task initialisation), meta-optimizer state, point-sampling
        generator and step counters."""
        return {
            "hyperparameters": self.hyperparameters(),
            "model": self.model.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "steps": self.steps,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"hyperparameters", "model", "meta_optimizer", "generator", "steps", "skipped"}
        if not isinstance(state, Mapping) or set(state) != expected:
            found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not a WarpGradLearner state dict: expected keys {sorted(expected)}, got {found}")
        saved, own = state["hyperparameters"], self.hyperparameters()
        for key in ("warp_layers", "learn_init", "loss"):
            if saved.get(key) != own[key]:
                raise ValueError(
                    f"state dict was saved with {key}={saved.get(key)!r}, this learner has {key}={own[key]!r}"
                )
        self.model.load_state_dict(state["model"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.generator.set_state(state["generator"])
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])


class SavedTensorMeter:
    """Bytes of tensors that autograd holds for backward, current and peak, while the context is
    active: a device-independent measure of a (meta-)step's activation memory.

    Every saved tensor is counted at its full size each time it is saved (views and parameters
    included), so the figure is an upper bound that is exact in how it scales.
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hooks.__exit__(*exc_info)

    def _pack(self, tensor: Tensor) -> _Saved:
        saved = _Saved(tensor, self)
        self.current += saved.nbytes
        self.peak = max(self.peak, self.current)
        return saved

    @staticmethod
    def _unpack(saved: _Saved) -> Tensor:
        return saved.tensor


class _Saved:
    """A saved tensor that returns its bytes to the meter when autograd frees it."""

    __slots__ = ("tensor", "nbytes", "meter")

    def __init__(self, tensor: Tensor, meter: SavedTensorMeter) -> None:
        self.tensor, self.meter = tensor, meter
        self.nbytes = tensor.numel() * tensor.element_size()

    def __del__(self) -> None:
        self.meter.current -= self.nbytes
