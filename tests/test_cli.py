"""The ``metaopt`` tool as a newcomer meets it: the demo, pretrain, threads, usage errors, progress
in a log file, and the library kept apart from the command-line stack."""

import ast
import csv
import importlib
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from rich.progress import Progress as RichProgress
from typer.testing import CliRunner

from metaoptimizer import MetaOptimizer, __version__, pretrained
from metaoptimizer.cli import app
from metaoptimizer.cli._common import BarProgress, LineProgress, progress_display
from metaoptimizer.cli.demo import TRAINED, UNTRAINED
from metaoptimizer.meta.loop import build_config_rule, build_trainer
from metaoptimizer.progress import Progress
from metaoptimizer.rules import to_spec

SRC = Path(__file__).resolve().parents[1] / "src"
runner = CliRunner()
TINY_DEMO = ["--meta-steps", "2", "--validate-every", "1", "--validation-tasks", "1", "--tasks", "1", "--steps", "10"]


def test_version_and_help_list_every_command():
    assert __version__ in runner.invoke(app, ["--version"]).output
    result = runner.invoke(app, ["--help"])
    for command in ("demo", "pretrain", "eval", "meta-train", "fewshot", "lr-example"):
        assert command in result.output


def test_demo_compares_the_rule_before_and_after_meta_training_beside_adam(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), *TINY_DEMO])
    assert result.exit_code == 0, result.output
    numbers = json.loads((out / "results.json").read_text())
    assert set(numbers["tasks"][0]["comparisons"]) == {UNTRAINED, TRAINED}
    assert set(numbers["extra"]["median_speedup"]) == {UNTRAINED, TRAINED}
    assert numbers["extra"]["meta_training"]["meta_steps"] == 2
    report = (out / "report.md").read_text()
    assert "2 meta-steps" in report and "untrained" in report and "| 2 |" in report  # validation table
    with (out / "meta_validation.csv").open() as handle:
        assert [int(row["meta_step"]) for row in csv.DictReader(handle)] == [0, 1, 2]
    assert (out / "meta_training.png").stat().st_size > 0
    demo_rule = MetaOptimizer.load(out / "lstm_digits_mlp.pt")
    assert demo_rule.meta_steps == 2
    assert numbers["extra"]["meta_training"]["config"] == pretrained.recipe("lstm-digits-mlp").to_dict()
    # logged to a file (not a terminal), progress comes as plain lines
    assert "meta-training: 2/2" in result.output and "meta-validation" in result.output
    # seeded, and exactly as `metaopt pretrain` meta-trains: validating draws no trainer randomness
    pretrained_rule = MetaOptimizer.load(pretrained.train("lstm-digits-mlp", tmp_path / "pre", meta_steps=2))
    weights = pretrained_rule.rule.state_dict()
    assert all(torch.equal(value, weights[key]) for key, value in demo_rule.rule.state_dict().items())


@pytest.mark.parametrize(
    ("args", "message"),
    [(["demo", "--meta-steps", "-1"], "--meta-steps"), (["demo", "--minutes", "3"], "--minutes"),
     (["demo", "--tasks", "0"], "--tasks"), (["pretrain", "adam-transformer", "--out", "x"], "lstm-digits-mlp"),
     (["pretrain", "celo", "--out", "x"], "no recipe"),
     (["--threads", "0", "demo"], "--threads")],
)
def test_mistakes_are_usage_errors_not_tracebacks(tmp_path, args, message):
    outcome = runner.invoke(app, args)
    assert outcome.exit_code == 2, outcome.output
    assert message in outcome.output and "Traceback" not in outcome.output


