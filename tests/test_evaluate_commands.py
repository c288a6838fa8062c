"""The ``metaopt eval`` command with an injected rule loader, hand-rule specs and checkpoints."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from metaoptimizer import pretrained
from metaoptimizer.config import MetaOptimizerConfig
from metaoptimizer.cli.eval import make_eval_command
from metaoptimizer.evaluate.loading import load_optimizer, parse_hand_spec
from metaoptimizer.facade import MetaOptimizer
from metaoptimizer.rules.hand import Adam, Momentum
from metaoptimizer.rules.lstm import LSTMRule


def app_with(loader, **options):
    app = typer.Typer()
    app.command("eval")(make_eval_command(loader, **options))
    app.command("noop")(lambda: None)  # a second command keeps "eval" a named sub-command
    return app


def test_eval_command_runs_an_injected_rule_and_writes_the_report(tmp_path):
    torch.set_num_threads(1)
    loaded = []

    def loader(spec):
        loaded.append(spec)
        return Adam(lr=float(spec))

    args = ["eval", "--optimizer", "0.01", "--suite", "smoke", "--steps", "8", "--num-tasks", "1", "--seeds", "1",
            "--out", str(tmp_path), "--name", "my-adam", "--no-progress"]
    outcome = CliRunner().invoke(app_with(loader), args)
    assert outcome.exit_code == 0, outcome.output
    assert loaded == ["0.01"]
    assert "speedup over tuned adam" in outcome.output and "my-adam" in outcome.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["extra"] == {"optimizer": "0.01", "label": "my-adam"}
    assert data["suite"]["entries"][0]["steps"] == 8 and data["suite"]["entries"][0]["seeds"] == [0]
    assert "my-adam" in data["tasks"][0]["comparisons"]
    assert (tmp_path / "report.md").exists() and (tmp_path / "speedup.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--suite", "imagenet"], "unknown suite"), (["--suite", "heldout", "--data-dir", "/data"], "does not take"),
     (["--name", "adam"], "baseline's name"), (["--optimizer", "nonsense"], "not a pretrained name"),
     (["--suite", "general", "--name", "prodigy"], "baseline's name"),
     (["--suite", "general", "--horizons", "300,long"], "comma-separated list"),
     (["--suite", "general", "--tasks", "resnet50"], "not general tasks"),
     (["--suite", "general", "--num-tasks", "2"], "does not take"),
     (["--name", "a", "--name", "b"], "one --name per --optimizer")],
)
def test_eval_command_reports_bad_options_cleanly(args, message, tmp_path):
    base = {"--optimizer": "adam:lr=0.01", "--out": str(tmp_path)}
    argv = ["eval", *[item for pair in base.items() for item in pair], *args, "--no-progress"]
    outcome = CliRunner().invoke(app_with(load_optimizer), argv)
    assert outcome.exit_code == 2
    assert message in " ".join(outcome.output.replace("│", " ").split())


def test_eval_general_suite_compares_several_optimizers_and_reuses_cached_baselines(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.delenv("METAOPT_DATA_DIR", raising=False)
    args = ["eval", "--optimizer", "adam:lr=0.01", "--optimizer", "sgd:lr=0.1", "--suite", "general",
            "--horizons", "12,16", "--tasks", "regression", "--seeds", "1", "--baseline-cache", str(tmp_path / "cache"),
            "--no-progress"]
    first = CliRunner().invoke(app_with(load_optimizer), [*args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [t["group"] for t in data["tasks"]] == ["12 steps", "16 steps"]
    compared = set(data["tasks"][0]["comparisons"])
    assert compared == {"adam:lr=0.01", "sgd:lr=0.1", "adam-default", "adamw-warmup-cosine", "prodigy",
                        "schedule-free-adamw"}
    assert set(data["summary"]["groups"]) == {"12 steps", "16 steps"}
    assert data["beat_fractions"]["all"]["valid"]["sgd:lr=0.1"].keys() >= {"adam", "prodigy"}
    assert len(list((tmp_path / "cache").iterdir())) == 2 * 5  # 5 baselines x 2 horizons
    second = CliRunner().invoke(app_with(load_optimizer), [*args, "--out", str(tmp_path / "b")])
    assert second.exit_code == 0, second.output
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    for old, new in zip(data["tasks"], again["tasks"], strict=True):
        assert old["baselines"] == new["baselines"]  # read back from the cache, not rerun
    for plot in ("speedup_table.png", "profile.png", "curves_12_steps.png", "curves_16_steps.png"):
        assert (tmp_path / "b" / plot).exists()


def test_parse_hand_spec():
    assert parse_hand_spec("adam") == ("adam", {})
    assert parse_hand_spec("momentum:lr=0.1, momentum=0.5") == ("momentum", {"lr": 0.1, "momentum": 0.5})
    for bad in ("adam:lr", "adam:lr=fast", "adam:=1"):
        with pytest.raises(ValueError, match="key=number"):
            parse_hand_spec(bad)


def test_load_optimizer_builds_hand_rules_from_specs():
    rule = load_optimizer("momentum:lr=0.2,momentum=0.5")
    assert isinstance(rule, Momentum) and (rule.lr, rule.momentum) == (0.2, 0.5)


def test_load_optimizer_reads_a_saved_meta_optimizer(tmp_path):
    meta = MetaOptimizer(config=MetaOptimizerConfig(hidden_size=4, num_layers=1))
    path = tmp_path / "lstm.pt"
    meta.save(path)
    rule = load_optimizer(str(path))
    assert isinstance(rule, LSTMRule) and rule.hidden_size == 4
    for (name, expected), actual in zip(meta.rule.state_dict().items(), rule.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, msg=name)


def test_load_optimizer_reads_a_pretrained_name(tmp_path, monkeypatch):
    meta = MetaOptimizer(config=MetaOptimizerConfig(hidden_size=3, num_layers=1))
    meta.save(tmp_path / "shipped.pt")
    monkeypatch.setattr(pretrained, "path", lambda name: tmp_path / "shipped.pt")
    rule = load_optimizer("lstm-digits-mlp")
    assert isinstance(rule, LSTMRule) and rule.hidden_size == 3


def test_a_truncated_checkpoint_is_a_usage_error_that_says_so(tmp_path):
    meta = MetaOptimizer(config=MetaOptimizerConfig(hidden_size=4, num_layers=1))
    meta.save(tmp_path / "lstm.pt")
    data = (tmp_path / "lstm.pt").read_bytes()
    (tmp_path / "lstm.pt").write_bytes(data[: len(data) // 3])
    argv = ["eval", "--optimizer", str(tmp_path / "lstm.pt"), "--out", str(tmp_path / "eval"), "--no-progress"]
    outcome = CliRunner().invoke(app_with(load_optimizer), argv)
    assert outcome.exit_code == 2
    assert "truncated or corrupt" in outcome.output


def test_load_optimizer_rejects_unknown_specs(tmp_path):
    with pytest.raises(ValueError, match="not a pretrained name"):
        load_optimizer(str(tmp_path / "missing.pt"))


def test_the_optimizer_help_describes_the_injected_loader():
    outcome = CliRunner().invoke(app_with(load_optimizer, optimizer_help="A pretrained name."), ["eval", "--help"])
    assert outcome.exit_code == 0 and "A pretrained name." in outcome.output
