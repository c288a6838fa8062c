"""configs/lstm_recipe.toml (issue 16 item 5): the step-scale LSTM under the Celo recipe."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from metaoptimizer.meta.loop import TrainingConfig, build_config_rule, build_trainer
from metaoptimizer.rules import LSTMRule

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lstm_recipe.toml"


def test_the_lstm_recipe_config_describes_the_recipe_and_builds_the_step_scale_lstm():
    config = TrainingConfig.from_toml(CONFIG)
    assert TrainingConfig.from_dict(config.to_dict()) == config
    assert (config.estimator, config.meta_optimizer, config.optimizer.meta_lr) == ("pes", "adamw", 3e-4)
    assert (config.optimizer.unroll_steps, config.min_run_steps, config.run_steps) == (50, 50, 1000)
    assert [f["name"] for f in config.families] == [
        "digits8_mlp", "mnist8_mlp", "omniglot8_mlp", "synthetic8_mlp", "digits_mlp"]
    assert all(f["augment"]["scale_range"] == [1e-3, 1e3] for f in config.families)
    # the held-out benchmark's activations stay out of meta-training
    assert not {"sigmoid", "tanh", "elu"} & set(config.families[-1]["activations"])
    assert config.tasks_per_step % len(config.families) == 0 and config.snapshot_every
    rule = build_config_rule(config)
    assert isinstance(rule, LSTMRule) and rule.relative_step and rule.loss_features and rule.training_fraction
    assert rule.preprocessing == "tensor_rms" and rule.reads_loss and rule.budget_aware


def test_a_shrunk_lstm_recipe_takes_finite_meta_steps_that_move_the_rule():
    """The recipe's rule, estimator and outer optimizer on its digits families, shrunk to seconds."""
    data = TrainingConfig.from_toml(CONFIG).to_dict()
    data["families"] = [f for f in data["families"] if f["name"] in ("digits8_mlp", "digits_mlp")]
    data["families"][1].update(widths=[8], depths=[1], n_examples=[300])
    data["training"].update(steps=2, run_steps=8, min_run_steps=4, initial_offset=0, tasks_per_step=2, snapshot_every=None)
    data["optimizer"].update(unroll_steps=3)
    data["rule"]["hidden_size"] = 4
    trainer = build_trainer(TrainingConfig.from_dict(data))
    before = {name: p.detach().clone() for name, p in trainer.rule.named_parameters()}
    for _ in range(2):
        result = trainer.step()
        assert math.isfinite(result.meta_loss) and math.isfinite(result.meta_grad_norm) and not result.skipped
    moved = [not torch.equal(p, before[name]) for name, p in trainer.rule.named_parameters()]
    assert all(moved)
