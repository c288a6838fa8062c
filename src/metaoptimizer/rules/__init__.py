"""Update rules: learned (LSTM, L2O, Meta-SGD) and hand-designed, all with the same contract."""

from __future__ import annotations

from metaoptimizer.config import MetaOptimizerConfig
from metaoptimizer.rules.base import Params, UpdateRule, apply_updates, next_step
from metaoptimizer.rules.hand import HAND_RULES, SGD, Adam, AdamW, Momentum, RMSProp, make_hand_rule
from metaoptimizer.rules.lstm import LSTMRule


def build_rule(config: MetaOptimizerConfig) -> UpdateRule:
    """The update rule that ``config.method`` names, built from the config's fields.

    ``config.rule_options`` adds method-specific constructor arguments.
    """
    options = dict(config.rule_options)
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
    raise NotImplementedError(
        f"method={config.method!r} has no coordinate update rule yet; implemented: 'lstm'"
    )


__all__ = [
    "HAND_RULES",
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
