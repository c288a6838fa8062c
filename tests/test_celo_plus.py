"""Beyond Celo: a [rule] that starts from shipped weights, and the celo_plus.toml config."""

from pathlib import Path

import pytest
import torch

from metaoptimizer.meta.loop import TrainingConfig, build_config_rule, build_trainer
from metaoptimizer.rules.celo import CeloRule
from metaoptimizer.tasks.augment import ReparamFamily
from metaoptimizer.tasks.broad import BroadImageFamily, CaseFoldedLMFamily

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="the shared data folder (../shared/data) is absent")


def _config(rule: dict) -> TrainingConfig:
    return TrainingConfig.from_dict({
        "rule": rule,
        "family": {"name": "quadratic", "dim": 3},
        "training": {"steps": 2, "run_steps": 10},
    })


def test_rule_starts_from_the_published_weights():
    started = build_config_rule(_config({"name": "celo", "pretrained": "celo"}))
    published = CeloRule.pretrained().state_dict()
    assert started.state_dict().keys() == published.keys()
    for name, value in published.items():
        assert torch.equal(started.state_dict()[name], value), name
    fresh = build_config_rule(_config({"name": "celo"}))
    assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in published.items())


def test_unknown_or_mismatched_pretrained_rules_are_refused():
    with pytest.raises(ValueError, match=r"pretrained='celo-pro' is not a shipped optimizer; accepted values: .*'celo'"):
        _config({"name": "celo", "pretrained": "celo-pro"})
    with pytest.raises(ValueError, match="pretrained='celo' is a CeloRule, not the CeloAdamRule"):
        build_config_rule(_config({"name": "celo_adam", "pretrained": "celo"}))


@needs_data
def test_celo_plus_config_continues_celo_on_the_broad_and_8x8_families(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = TrainingConfig.from_toml(ROOT / "configs" / "celo_plus.toml")
    assert config.rule == {"name": "celo", "pretrained": "celo"} and config.estimator == "pes"
    assert config.run_steps == 3000 and config.snapshot_every and config.optimizer.meta_lr <= 1e-4
    trainer = build_trainer(config)
    published = CeloRule.pretrained().state_dict()
    assert all(torch.equal(trainer.rule.state_dict()[k], v) for k, v in published.items())
    inner = [f.family for f in trainer.families]
    assert all(isinstance(f, ReparamFamily) for f in trainer.families)
    assert sum(isinstance(f, BroadImageFamily) for f in inner) >= 4
    assert any(isinstance(f, CaseFoldedLMFamily) for f in inner)
    assert {f.name for f in inner} >= {"digits8_mlp", "mnist8_mlp", "omniglot8_mlp", "synthetic8_mlp"}
    lm = next(i for i, f in enumerate(inner) if isinstance(f, CaseFoldedLMFamily))
    assert trainer.estimators[lm].normalization.high > trainer.estimators[0].normalization.high
