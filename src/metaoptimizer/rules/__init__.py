"""Update rules: learned (LSTM, L2O), online per-coordinate rates and hand-designed, all with one contract,
composable with :func:`chain` / :func:`named_chain` and the transforms."""

from __future__ import annotations

from metaoptimizer.rules.base import RULES, Params, UpdateRule, apply_updates, from_spec, to_spec
from metaoptimizer.rules.celo import CeloAdamRule, CeloRule
from metaoptimizer.rules.combine import Chain, NamedChain, chain, named_chain
from metaoptimizer.rules.hand import HAND_RULES, SGD, Adam, AdamW, Momentum, RMSProp, make_hand_rule
from metaoptimizer.rules.hierarchical import HierarchicalRule
from metaoptimizer.rules.lstm import LSTMRule, budget_aware_lstm
from metaoptimizer.rules.mlp import MLPRule
from metaoptimizer.rules.rates import HypergradientRule, ShrinkingRatesRule
from metaoptimizer.rules.state import OptimizerState
from metaoptimizer.rules.transforms import add_decayed_weights, clip_by_global_norm, scale, scale_by_schedule

__all__ = [
    "HAND_RULES",
    "RULES",
    "SGD",
    "Adam",
    "AdamW",
    "CeloAdamRule",
    "CeloRule",
    "Chain",
    "HierarchicalRule",
    "HypergradientRule",
    "LSTMRule",
    "MLPRule",
    "Momentum",
    "NamedChain",
    "OptimizerState",
    "Params",
    "RMSProp",
    "ShrinkingRatesRule",
    "UpdateRule",
    "add_decayed_weights",
    "apply_updates",
    "budget_aware_lstm",
    "chain",
    "clip_by_global_norm",
    "from_spec",
    "make_hand_rule",
    "named_chain",
    "scale",
    "scale_by_schedule",
    "to_spec",
]
