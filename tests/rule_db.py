"""Every update rule and composite the library ships, with the capabilities generic tests need.

Modelled on torch's ``OptimizerInfo``/``optim_db``: adding a rule to the library means adding one
``RuleInfo`` line here, and ``test_rule_contract.py`` runs the whole contract over it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from metaoptimizer import pretrained
from metaoptimizer.evaluate.baselines import ScaleByWarmupCosine
from metaoptimizer.meta.hyperparams import LearnedHyperparameters
from metaoptimizer.rules import (
    SGD,
    Adam,
    AdamW,
    HierarchicalRule,
    HypergradientRule,
    LSTMRule,
    MLPRule,
    Momentum,
    RMSProp,
    ShrinkingRatesRule,
    UpdateRule,
    add_decayed_weights,
    budget_aware_lstm,
    chain,
    clip_by_global_norm,
    named_chain,
    scale,
    scale_by_schedule,
)
from metaoptimizer.rules.celo import CeloAdamRule, CeloRule
from metaoptimizer.rules.features import FeatureConfig
from metaoptimizer.schedules import CosineDecay, LearnedSchedule, warmup_cosine

#: The parameters every generic test uses: a matrix, a vector and a 0-d scalar.
SHAPES = {"w": (4, 3), "b": (3,), "s": ()}

RICH_FEATURES = FeatureConfig(
    momentum_decays=(0.9, 0.99), rms_decays=(), factored_decays=(0.999,),
    features=("grad", "param", "momentum", "factored", "mom_ratio", "grad_ratio"), training_fraction=True,
)


@dataclass(frozen=True)
class RuleInfo:
    """A rule factory and what the generic tests may expect of the rule."""

    id: str
    make: Callable[[], UpdateRule]
    budget_aware: bool = False
    reads_loss: bool = False
    #: Whether the rule has meta-parameters that an unroll differentiates.
    meta_parameters: bool = False


RULE_DB: list[RuleInfo] = [
    RuleInfo("sgd", lambda: SGD(lr=0.1, weight_decay=0.01)),
    RuleInfo("momentum", lambda: Momentum(lr=0.1, momentum=0.9)),
    RuleInfo("nesterov", lambda: Momentum(lr=0.1, momentum=0.9, nesterov=True)),
    RuleInfo("rmsprop", lambda: RMSProp(lr=0.01, centered=True, momentum=0.5)),
    RuleInfo("adam", lambda: Adam(lr=0.01)),
    RuleInfo("adam_amsgrad", lambda: Adam(lr=0.01, amsgrad=True, weight_decay=0.1)),
    RuleInfo("adamw", lambda: AdamW(lr=0.01)),
    RuleInfo("hypergradient_rates", lambda: HypergradientRule(base_lr=0.05, alpha_lr=0.01, inner_steps=2)),
    RuleInfo("shrinking_rates", lambda: ShrinkingRatesRule(base_lr=0.05, alpha_lr=0.5, inner_steps=2)),
    RuleInfo("lstm", lambda: LSTMRule(init_lr=0.01, momentum_decay=0.9), meta_parameters=True),
    RuleInfo("lstm_fraction", lambda: LSTMRule(training_fraction=True), budget_aware=True, meta_parameters=True),
    RuleInfo("lstm_budget_chain", lambda: budget_aware_lstm(50, init_lr=0.01), budget_aware=True,
             meta_parameters=True),
    RuleInfo("lstm_relative_step", lambda: LSTMRule(preprocessing="tensor_rms", relative_step=True, init_lr=0.05),
             meta_parameters=True),
    RuleInfo("lstm_step_scale", lambda: LSTMRule(preprocessing="tensor_rms", relative_step=True, loss_features=True,
                                                 training_fraction=True, init_lr=0.05, momentum_decay=0.9),
             budget_aware=True, reads_loss=True, meta_parameters=True),
    RuleInfo("lstm_digits_mlp", lambda: pretrained.load("lstm-digits-mlp").rule, budget_aware=True,
             meta_parameters=True),
    RuleInfo("l2o", lambda: MLPRule(), meta_parameters=True),
    RuleInfo("l2o_rich", lambda: MLPRule(features=RICH_FEATURES, seed=3), budget_aware=True, meta_parameters=True),
    RuleInfo("hierarchical", lambda: HierarchicalRule(), meta_parameters=True),
    RuleInfo("learned_hyperparameters", lambda: LearnedHyperparameters("adam", lr=0.01, learn=("lr", "momentum")),
             meta_parameters=True),
    RuleInfo("chain_clip_adam", lambda: chain(clip_by_global_norm(1.0), Adam(lr=0.01))),
    RuleInfo("chain_adam_decay", lambda: chain(Adam(lr=0.01), add_decayed_weights(1e-3), scale(0.5))),
    RuleInfo("named_chain_cosine", lambda: named_chain(adam=Adam(lr=0.01), schedule=scale_by_schedule(
        warmup_cosine(2, 20)))),
    RuleInfo("celo", lambda: CeloRule.pretrained(), budget_aware=True, reads_loss=True, meta_parameters=True),
    RuleInfo("celo_adam", lambda: CeloAdamRule.pretrained(), budget_aware=True, reads_loss=True, meta_parameters=True),
    RuleInfo("learned_schedule", lambda: named_chain(sgd=SGD(lr=0.1), schedule=scale_by_schedule(
        LearnedSchedule(20, 4).initialise_as(CosineDecay(20)))), budget_aware=True, meta_parameters=True),
    RuleInfo("adamw_warmup_cosine", lambda: chain(AdamW(lr=0.01), ScaleByWarmupCosine()), budget_aware=True),
]
