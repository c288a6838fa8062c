"""Update rules: learned (LSTM, L2O, Meta-SGD) and hand-designed, all with the same contract."""

from __future__ import annotations

from metaoptimizer.config import METHODS, MetaOptimizerConfig
from metaoptimizer.rules.base import Params, UpdateRule, apply_updates, next_step
from metaoptimizer.rules.hand import HAND_RULES, SGD, Adam, AdamW, Momentum, RMSProp, make_hand_rule
from metaoptimizer.rules.hierarchical import HierarchicalRule
from metaoptimizer.rules.lstm import LSTMRule
from metaoptimizer.rules.meta_sgd import MetaSGDRule
from metaoptimizer.rules.mlp import MLPRule

L2O_ARCHITECTURES = {"mlp": MLPRule, "hierarchical": HierarchicalRule}


def build_rule(config: MetaOptimizerConfig) -> UpdateRule:
    """The update rule that ``config.method`` names, built from the config's fields.

    ``config.rule_options`` adds method-specific constructor arguments: for ``'l2o'`` the rule's
    own arguments plus ``architecture='mlp'|'hierarchical'``; for ``'meta_sgd'`` the online rule's
    ``base_lr``/``alpha_lr`` (other keys configure the episode learner, see the facade).
    ``'warp_grad'`` preconditions through the model's warp layers, so its rule is plain SGD at
    ``rule_options['inner_lr']`` (default 0.1).
    """
    options = dict(config.rule_options)
    if config.method == "l2o":
        architecture = options.pop("architecture", "mlp")
        if architecture not in L2O_ARCHITECTURES:
            raise ValueError(f"architecture={architecture!r} is not supported; accepted values: {sorted(L2O_ARCHITECTURES)}")
        return L2O_ARCHITECTURES[architecture](**options)
    if config.method == "meta_sgd":
        return MetaSGDRule(**{k: options[k] for k in ("base_lr", "alpha_lr") if k in options})
    if config.method == "warp_grad":
        return SGD(lr=options.get("inner_lr", 0.1))
    if config.method == "lstm":
        return LSTMRule(
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            preprocessing=config.preprocessing,
            preprocess_p=config.preprocess_p,
            output_scale=config.output_scale,
            preconditioning=config.preconditioning,
            **options,
        )
    raise ValueError(f"method={config.method!r} is not supported; accepted values: {METHODS}")


__all__ = [
    "HAND_RULES",
    "L2O_ARCHITECTURES",
    "HierarchicalRule",
    "MLPRule",
    "MetaSGDRule",
    "SGD",
    "Adam",
    "AdamW",
    "LSTMRule",
    "Momentum",
    "Params",
    "RMSProp",
    "UpdateRule",
    "apply_updates",
    "build_rule",
    "make_hand_rule",
    "next_step",
]
