"""``MetaOptimizer``: the project's spec API over the functional core.

It binds an update rule to a model: ``compute_update`` turns gradients into updates,
``meta_train_step`` improves the rule from episodes, ``torch_optimizer`` hands the rule to an
ordinary PyTorch training loop, and ``save``/``load`` persist it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metaoptimizer.checkpoint import load_checkpoint, save_checkpoint
from metaoptimizer.config import MetaOptimizerConfig, MetaOptTrainResult, build_rule
from metaoptimizer.meta._step import apply_estimate
from metaoptimizer.meta.estimators import TruncatedBPTT
from metaoptimizer.meta.runs import TaskRun
from metaoptimizer.rules.base import Params, UpdateRule, check_grads, from_spec, to_spec
from metaoptimizer.rules.state import OptimizerState
from metaoptimizer.tasks.base import TRAIN, ModuleTask, Task, split_seed

CHECKPOINT_KIND = "metaoptimizer"


def _is_episode(obj: object) -> bool:
    return all(hasattr(obj, f) for f in ("support_x", "support_y", "query_x", "query_y"))


class MetaOptimizer:
    """A learned optimizer bound to ``base_model`` (which may be None for a rule used only through
    :meth:`torch_optimizer`).

    ``rule`` overrides the rule that ``config`` would build (for example a trained one, or any
    rule of :mod:`metaoptimizer.rules`); it is saved with its spec, so :meth:`load` rebuilds it.
    """

    def __init__(
        self,
        base_model: nn.Module | None = None,
        config: MetaOptimizerConfig | None = None,
        *,
        rule: UpdateRule | None = None,
    ) -> None:
        if config is None:
            config = MetaOptimizerConfig()
        if not isinstance(config, MetaOptimizerConfig):
            raise TypeError(f"config must be a MetaOptimizerConfig, got {type(config).__name__}")
        if base_model is not None and not isinstance(base_model, nn.Module):
            raise TypeError(f"base_model must be a torch.nn.Module or None, got {type(base_model).__name__}")
        self.config = config
        self.base_model = base_model
        self.rule = rule if rule is not None else build_rule(config)
        meta_parameters = self._meta_parameters()
        # A rule built here starts untrained: kept to tell torch_optimizer's users (see _warn_if_untrained).
        self._initial_weights = None if rule is not None else [p.detach().clone() for p in meta_parameters]
        # Episode learners (meta_sgd, warp_grad) hold their own meta-optimizer.
        self.meta_optimizer = torch.optim.Adam(meta_parameters, lr=config.meta_lr) if meta_parameters else None
        self.estimator = TruncatedBPTT(config.meta_objective, config.second_order)
        self.meta_steps = 0
        self.skipped_meta_steps = 0
        self._episodes_seen = 0
        self._effective_lr: dict[str, float] = {}
        self.state = OptimizerState()  # the rule fills it on the first compute_update
        self.learner = self._episode_learner()

    def _episode_learner(self) -> Any:
        """The few-shot meta-learner that ``meta_train_step`` delegates to for 'meta_sgd' and
        'warp_grad' (None for rules meta-trained by unrolls: 'lstm', 'l2o').

        ``rule_options`` keys ``inner_steps``, ``inner_lr`` and ``lr_mode`` ('per_parameter' is
        Meta-SGD, 'scalar' MAML with a learned scalar rate) configure it; ``second_order=False``
        makes it first-order. For 'meta_sgd', ``compute_update`` and ``torch_optimizer`` use
        ``self.rule`` instead, the online per-coordinate ``HypergradientRule`` (as
        ``method='hypergradient'``), which does not read the learner's meta-trained rates.
        """
        if self.config.method not in ("meta_sgd", "warp_grad") or self.base_model is None:
            return None
        if self.config.method == "warp_grad":
            return self._warp_grad_learner()
        options = self.config.rule_options
        from metaoptimizer.meta.gradient_learner import GradientMetaLearner

        return GradientMetaLearner(
            self.base_model, inner_steps=options.get("inner_steps", 1), inner_lr=options.get("inner_lr", 0.01),
            lr_mode=options.get("lr_mode", "per_parameter"), first_order=not self.config.second_order,
            meta_lr=self.config.meta_lr, loss=self.config.loss, gradient_clipping=self.config.gradient_clipping,
        )

    def _warp_grad_learner(self) -> Any:
        """Warp-Grad over the base model (see ``WarpGradLearner.from_config``); it meta-trains
        :attr:`warped_model`, and ``base_model`` is left as the user passed it."""
        from metaoptimizer.meta.warp_grad import WarpGradLearner

        return WarpGradLearner.from_config(self.base_model, self.config)

    # -- few-shot (episode learners: meta_sgd, warp_grad) ---------------------------------------
    @property
    def warped_model(self) -> nn.Module | None:
        """The model that ``method='warp_grad'`` meta-trains and adapts: ``base_model`` itself when
        it already has warp layers (or with ``preconditioning=False``), else a copy of it with
        identity-initialised warp layers interleaved (``base_model`` is never modified or
        replaced). Its task layers hold the meta-learned initialisation. None for other methods."""
        return self.learner.model if self.config.method == "warp_grad" and self.learner is not None else None

    def evaluate_fewshot(
        self, sampler: Any, episodes: int = 600, *, seed: int = 0, inner_steps: int | None = None
    ) -> Any:
        """Meta-test score on ``episodes`` episodes of ``sampler`` (a ``TaskDistributionSampler``,
        e.g. ``metaoptimizer.tasks.episodes.omniglot_sampler(root, 'test', n_way=5, k_shot=1)``),
        each adapted with ``inner_steps`` inner steps (default: the learner's): a ``FewShotScore``
        with ``metric`` ('accuracy' or 'mse'), ``mean``, ``ci95`` (95% interval half-width) and the
        per-episode ``values`` (pair two scores with ``paired_difference``)."""
        from metaoptimizer.evaluate.fewshot import fewshot_score
        from metaoptimizer.tasks.episodes import TaskDistributionSampler

        if self.learner is None:
            raise ValueError(
                f"evaluate_fewshot needs an episode learner: method='meta_sgd' or 'warp_grad' with a base_model, "
                f"got method={self.config.method!r}{'' if self.base_model is not None else ' without a base_model'}"
            )
        if not isinstance(sampler, TaskDistributionSampler):
            raise TypeError(f"sampler must be a TaskDistributionSampler, got {type(sampler).__name__}")
        return fewshot_score(self.learner, sampler, episodes=episodes, seed=seed, steps=inner_steps)

    # -- helpers -----------------------------------------------------------------------------
    def _meta_parameters(self) -> list[Tensor]:
        return [p for p in self.rule.parameters() if p.requires_grad]

    def _model_params(self, model: nn.Module | None = None) -> Params:
        model = model if model is not None else self.base_model
        if model is None:
            raise ValueError("this MetaOptimizer has no base_model; pass one to the constructor or the call")
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def _run_for(self, episode: Any, model: nn.Module | None) -> TaskRun:
        """A one-truncation inner run for a ``Task`` or a support/query episode."""
        seed = split_seed(TRAIN, self.config.seed + self._episodes_seen)
        self._episodes_seen += 1
        if isinstance(episode, Task):
            task, params = episode, episode.init_params(seed)
        elif _is_episode(episode):
            if model is None:
                raise ValueError("support/query episodes need a base_model to train")
            support = (episode.support_x, episode.support_y)
            task = ModuleTask(
                "episode", lambda: model, support, (episode.query_x, episode.query_y),
                loss=self.config.loss, batch_size=len(episode.support_x),
            )
            params = self._model_params(model)
        else:
            raise TypeError(
                f"episodes must be Task objects or episodes with support_x/support_y/query_x/query_y, "
                f"got {type(episode).__name__}"
            )
        return TaskRun.start(task, seed, seed, params, self.rule, self.config.unroll_steps)

    # -- the spec's API ------------------------------------------------------------------------
    def compute_update(
        self, gradients: Mapping[str, Tensor], state: OptimizerState | None = None, *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        """Updates to *add* to the base model's parameters, and the new state.

        ``gradients`` maps parameter names (as in ``base_model.named_parameters()``) to gradients;
        names may be a subset. NaN/Inf gradients, unknown names and shape mismatches raise
        ``ValueError``. Without ``state`` the facade's own state is used and advanced; a fresh
        ``OptimizerState()`` (or ``OptimizerState(num_steps=N)`` for a budget-aware rule) starts a
        run. ``loss`` is the training loss at the current parameters, for rules that read it.
        """
        params = self._model_params()
        check_grads(gradients, params)
        own_state = state is None
        current = self.state if own_state else state
        with torch.no_grad():
            updates, new_state = self.rule.update(dict(gradients), current, params, loss=loss)
        self._effective_lr = {
            name: float(updates[name].norm() / gradients[name].norm().clamp_min(1e-12)) for name in updates
        }
        if own_state:
            self.state = new_state
        return updates, new_state

    def meta_train_step(
        self, episodes: Iterable[Any], base_model: nn.Module | None = None
    ) -> MetaOptTrainResult:
        """One meta-gradient step of the rule over ``episodes``.

        Each episode is a :class:`~metaoptimizer.tasks.base.Task` (trained from fresh parameters)
        or a support/query episode (the base model trained on the support set from its current
        parameters, the query set serving as validation data). The rule is unrolled for
        ``config.unroll_steps`` steps on each; the mean meta-loss is differentiated, clipped to
        ``config.gradient_clipping`` and applied with Adam(``config.meta_lr``). Non-finite steps are
        skipped and counted.
        """
        if self.learner is not None:
            if base_model is not None and base_model is not self.base_model:
                raise ValueError(f"method={self.config.method!r} meta-trains the base_model it was built with")
            return self.learner.meta_train_step(list(episodes))
        if self.config.method == "hypergradient":
            raise ValueError(
                "method='hypergradient' adapts its rates online while the model trains: it has nothing to "
                "meta-train (method='meta_sgd' meta-trains per-parameter rates over episodes)"
            )
        if self.meta_optimizer is None:
            raise ValueError(
                f"method={self.config.method!r} needs a base_model to meta-train (its episode learner adapts it)"
            )
        model = base_model if base_model is not None else self.base_model
        runs = [self._run_for(episode, model) for episode in episodes]
        if not runs:
            raise ValueError("meta_train_step needs at least one episode")
        estimate = self.estimator.estimate(self.rule, runs, self.config.unroll_steps)
        result = apply_estimate(
            self.meta_optimizer, self._meta_parameters(), estimate, self.config.gradient_clipping,
            self.meta_steps, self.skipped_meta_steps,
        )
        self.meta_steps, self.skipped_meta_steps = result.steps, result.skipped_total
        return result

    def get_learned_lr(self) -> dict[str, float]:
        """Per-parameter-tensor learning rates the rule applies.

        Methods that learn rates explicitly report them (Meta-SGD: mean |alpha| per tensor). For rules without an
        explicit rate (the LSTM) this is the effective rate of the last ``compute_update``:
        ``||update|| / ||gradient||`` per tensor.
        """
        for owner in (self.learner, self.rule):
            if hasattr(owner, "learned_lr"):
                return owner.learned_lr()
        if not self._effective_lr:
            raise RuntimeError("no update has been computed yet; call compute_update first")
        return dict(self._effective_lr)

    def reset_optimizer_state(self, num_steps: int | None = None) -> None:
        """Fresh rule state (hidden/cell state, accumulators, step count) for a run of
        ``num_steps`` updates (the budget of budget-aware rules)."""
        self.state = OptimizerState(num_steps=self.rule.resolve_num_steps(num_steps))
        self._effective_lr = {}

    # -- adapters and persistence -----------------------------------------------------------------
    def torch_optimizer(self, params: Iterable[Any] | None = None, **kwargs: Any):
        """A ``torch.optim.Optimizer`` that applies this rule (see :class:`metaoptimizer.optim.LearnedOptimizer`)."""
        from metaoptimizer.optim import LearnedOptimizer

        if params is None:
            if self.base_model is None:
                raise ValueError("pass params, or construct the MetaOptimizer with a base_model")
            params = self.base_model.parameters()
        self._warn_if_untrained()
        return LearnedOptimizer(params, self.rule, **kwargs)

    def _warn_if_untrained(self) -> None:
        """Warn when a learned rule built here and never meta-trained (its weights unchanged) is
        about to train a model: it updates as its random initialisation dictates (the README's first
        users got 22% accuracy on digits where Adam gets 82%). Loaded and given rules never warn."""
        initial = self._initial_weights
        if initial and all(torch.equal(a, b) for a, b in zip(initial, self._meta_parameters(), strict=True)):
            warnings.warn(
                f"this {self.config.method!r} rule has not been meta-trained, so it may train far worse than "
                "Adam; use a meta-trained one (metaoptimizer.pretrained.load('lstm-digits-mlp')) or "
                "meta-train it first",
                UserWarning,
                stacklevel=3,
            )

    def save(self, path: str | os.PathLike) -> None:
        """Write rule weights, config, meta-optimizer state and counters to one file, atomically."""
        save_checkpoint(
            path,
            kind=CHECKPOINT_KIND,
            config=self.config.to_dict(),
            payload={
                "rule_spec": to_spec(self.rule),
                "rule": self.rule.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict() if self.meta_optimizer is not None else {},
                "meta_steps": self.meta_steps,
                "skipped_meta_steps": self.skipped_meta_steps,
                "learner": self.learner.state_dict() if self.learner is not None else {},
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike, base_model: nn.Module | None = None) -> MetaOptimizer:
        """Rebuild a saved MetaOptimizer (``torch.load(weights_only=True)`` underneath)."""
        data = load_checkpoint(path, expected_kind=CHECKPOINT_KIND)
        try:
            rule = from_spec(data["rule_spec"]) if "rule_spec" in data else None
        except (TypeError, ValueError) as error:
            raise ValueError(f"checkpoint {os.fspath(path)!r} holds a rule spec that cannot be rebuilt: {error}") from error
        meta = cls(base_model, MetaOptimizerConfig.from_dict(data["config"]), rule=rule)
        try:
            meta.rule.load_state_dict(data["rule"])
            if meta.meta_optimizer is not None:
                meta.meta_optimizer.load_state_dict(data["meta_optimizer"])
            if meta.learner is not None and data.get("learner"):
                meta.learner.load_state_dict(data["learner"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise ValueError(f"checkpoint {os.fspath(path)!r} does not match its config: {error}") from error
        meta.meta_steps = int(data["meta_steps"])
        meta.skipped_meta_steps = int(data["skipped_meta_steps"])
        return meta
