"""``metaopt meta-train``: a run from a TOML file, --resume, and mistakes reported as usage errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from metaoptimizer.checkpoint import load_checkpoint
from metaoptimizer.cli import app
from metaoptimizer.cli.meta_train import save_snapshot
from metaoptimizer.facade import MetaOptimizer
from metaoptimizer.meta.loop import TrainingConfig, build_trainer

CONFIG = """
[optimizer]
hidden_size = 4
num_layers = 1
meta_lr = 0.01
unroll_steps = 2
seed = 3

[family]
name = "quadratic"
dim = 3

[training]
steps = 4
run_steps = 4
checkpoint_every = 2
"""
runner = CliRunner()


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    return path


def test_meta_train_runs_and_resumes(tmp_path, config_path):
    out = tmp_path / "run"
    first = runner.invoke(app, ["meta-train", "--config", str(config_path), "--out", str(out), "--steps", "2"])
    assert first.exit_code == 0, first.output
    assert "2 meta-steps run" in first.output and "meta-train: 2/2" in first.output  # plain progress lines
    # the old spelling --out-dir still works
    again = runner.invoke(app, ["meta-train", "-c", str(config_path), "--out-dir", str(out), "--steps", "3",
                                "--checkpoint-every", "1", "--resume", "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "meta-train:" not in again.output
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 3


def test_snapshots_are_loadable_rules_of_their_step(tmp_path, config_path):
    config_path.write_text(CONFIG.replace("checkpoint_every = 2", "checkpoint_every = 2\nsnapshot_every = 2"))
    out = tmp_path / "run"
    outcome = runner.invoke(app, ["meta-train", "-c", str(config_path), "-o", str(out), "--no-progress"])
    assert outcome.exit_code == 0, outcome.output
    assert sorted(path.name for path in (out / "snapshots").iterdir()) == ["step_000000.pt", "step_000002.pt", "step_000004.pt"]
    final = build_trainer(TrainingConfig.from_toml(config_path))
    final.load_state_dict(load_checkpoint(out / "checkpoint.pt")["trainer"])
    saved = MetaOptimizer.load(out / "snapshots" / "step_000004.pt").rule.state_dict()
    assert saved.keys() == final.rule.state_dict().keys()
    assert all(saved[name].equal(weight) for name, weight in final.rule.state_dict().items())
    early = MetaOptimizer.load(out / "snapshots" / "step_000002.pt").rule.state_dict()
    assert any(not early[name].equal(weight) for name, weight in saved.items())
    initial = build_trainer(TrainingConfig.from_toml(config_path)).rule.state_dict()
    start = MetaOptimizer.load(out / "snapshots" / "step_000000.pt").rule.state_dict()
    assert all(start[name].equal(weight) for name, weight in initial.items())


def test_a_snapshot_of_a_partly_frozen_rule_loads(tmp_path, config_path):
    rule = build_trainer(TrainingConfig.from_toml(config_path)).rule
    frozen = next(rule.parameters()).requires_grad_(False)
    save_snapshot(rule, tmp_path / "snapshot.pt")
    loaded = MetaOptimizer.load(tmp_path / "snapshot.pt").rule
    assert not frozen.requires_grad  # the trainer's rule is left as it was
    assert all(a.equal(b) for a, b in zip(loaded.parameters(), rule.parameters(), strict=True))


def test_an_existing_checkpoint_without_resume_is_a_usage_error(tmp_path, config_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["meta-train", "-c", str(config_path), "-o", str(out), "--steps", "1"]).exit_code == 0
    refused = runner.invoke(app, ["meta-train", "-c", str(config_path), "-o", str(out)])
    assert refused.exit_code == 2 and "already holds a checkpoint" in refused.output


@pytest.mark.parametrize(
    ("make_config", "message"),
    [(lambda tmp: tmp / "absent.toml", "does not exist"),
     (lambda tmp: _write(tmp / "bad.toml", "[family\n"), "not valid TOML"),
     (lambda tmp: _write(tmp / "bad.toml", "[family]\nname='imagenet'\n"), "not known"),
     (lambda tmp: _write(tmp / "bad.toml", CONFIG + "snapshot_every = 0\n"), "snapshot_every")],
)
def test_config_mistakes_are_usage_errors(tmp_path, make_config, message):
    outcome = runner.invoke(app, ["meta-train", "--config", str(make_config(tmp_path)), "--out", str(tmp_path / "o")])
    assert outcome.exit_code == 2, outcome.output
    assert message in outcome.output and "Traceback" not in outcome.output


def test_a_corrupt_checkpoint_on_resume_is_a_usage_error(tmp_path, config_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    outcome = runner.invoke(app, ["meta-train", "-c", str(config_path), "-o", str(out), "--resume"])
    assert outcome.exit_code == 2 and "truncated or corrupt" in outcome.output


def test_set_overrides_a_setting_and_resume_needs_the_same_settings(tmp_path, config_path):
    out = tmp_path / "run"
    started = runner.invoke(app, ["meta-train", "-c", str(config_path), "-o", str(out), "--steps", "1",
                                  "--set", "optimizer.meta_lr=0.05", "--set", 'training.estimator="tbptt"'])
    assert started.exit_code == 0, started.output
    stored = load_checkpoint(out / "checkpoint.pt")["config"]
    assert stored["optimizer"]["meta_lr"] == 0.05 and stored["training"]["estimator"] == "tbptt"
    direct = build_trainer(TrainingConfig.from_toml(config_path, ["optimizer.meta_lr=0.05"]))
    assert direct.meta_optimizer.param_groups[0]["lr"] == 0.05
    # forgetting the override on resume would change the run: refused, the difference named
    forgot = runner.invoke(app, ["meta-train", "-c", str(config_path), "-o", str(out), "--resume", "--steps", "2"])
    assert forgot.exit_code == 2 and "written under another config" in forgot.output
    assert "optimizer.meta_lr: 0.05 in the checkpoint, 0.01 now" in " ".join(forgot.output.split())
    # run length and checkpoint spacing may change on resume
    resumed = runner.invoke(app, ["meta-train", "-c", str(config_path), "-o", str(out), "--resume", "--steps", "2",
                                  "--set", "optimizer.meta_lr=5e-2", "--set", "training.checkpoint_every=1"])
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [("optimizer.meta_lr", "is not SECTION.KEY=VALUE"),
     ("meta_lr=0.1", "is not SECTION.KEY=VALUE"),
     ("optimizer.a.b=1", "is not SECTION.KEY=VALUE"),
     ("families.name=1", "cannot be set; accepted sections"),
     ("training.estimator=pes", "is not a TOML value (quote strings"),
     ("optimizer.meta_lr=-1", "meta_lr"),
     ("training.unknown_key=1", "unknown_key")],
)
def test_bad_overrides_are_usage_errors(tmp_path, config_path, override, message):
    outcome = runner.invoke(app, ["meta-train", "-c", str(config_path), "-o", str(tmp_path / "o"), "--set", override])
    assert outcome.exit_code == 2, outcome.output
    assert message in " ".join(outcome.output.split()) and "Traceback" not in outcome.output


def test_help_keeps_the_toml_section_names():
    outcome = runner.invoke(app, ["meta-train", "--help"])
    assert outcome.exit_code == 0 and "[training]" in outcome.output


def _write(path, text):
    path.write_text(text)
    return path
