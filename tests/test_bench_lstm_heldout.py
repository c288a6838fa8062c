"""The tasks and report of benchmarks/bench_lstm_heldout.py (issue 16 item 5's held-out benchmark)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from metaoptimizer.evaluate.baselines import Baseline
from metaoptimizer.evaluate.runner import run_suite
from metaoptimizer.rules import Adam

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lstm_heldout.py"
spec = importlib.util.spec_from_file_location("bench_lstm_heldout", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_suite_is_eighteen_default_init_task_seeds_over_activations_and_batch_sizes():
    suite = bench.outside_family_suite()
    assert sum(len(e.task_indices) * len(e.seeds) for e in suite.entries) == 18
    assert {(e.kwargs["activation"], e.kwargs["batch_size"]) for e in suite.entries} == {
        (a, b) for a in ("sigmoid", "tanh", "elu") for b in (32, 64, 128)}
    assert all(e.steps == 200 and e.split == "heldout" and e.kwargs["inputs"] == "unit" for e in suite.entries)


def test_unit_inputs_are_pixels_over_16_and_standardised_ones_have_mean_0_std_1():
    unit = bench.build_family(bench.FAMILY, activation="sigmoid", batch_size=64).task(0, "heldout")
    standard = bench.build_family(bench.FAMILY, activation="sigmoid", batch_size=64, inputs="standardised").task(0, "heldout")
    x = unit.train_data[0]
    assert x.shape[1] == 64 and float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(torch.unique(x * 16), torch.arange(17.0))
    xs = standard.train_data[0]
    assert abs(float(xs.mean())) < 1e-5 and abs(float(xs.std()) - 1) < 1e-4
    assert torch.equal(unit.train_data[1], standard.train_data[1]) and len(unit.valid_data[1]) == 359
    model = unit.model_factory()
    assert isinstance(model[1], torch.nn.Sigmoid) and model[0].in_features == 64 and model[2].out_features == 10
    bound = 1 / 8  # torch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(unit.init_params(0)["0.weight"].abs().max()) <= bound
    with pytest.raises(ValueError, match="inputs"):
        bench.UserDigitsMLPFamily(activation="tanh", batch_size=32, inputs="raw")


def test_rows_give_per_task_seed_speedups_against_tuned_adam():
    suite = bench.outside_family_suite(activations=("tanh",), batch_sizes=(32,), num_tasks=1, steps=20)
    adam = Baseline("adam", lambda lr: Adam(lr=lr), (0.01, 0.1))
    result = run_suite(suite, {"slow-adam": lambda: Adam(lr=0.001)}, baselines=[adam],
                       family_factory=bench.build_family)
    (row,) = bench.rows(result, "slow-adam")
    assert row["adam_lr"] in (0.01, 0.1) and not row["reached"] and row["steps"] is None
    assert row["speedup"] == pytest.approx(row["adam_steps"] / 20) and row["final_loss_ratio"] > 1
    lines = bench.report("slow-adam", [row], result)
    assert "never" in lines[2] and "target reached on 0/1 task-seeds" in lines[-1]


def test_snapshots_are_chosen_on_training_family_tasks_only(tmp_path, capsys):
    from typer.testing import CliRunner

    from metaoptimizer.cli.main import app
    from metaoptimizer.meta.loop import TrainingConfig

    config = tmp_path / "tiny.toml"
    config.write_text("""
[rule]
name = "lstm"
hidden_size = 4
preprocessing = "tensor_rms"
relative_step = true
loss_features = true
training_fraction = true
init_lr = 0.1
backend = "eager"

[optimizer]
meta_lr = 0.01
unroll_steps = 3

[[families]]
name = "digits8_mlp"
augment = { levels = ["global"], scale_range = [1e-3, 1e3] }

[training]
steps = 2
run_steps = 8
tasks_per_step = 1
snapshot_every = 1
estimator = "pes"
tensorboard = false
""")
    run = tmp_path / "run"
    done = CliRunner().invoke(app, ["meta-train", "--config", str(config), "--out", str(run), "--no-progress"])
    assert done.exit_code == 0, done.output
    loaded = TrainingConfig.from_toml(config)
    suite = bench.validation_suite(loaded, num_tasks=1, steps=5)
    (entry,) = suite.entries
    assert entry.split == "heldout" and entry.family == "digits8_mlp" and "augment" not in entry.kwargs
    adam = [Baseline("adam", lambda lr: Adam(lr=lr), (0.01,))]
    name, path = bench.select_snapshot(run, loaded, adam, num_tasks=1, steps=5)
    assert path.is_file() and path.parent == run / "snapshots" and name in {"step_000000", "step_000001", "step_000002"}
    assert f"chosen on meta-validation: {name}" in capsys.readouterr().out


def test_step_factors_parse_positive_finite_numbers_and_name_the_problem_otherwise():
    import argparse

    assert bench.step_factors("0.5, 1.4") == (0.5, 1.4)
    for bad in ("", "0,1", "-1", "nan", "inf", "a,1"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive finite factors"):
            bench.step_factors(bad)


def test_step_scales_multiply_each_optimizers_updates():
    rules = bench.with_step_scales({"adam": Adam(lr=0.01)}, (0.5, 2.0))
    assert list(rules) == ["adam", "adam x0.5", "adam x2"]
    params = {"w": torch.tensor([1.0, -2.0])}
    grads = {"w": torch.tensor([0.3, -0.1])}
    updates = {}
    for name, rule in rules.items():
        update, _ = rule.update(grads, rule.init(params), params)
        updates[name] = update["w"]
    torch.testing.assert_close(updates["adam x0.5"], 0.5 * updates["adam"])
    torch.testing.assert_close(updates["adam x2"], 2.0 * updates["adam"])
