"""``MetaOptimizerConfig``: the spec's thin front, validated, and the rule it builds.

(``OptimizerState`` lives in :mod:`metaoptimizer.rules.state`; it is re-exported here for the
spec's imports.)
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from metaoptimizer._validation import check_choice as _check_choice
from metaoptimizer._validation import check_positive
from metaoptimizer.rules import SGD, HierarchicalRule, HypergradientRule, LSTMRule, MLPRule, UpdateRule
from metaoptimizer.rules.lstm import PREPROCESSING, budget_aware_lstm
from metaoptimizer.rules.state import OptimizerState

METHODS = ("lstm", "meta_sgd", "warp_grad", "l2o", "hypergradient")
META_OBJECTIVES = ("train_loss", "valid_loss", "log_train_loss", "log_valid_loss")
L2O_ARCHITECTURES = {"mlp": MLPRule, "hierarchical": HierarchicalRule}
#: ``rule_options`` of method 'meta_sgd': the online rule's rate options, then the episode learner's.
META_SGD_OPTIONS = (("base_lr", "alpha_lr", "clamp"), ("inner_steps", "inner_lr", "lr_mode"))

__all__ = ["METHODS", "META_OBJECTIVES", "MetaOptTrainResult", "MetaOptimizerConfig", "OptimizerState",
           "build_rule", "check_positive"]


@dataclass
class MetaOptimizerConfig:
    """Everything that defines a learned optimizer and how it is meta-trained.

    The first eight fields are the project's spec; the rest refine them and all have defaults.
    ``rule_options`` passes method-specific keyword arguments to the rule's constructor.
    """

    method: str = "lstm"
    hidden_size: int = 20
    num_layers: int = 2
    preconditioning: bool = True
    coordinatewise: bool = True
    meta_lr: float = 1e-3
    unroll_steps: int = 20
    gradient_clipping: float | None = 1.0
    preprocessing: str = "log_sign"
    preprocess_p: float = 10.0
    output_scale: float = 0.1
    meta_objective: str = "train_loss"
    second_order: bool = False
    loss: str = "cross_entropy"
    seed: int = 0
    rule_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("preprocessing", self.preprocessing, PREPROCESSING)
        _check_choice("meta_objective", self.meta_objective, META_OBJECTIVES)
        _check_choice("loss", self.loss, ("cross_entropy", "mse"))
        check_positive("hidden_size", self.hidden_size, integer=True)
        check_positive("num_layers", self.num_layers, integer=True)
        check_positive("unroll_steps", self.unroll_steps, integer=True)
        check_positive("meta_lr", self.meta_lr)
        check_positive("preprocess_p", self.preprocess_p)
        check_positive("output_scale", self.output_scale)
        if self.gradient_clipping is not None:
            check_positive("gradient_clipping", self.gradient_clipping)
        for flag in ("preconditioning", "coordinatewise", "second_order"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if not self.coordinatewise and self.method == "lstm":
            raise ValueError(
                "method='lstm' is coordinatewise by construction; coordinatewise=False is accepted "
                "only by methods that are not ('meta_sgd', 'warp_grad', 'l2o')"
            )
        if not isinstance(self.rule_options, dict):
            raise ValueError(f"rule_options must be a dict, got {type(self.rule_options).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaOptimizerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; accepted fields: {sorted(known)}")
        return cls(**data)


@dataclass
class MetaOptTrainResult:
    """What one meta-training step did.

    ``meta_loss`` is the mean meta-objective over the step's episodes, ``meta_grad_norm`` the
    meta-gradient's global norm before clipping, ``skipped`` whether the step was discarded for a
    non-finite loss or gradient, ``steps`` the number of meta-steps applied so far,
    ``skipped_total`` the number skipped so far, ``inner_steps`` the inner steps run in this step.
    """

    meta_loss: float
    meta_grad_norm: float
    skipped: bool
    steps: int
    skipped_total: int = 0
    inner_steps: int = 0


def build_rule(config: MetaOptimizerConfig) -> UpdateRule:
    """The update rule that ``config.method`` names, built from the config's fields.

    ``config.rule_options`` adds method-specific constructor arguments: for ``'l2o'`` the rule's
    own arguments plus ``architecture='mlp'|'hierarchical'``; for ``'hypergradient'`` the arguments
    of :class:`~metaoptimizer.rules.rates.HypergradientRule` (``inner_steps`` included). Method
    ``'meta_sgd'`` builds two objects: the episodic Meta-SGD learner that ``meta_train_step`` runs
    (``inner_steps``, ``inner_lr``, ``lr_mode``, see the facade) and, for ``compute_update`` and
    ``torch_optimizer``, the same online ``HypergradientRule`` as ``'hypergradient'`` (its
    ``base_lr``, ``alpha_lr``, ``clamp``; its window is set only through ``'hypergradient'``); for
    ``'lstm'`` the LSTM's arguments, where ``num_steps=N`` (with ``schedule_knots`` and
    ``warmup_fraction``) builds the budget-aware LSTM with a learned schedule over N steps
    (:func:`~metaoptimizer.rules.lstm.budget_aware_lstm`). ``'warp_grad'`` preconditions through
    the model's warp layers, so its rule is plain SGD at ``rule_options['inner_lr']`` (default 0.1).
    """
    options = dict(config.rule_options)
    if config.method == "l2o":
        architecture = options.pop("architecture", "mlp")
        _check_choice("architecture", architecture, tuple(L2O_ARCHITECTURES))
        return L2O_ARCHITECTURES[architecture](**options)
    if config.method == "hypergradient":
        return HypergradientRule(**options)
    if config.method == "meta_sgd":
        rate_keys, learner_keys = META_SGD_OPTIONS
        unknown = sorted(set(options) - set(rate_keys) - set(learner_keys))
        if unknown:
            raise ValueError(f"unknown rule_options {unknown} for method='meta_sgd'; accepted: {rate_keys + learner_keys}")
        return HypergradientRule(**{k: options[k] for k in rate_keys if k in options})
    if config.method == "warp_grad":
        return SGD(lr=options.get("inner_lr", 0.1))
    if "horizon" in options:
        warnings.warn("rule_options['horizon'] is now called 'num_steps'", DeprecationWarning, stacklevel=2)
        options["num_steps"] = options.pop("horizon")
    lstm_options = dict(
        hidden_size=config.hidden_size, num_layers=config.num_layers, preprocessing=config.preprocessing,
        preprocess_p=config.preprocess_p, output_scale=config.output_scale, preconditioning=config.preconditioning,
    )
    if "num_steps" in options:
        return budget_aware_lstm(options.pop("num_steps"), **lstm_options, **options)
    return LSTMRule(**lstm_options, **options)