def test_pretrain_runs_the_recipe_with_checkpoints_and_resume(tmp_path):
    args = ["pretrain", "lstm-digits-mlp", "--out", str(tmp_path), "--meta-steps", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert MetaOptimizer.load(tmp_path / "lstm-digits-mlp.pt").meta_steps == 1
    assert "meta-training: 1/1" in result.output and "lstm-digits-mlp.toml" in result.output
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "log.csv").is_file()
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--resume" in refused.output
    resumed = runner.invoke(app, [*args[:-1], "2", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert MetaOptimizer.load(tmp_path / "lstm-digits-mlp.pt").meta_steps == 2


def test_the_recipe_runs_what_the_python_recipe_ran():
    """The shipped config, run through `meta-train`'s loop, gives the meta-parameters and meta-losses
    that the former Python recipe (a hand-built MetaTrainer, removed since) gave for its first two
    meta-steps (reference saved from it: tests/data/lstm_digits_mlp_recipe_2_steps.pt). The reference
    was saved on an AVX-512 CPU; torch picks its CPU kernels by capability, and on an AVX2 CPU the
    second meta-loss differs in the 8th digit, hence float32 round-off tolerances, not bit equality."""
    reference = torch.load(Path(__file__).parent / "data" / "lstm_digits_mlp_recipe_2_steps.pt", weights_only=True)
    trainer = build_trainer(pretrained.recipe("lstm-digits-mlp"))
    losses = torch.tensor([trainer.step().meta_loss for _ in range(2)], dtype=reference["meta_losses"].dtype)
    torch.testing.assert_close(losses, reference["meta_losses"], rtol=1e-6, atol=1e-7)
    weights = trainer.rule.state_dict()
    for key, value in reference["rule"].items():
        torch.testing.assert_close(weights[key], value, rtol=1e-6, atol=1e-7)


def test_shipped_checkpoint_loads_ready_to_use():
    assert pretrained.available() == ["celo", "celo-adam", "lstm-digits-mlp"]
    meta = pretrained.load("lstm-digits-mlp")
    recipe = pretrained.recipe("lstm-digits-mlp")
    assert meta.meta_steps == recipe.steps and meta.rule.default_num_steps == recipe.run_steps
    # `metaopt pretrain` trains the recipe: the shipped file holds that rule and meta-training settings.
    # (Its spec predates LearnedSchedule's warmup_fraction, the initial curve, which loaded weights replace.)
    shipped = to_spec(meta.rule)
    expected = to_spec(build_config_rule(recipe))
    expected["hyperparameters"]["schedule"]["hyperparameters"]["schedule"]["arguments"]["warmup_fraction"] = None
    assert shipped == expected
    for key in ("meta_lr", "unroll_steps", "gradient_clipping", "meta_objective", "seed"):
        assert getattr(meta.config, key) == getattr(recipe.optimizer, key)


def test_unknown_pretrained_names_list_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match="lstm-digits-mlp"):
        pretrained.load("adam-transformer")
    with pytest.raises(ValueError, match="lstm-digits-mlp"):
        pretrained.train("adam-transformer", tmp_path)


@pytest.mark.parametrize(("args", "env", "expected"), [(["--threads", "2"], {}, 2), ([], {"METAOPT_THREADS": "3"}, 3),
                                                       ([], {}, 1)])
def test_the_thread_count_is_chosen_by_the_tool(tmp_path, args, env, expected):
    torch.set_num_threads(4)
    try:
        outcome = runner.invoke(app, [*args, "pretrain", "nonexistent", "--out", str(tmp_path)], env=env)
        assert outcome.exit_code == 2  # the callback ran before the command refused the name
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(1)


def test_line_progress_prints_the_first_and_last_report_and_throttles_the_rest():
    stream, now = io.StringIO(), [0.0]
    show = LineProgress(stream, interval=10.0, clock=lambda: now[0])
    for done in range(1, 6):
        now[0] += 4.0
        show(Progress("job", done, 5, "loss 1"))
    lines = stream.getvalue().splitlines()
    assert [line.split("] ")[1] for line in lines] == ["job: 1/5  loss 1", "job: 4/5  loss 1", "job: 5/5  loss 1"]


def test_bar_progress_starts_a_bar_per_job():
    bars = RichProgress(console=Console(file=io.StringIO(), force_terminal=True))
    show = BarProgress(bars)
    for label, total in (("meta-training", 3), ("suite", 2)):
        for done in range(1, total + 1):
            show(Progress(label, done, total))
    assert [(t.description, t.completed, t.total) for t in bars.tasks] == [("meta-training", 3, 3), ("suite", 2, 2)]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_display_picks_bars_lines_or_nothing():
    with progress_display(False) as nothing:
        assert nothing is None
    with progress_display(True, io.StringIO()) as lines:
        assert isinstance(lines, LineProgress)
    with progress_display(True, _Terminal()) as bar:
        assert isinstance(bar, BarProgress)
        bar(Progress("job", 1, 1))


def test_no_module_outside_cli_imports_typer_or_rich():
    offenders = []
    for path in (SRC / "metaoptimizer").rglob("*.py"):
        if "cli" in path.relative_to(SRC / "metaoptimizer").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("typer", "rich")]
    assert offenders == []


def test_a_fresh_interpreter_finds_pretrained_and_no_cli_stack():
    code = ("import sys, metaoptimizer, metaoptimizer.meta, metaoptimizer.evaluate, metaoptimizer.tasks; "
            "print(metaoptimizer.pretrained.available(), sorted(m for m in ('typer', 'rich') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "['celo', 'celo-adam', 'lstm-digits-mlp'] []"


def test_python_dash_m_runs_the_tool(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["metaopt", "--version"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("metaoptimizer.cli", run_name="__main__")
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"metaoptimizer {__version__}"


@pytest.mark.parametrize("package", ["metaoptimizer", "metaoptimizer.rules", "metaoptimizer.tasks", "metaoptimizer.meta",
                                     "metaoptimizer.evaluate", "metaoptimizer.pretrained", "metaoptimizer.cli"])
def test_every_package_declares_its_public_names(package):
    module = importlib.import_module(package)
    assert module.__all__ and all(hasattr(module, name) for name in module.__all__)


def test_pretrain_takes_another_seed_and_refuses_a_broken_checkpoint(tmp_path):
    meta = MetaOptimizer.load(pretrained.train("lstm-digits-mlp", tmp_path / "seed1", meta_steps=1, seed=1))
    assert meta.config.seed == 1 and meta.meta_steps == 1
    with pytest.raises(ValueError, match="published weights"):
        pretrained.recipe_path("celo")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    outcome = runner.invoke(app, ["pretrain", "lstm-digits-mlp", "--out", str(broken), "--resume", "--meta-steps", "1"])
    assert outcome.exit_code == 2 and "cannot resume" in outcome.output and "Traceback" not in outcome.output
