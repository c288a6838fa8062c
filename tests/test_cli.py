import json

import pytest
from typer.testing import CliRunner

from metaoptimizer import MetaOptimizer, __version__, pretrained
from metaoptimizer.demo import DEMO_CONFIG, HORIZON
from metaoptimizer.cli import app

runner = CliRunner()


def test_version_and_help_list_every_command():
    assert __version__ in runner.invoke(app, ["--version"]).output
    result = runner.invoke(app, ["--help"])
    for command in ("demo", "pretrain", "eval", "meta-train", "fewshot", "lr-example"):
        assert command in result.output


def test_demo_meta_trains_compares_and_writes_a_report(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(
        app, ["demo", "--out", str(out), "--minutes", "5", "--meta-steps", "2", "--tasks", "1", "--steps", "20"]
    )
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "Meta-training" in report and "2 meta-steps" in report
    numbers = json.loads((out / "results.json").read_text())
    assert numbers["extra"]["meta_training"]["meta_steps"] == 2
    assert (out / "meta_training.png").stat().st_size > 0
    assert MetaOptimizer.load(out / "lstm_digits_mlp.pt").meta_steps == 2


def test_pretrain_rebuilds_a_checkpoint(tmp_path):
    result = runner.invoke(app, ["pretrain", "lstm-digits-mlp", "--out", str(tmp_path), "--meta-steps", "1"])
    assert result.exit_code == 0, result.output
    assert MetaOptimizer.load(tmp_path / "lstm-digits-mlp.pt").meta_steps == 1


def test_shipped_checkpoint_loads_ready_to_use():
    assert pretrained.available() == ["lstm-digits-mlp"]
    meta = pretrained.load("lstm-digits-mlp")
    assert meta.config.method == "lstm" and meta.meta_steps == pretrained.REGISTRY["lstm-digits-mlp"][1]
    # `metaopt pretrain` trains DEMO_CONFIG: the shipped file must be that configuration
    assert meta.config.to_dict() == DEMO_CONFIG.to_dict()
    assert meta.rule.default_num_steps == HORIZON


def test_unknown_pretrained_names_list_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match="lstm-digits-mlp"):
        pretrained.load("adam-transformer")
    with pytest.raises(ValueError, match="lstm-digits-mlp"):
        pretrained.train("adam-transformer", tmp_path)
