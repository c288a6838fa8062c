"""Gradient-based meta-learning over episodes: MAML, MAML with learned scalar or per-layer rates, Meta-SGD.

All three adapt a model to an episode's support set with a few steps of
``theta <- theta - alpha * grad`` and meta-learn on the query loss after adaptation:

* ``lr_mode="fixed"``: MAML (Finn et al. 2017); alpha is the constant ``inner_lr``, only the
  initialisation theta is learned.
* ``lr_mode="scalar"``: MAML with one learned scalar alpha shared by every parameter.
* ``lr_mode="per_tensor"``: one learned scalar alpha per parameter tensor (a per-layer rate,
  as in Antoniou et al.'s MAML++ without its per-step rates).
* ``lr_mode="per_parameter"``: Meta-SGD (Li et al. 2017); alpha is a tensor of the same shape as
  each parameter, sign free (it learns update directions as well as rates), initialised to
  ``inner_lr`` and learned jointly with theta.

``first_order=True`` drops second derivatives: inner gradients are treated as constants, so the
meta-gradient reaches theta through the identity and alpha through ``-grad`` (FOMAML /
first-order Meta-SGD). Models are run with ``torch.func.functional_call`` over a dict of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metaoptimizer.config import MetaOptTrainResult, check_positive
from metaoptimizer.tasks.base import Batch, LossFn, Params, loss_fn
from metaoptimizer.tasks.episodes import Episode

LR_MODES = ("per_parameter", "per_tensor", "scalar", "fixed")
Forward = Callable[[Mapping[str, Tensor], Tensor], Tensor]


def inner_adapt(
    forward: Forward,
    params: Mapping[str, Tensor],
    step_sizes: Mapping[str, Tensor | float],
    batch: Batch,
    loss: LossFn,
    steps: int,
    *,
    first_order: bool,
) -> Params:
    """``steps`` gradient steps ``p <- p - step_size * grad`` on ``batch``, differentiable in
    ``params`` and ``step_sizes``.

    Second order keeps the graph of every inner gradient; first order evaluates each gradient at a
    detached copy of the parameters, so it enters the update as a constant.
    """
    x, y = batch
    adapted = dict(params)
    with torch.enable_grad():  # adaptation needs gradients even when the caller evaluates under no_grad
        for _ in range(steps):
            point = {n: p.detach().requires_grad_() for n, p in adapted.items()} if first_order else adapted
            inner_loss = loss(forward(point, x), y)
            grads = torch.autograd.grad(
                inner_loss, list(point.values()), create_graph=not first_order, materialize_grads=True
            )
            adapted = {n: p - step_sizes[n] * g for (n, p), g in zip(adapted.items(), grads)}
    return adapted


class EpisodicLearner:
    """Episode checks (type, loss/episode kind, device) and per-episode query metrics, shared by
    the learners that adapt a model to few-shot episodes (:class:`GradientMetaLearner` and
    :class:`~metaoptimizer.meta.warp_grad.WarpGradLearner`).

    Subclasses provide ``loss_name``, ``loss``, ``_device()``, ``adapt(episode, steps)`` and
    ``_forward(params, x)``.
    """

    def _check_episodes(self, episodes: Sequence[Episode]) -> list[Episode]:
        episodes = list(episodes)
        if not episodes:
            raise ValueError("episodes is empty; pass at least one Episode")
        for episode in episodes:
            if not isinstance(episode, Episode):
                raise TypeError(f"episodes must be Episode objects, got {type(episode).__name__}")
            if episode.is_classification != (self.loss_name == "cross_entropy"):
                kind = "classification" if episode.is_classification else "regression"
                raise ValueError(f"loss={self.loss_name!r} cannot be used on a {kind} episode ({episode.task_id})")
        device = self._device()
        return [e if e.support_x.device == device else e.to(device) for e in episodes]

    def evaluate(self, episodes: Sequence[Episode], steps: int | None = None) -> dict[str, list[float]]:
        """Per-episode query metrics after adaptation: ``loss`` always, ``accuracy`` for
        classification, ``mse`` for regression."""
        metrics: dict[str, list[float]] = {"loss": []}
        for episode in self._check_episodes(episodes):
            params = self.adapt(episode, steps)
            with torch.no_grad():
                out = self._forward(params, episode.query_x)
                metrics["loss"].append(float(self.loss(out, episode.query_y)))
                if episode.is_classification:
                    value, key = (out.argmax(-1) == episode.query_y).float().mean(), "accuracy"
                else:
                    value, key = F.mse_loss(out, episode.query_y), "mse"
                metrics.setdefault(key, []).append(float(value))
        return metrics


class GradientMetaLearner(EpisodicLearner):
    """Meta-learns a model's initialisation, and optionally its inner learning rates, on episodes.

    The meta-parameters (the model's parameters and the learned rates) are stepped by Adam with
    ``meta_lr``; the meta-gradient's global norm is clipped to ``gradient_clipping`` when set.
    A step whose meta-loss or meta-gradient is not finite is skipped and counted, never applied.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_steps: int = 1,
        inner_lr: float = 0.01,
        lr_mode: str = "per_parameter",
        first_order: bool = False,
        meta_lr: float = 1e-3,
        loss: str = "cross_entropy",
        gradient_clipping: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_positive("inner_steps", inner_steps, integer=True)
        check_positive("inner_lr", inner_lr)
        check_positive("meta_lr", meta_lr)
        if lr_mode not in LR_MODES:
            raise ValueError(f"lr_mode={lr_mode!r} is not supported; accepted values: {LR_MODES}")
        if not isinstance(first_order, bool):
            raise ValueError(f"first_order must be True or False, got {first_order!r}")
        if gradient_clipping is not None:
            check_positive("gradient_clipping", gradient_clipping)
        self.model = model
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("model has no trainable parameters to meta-learn")
        self.inner_steps, self.inner_lr, self.lr_mode = inner_steps, float(inner_lr), lr_mode
        self.first_order, self.meta_lr, self.gradient_clipping = first_order, meta_lr, gradient_clipping
        self.loss_name, self.loss = loss, loss_fn(loss)
        self.learned_rates = nn.ParameterList(self._initial_rates())
        self.meta_optimizer = torch.optim.Adam(self.meta_parameters(), lr=meta_lr)
        self.steps = 0
        self.skipped = 0

    def _initial_rates(self) -> list[nn.Parameter]:
        params = self.params()
        if self.lr_mode == "per_parameter":
            return [nn.Parameter(torch.full_like(params[n], self.inner_lr)) for n in self.names]
        if self.lr_mode == "per_tensor":
            return [nn.Parameter(params[n].new_tensor(self.inner_lr)) for n in self.names]
        if self.lr_mode == "scalar":
            reference = params[self.names[0]]
            return [nn.Parameter(torch.tensor(self.inner_lr, dtype=reference.dtype, device=reference.device))]
        return []

    # -- parameters -------------------------------------------------------------------------

    def params(self) -> Params:
        """The model's trainable parameters (the learned initialisation), by name."""
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self.names}

    def meta_parameters(self) -> list[nn.Parameter]:
        return list(self.params().values()) + list(self.learned_rates)

    def step_sizes(self) -> dict[str, Tensor | float]:
        """Inner step size of every parameter: a tensor (per_parameter), a 0-d tensor (per_tensor:
        its own; scalar: shared) or the constant ``inner_lr`` (fixed); differentiable when learned."""
        if self.lr_mode in ("per_parameter", "per_tensor"):
            return dict(zip(self.names, self.learned_rates))
        if self.lr_mode == "scalar":
            return dict.fromkeys(self.names, self.learned_rates[0])
        return dict.fromkeys(self.names, self.inner_lr)

    @property
    def per_param_lr(self) -> dict[str, Tensor]:
        """The full inner learning-rate tensor of every parameter (detached, parameter-shaped)."""
        params = self.params()
        return {
            n: torch.as_tensor(alpha, dtype=params[n].dtype, device=params[n].device).detach().expand_as(params[n])
            for n, alpha in self.step_sizes().items()
        }

    def learned_lr(self) -> dict[str, float]:
        """Mean absolute inner learning rate per parameter tensor."""
        return {n: float(alpha.abs().mean()) for n, alpha in self.per_param_lr.items()}

    # -- adaptation and meta-objective ------------------------------------------------------

    def _forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.model, dict(params), (x,))

    def _device(self) -> torch.device:
        return self.params()[self.names[0]].device

    def _adapt(self, episode: Episode, steps: int, *, first_order: bool) -> Params:
        return inner_adapt(
            self._forward, self.params(), self.step_sizes(), episode.support, self.loss, steps, first_order=first_order
        )

    def meta_loss(self, episodes: Sequence[Episode]) -> Tensor:
        """Mean query loss after adapting to each episode's support set (differentiable)."""
        episodes = self._check_episodes(episodes)
        losses = []
        for episode in episodes:
            adapted = self._adapt(episode, self.inner_steps, first_order=self.first_order)
            losses.append(self.loss(self._forward(adapted, episode.query_x), episode.query_y))
        return torch.stack(losses).mean()

    def meta_train_step(self, episodes: Sequence[Episode]) -> MetaOptTrainResult:
        """One meta-update on a batch of episodes; non-finite steps are skipped and counted."""
        self.meta_optimizer.zero_grad(set_to_none=True)
        meta_loss = self.meta_loss(episodes)
        parameters = self.meta_parameters()
        grad_norm = math.nan
        if torch.isfinite(meta_loss):
            meta_loss.backward()
            grads = [p.grad for p in parameters if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            grad_norm = float(norm)
        skipped = not math.isfinite(grad_norm)
        if skipped:
            self.meta_optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
        else:
            if self.gradient_clipping is not None:
                torch.nn.utils.clip_grads_with_norm_(parameters, self.gradient_clipping, norm)
            self.meta_optimizer.step()
            self.steps += 1
        return MetaOptTrainResult(
            meta_loss=float(meta_loss.detach()),
            meta_grad_norm=grad_norm,
            skipped=skipped,
            steps=self.steps,
            skipped_total=self.skipped,
            inner_steps=self.inner_steps * len(episodes),
        )

    def adapt(self, episode: Episode, steps: int | None = None) -> Params:
        """Parameters adapted to ``episode``'s support set (detached; ``steps`` defaults to
        ``inner_steps``)."""
        steps = self.inner_steps if steps is None else steps
        check_positive("steps", steps, integer=True)
        (episode,) = self._check_episodes([episode])
        return {n: p.detach() for n, p in self._adapt(episode, steps, first_order=True).items()}

    # -- checkpoints ------------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "inner_steps": self.inner_steps, "inner_lr": self.inner_lr, "lr_mode": self.lr_mode,
            "first_order": self.first_order, "meta_lr": self.meta_lr, "loss": self.loss_name,
            "gradient_clipping": self.gradient_clipping,
        }

    def state_dict(self) -> dict[str, Any]:
        """Model weights, learned rates, meta-optimizer state and step counters."""
        return {
            "hyperparameters": self.hyperparameters(),
            "model": self.model.state_dict(),
            "learned_rates": [r.detach().clone() for r in self.learned_rates],
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "steps": self.steps,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"hyperparameters", "model", "learned_rates", "meta_optimizer", "steps", "skipped"}
        if not isinstance(state, Mapping) or set(state) != expected:
            found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not a GradientMetaLearner state dict: expected keys {sorted(expected)}, got {found}")
        saved, own = state["hyperparameters"], self.hyperparameters()
        structural = ("lr_mode", "loss") + (("inner_lr",) if self.lr_mode == "fixed" else ())
        for key in structural:
            if saved.get(key) != own[key]:
                raise ValueError(
                    f"state dict was saved with {key}={saved.get(key)!r}, this learner has {key}={own[key]!r}"
                )
        rates = state["learned_rates"]
        if len(rates) != len(self.learned_rates) or any(
            r.shape != own.shape for r, own in zip(rates, self.learned_rates)
        ):
            raise ValueError("learned rates in the state dict do not match this model's parameter shapes")
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            for own, saved in zip(self.learned_rates, rates):
                own.copy_(saved)
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])
