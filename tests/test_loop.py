import csv
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from metaoptimizer.checkpoint import CheckpointError, load_checkpoint
from metaoptimizer.meta import loop
from metaoptimizer.meta.estimators import PES
from metaoptimizer.meta.loop import (
    TrainingConfig,
    build_trainer,
    rng_states,
    run_meta_training,
    set_rng_states,
)
from metaoptimizer.meta._vectorized import flatten_meta

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
steps = 6
run_steps = 4
min_run_steps = 2
tasks_per_step = 2
checkpoint_every = 2
estimator = "pes"

[estimator]
sigma = 0.05
num_pairs = 2
loss_range = [0.0, 50.0]
"""
TIMING = ("inner_steps_per_s", "seconds")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    return path


def _trainer(config_path):
    return build_trainer(TrainingConfig.from_toml(config_path))


def _log(out_dir):
    with open(out_dir / "log.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def _same(a, b):
    """Deep equality of nested checkpoint values, tensors compared bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_resumed_run_equals_uninterrupted_run(tmp_path, config_path):
    full = _trainer(config_path)
    run_meta_training(full, tmp_path / "full", 6, 2)
    part = _trainer(config_path)
    run_meta_training(part, tmp_path / "part", 3, 2)  # checkpoints at 2 and 3 (the last step)
    torch.manual_seed(99)  # the resumed process starts from other global RNG states
    np.random.seed(99)
    resumed = _trainer(config_path)
    results = run_meta_training(resumed, tmp_path / "part", 6, 2, resume=True)
    assert len(results) == 3
    assert torch.equal(flatten_meta(full.rule), flatten_meta(resumed.rule))
    assert _log(tmp_path / "full") == _log(tmp_path / "part")
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == 6
    assert _same(a["trainer"], b["trainer"])  # meta-optimizer, runs, PES particles, generators
    assert _same(a["rng"], b["rng"])


def _train_and_hang_in_checkpoint(config_path, out, kill_at):
    """The child process: train 6 steps, checkpointing each; checkpoint ``kill_at`` hangs half-written."""
    real_save, calls = torch.save, [0]

    def slow_save(obj, f, *args, **kwargs):
        calls[0] += 1
        real_save(obj, f, *args, **kwargs)
        if calls[0] == kill_at:
            f.flush()
            f.truncate(f.tell() // 2)
            (out / "writing").touch()
            time.sleep(600)

    torch.save = slow_save
    run_meta_training(_trainer(config_path), out, 6, 1)


def test_sigkill_during_a_checkpoint_write_loses_nothing(tmp_path, config_path):
    out = tmp_path / "killed"
    out.mkdir()
    # Forked, the child shares the parent's imports and starts at once.
    child = multiprocessing.get_context("fork").Process(target=_train_and_hang_in_checkpoint, args=(config_path, out, 4))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not (out / "writing").exists():
            assert child.is_alive(), "the training process ended before its 4th checkpoint"
            assert time.monotonic() < deadline, "the training process never reached its 4th checkpoint"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.join()
    assert child.exitcode == -signal.SIGKILL
    leftovers = list(out.glob(".checkpoint.pt.*.tmp"))
    assert leftovers, "the kill should have caught a half-written temporary file"
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 3  # the previous checkpoint is intact
    assert len(_log(out)) == 4  # step 4 was logged before its checkpoint

    resumed = _trainer(config_path)
    run_meta_training(resumed, out, 6, 1, resume=True)
    assert not list(out.glob(".checkpoint.pt.*.tmp"))
    full = _trainer(config_path)
    run_meta_training(full, tmp_path / "full", 6, 1)
    assert torch.equal(flatten_meta(full.rule), flatten_meta(resumed.rule))
    assert _log(tmp_path / "full") == _log(out)


def test_existing_checkpoint_is_never_overwritten_without_resume(tmp_path, config_path):
    run_meta_training(_trainer(config_path), tmp_path, 2, 2)
    with pytest.raises(ValueError, match="resume=True"):
        run_meta_training(_trainer(config_path), tmp_path, 4, 2)
    with pytest.raises(ValueError, match="past num_steps"):
        run_meta_training(_trainer(config_path), tmp_path, 1, 2, resume=True)
    assert run_meta_training(_trainer(config_path), tmp_path, 2, 2, resume=True) == []  # already done


def test_resume_without_checkpoint_starts_afresh_and_options(tmp_path, config_path):
    seen = []
    results = run_meta_training(
        _trainer(config_path), tmp_path / "new", 3, 5, resume=True, log_csv=False, tensorboard=False,
        config={"note": "x"}, callback=lambda i, r: seen.append(i),
    )
    assert seen == [1, 2, 3] and len(results) == 3
    assert not (tmp_path / "new" / "log.csv").exists()
    checkpoint = load_checkpoint(tmp_path / "new" / "checkpoint.pt", expected_kind=loop.CHECKPOINT_KIND)
    assert checkpoint["iteration"] == 3 and checkpoint["config"] == {"note": "x"}


def test_tensorboard_modes(tmp_path, config_path, monkeypatch):
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="tensorboard"):
            run_meta_training(_trainer(config_path), tmp_path, 1, 1, tensorboard=bad)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when the package is missing
    with pytest.raises(ValueError, match="pip install tensorboard"):
        run_meta_training(_trainer(config_path), tmp_path / "a", 1, 1, tensorboard=True)
    run_meta_training(_trainer(config_path), tmp_path / "b", 1, 1, tensorboard="auto")
    assert not (tmp_path / "b" / "tensorboard").exists()


def test_tensorboard_writer_gets_scalars_when_available(tmp_path, config_path, monkeypatch):
    written = []

    class Writer:
        def __init__(self, log_dir, purge_step):
            written.append(("open", purge_step))

        def add_scalar(self, name, value, step):
            written.append((name, step))

        def close(self):
            written.append(("close", None))

    module = type(sys)("torch.utils.tensorboard")
    module.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    run_meta_training(_trainer(config_path), tmp_path, 2, 2, tensorboard="auto")
    assert written[0] == ("open", 0) and written[-1] == ("close", None)
    assert ("meta_loss", 2) in written and ("inner_steps_per_s", 1) in written


def test_rng_states_round_trip():
    states = rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    set_rng_states(states)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_example_config_builds_a_pes_trainer(tmp_path):
    config = TrainingConfig.from_toml(ROOT / "configs" / "lstm_digits_mlp_pes.toml")
    assert config.family == "digits_mlp" and config.estimator == "pes"
    assert TrainingConfig.from_dict(config.to_dict()) == config
    data = config.to_dict()
    data["family"] = {"name": "quadratic", "dim": 3}  # the same run on a cheaper family
    data["training"]["device"] = "cpu"
    trainer = build_trainer(TrainingConfig.from_dict(data))
    assert trainer.runs[0].params["theta"].device == torch.device("cpu")
    assert isinstance(trainer.estimator, PES) and trainer.estimator.normalization.high == 5.0
    assert len(trainer.runs) == 4 and all(50 <= run.num_steps <= 200 for run in trainer.runs)
    data["training"]["meta_lr_scales"] = {"head": 0.1}
    scaled = build_trainer(TrainingConfig.from_dict(data))
    assert sorted(g["lr"] for g in scaled.meta_optimizer.param_groups) == pytest.approx([1e-4, 1e-3])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[family]\nname='quadratic'\n[extra]\n", "unknown sections"),
        ("[optimizer]\n", "needs a name"),
        ("[family]\nname='quadratic'\n[training]\nepochs=3\n", "unknown \\[training\\] keys"),
        ("[family]\nname='quadratic'\n[training]\nestimator='reinforce'\n", "accepted values"),
        ("[family]\nname='quadratic'\n[training]\nsteps=0\n", "steps"),
        ("[family]\nname='quadratic'\n[training]\nmin_run_steps=-1\n", "min_run_steps"),
        ("[family]\nname='quadratic'\n[training]\nhorizon=20\n", "horizon is now run_steps"),
        ("[family]\nname='quadratic'\n[training]\nmin_horizon=2\n", "min_horizon is now min_run_steps"),
        ("[family]\nname='quadratic'\n[training]\nlog_csv='yes'\n", "log_csv"),
        ("[family]\nname='quadratic'\n[training]\nmeta_lr_scales={head=-1}\n", "meta_lr_scales"),
        ("[family]\nname='quadratic'\n[training]\nmeta_lr_scales=0.1\n", "meta_lr_scales"),
        ("[family]\nname='quadratic'\n[training]\ntensorboard='maybe'\n", "tensorboard"),
        ("[family]\nname='quadratic'\n[optimizer]\nmethod='sgd'\n", "method"),
        ("[family\n", "not valid TOML"),
        ("[family]\nname='quadratic'\n[training]\ndevice='gpu0'\n", "not a torch device"),
    ],
)
def test_bad_configs_are_rejected(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        TrainingConfig.from_toml(path)


def test_missing_config_and_wrong_optimizer_type(tmp_path):
    with pytest.raises(ValueError, match="no config file"):
        TrainingConfig.from_toml(tmp_path / "absent.toml")
    with pytest.raises(TypeError, match="MetaOptimizerConfig"):
        TrainingConfig(optimizer={"method": "lstm"}, family="quadratic")


def test_corrupt_checkpoint_is_reported(tmp_path, config_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        run_meta_training(_trainer(config_path), tmp_path, 2, 1, resume=True)


def test_a_rule_table_nests_the_members_of_a_composite():
    from metaoptimizer.rules import budget_aware_lstm, from_spec, to_spec

    table = {
        "name": "named_chain",
        "lstm": {"name": "lstm", "training_fraction": True, "hidden_size": 4, "init_lr": 0.01},
        "schedule": {"name": "scale_by_schedule", "schedule": {
            "schedule": "LearnedSchedule", "arguments": {"total_steps": 30, "num_knots": 20, "warmup_fraction": 0.05}}},
    }
    torch.manual_seed(0)
    built = from_spec(loop.rule_table_spec(table))
    torch.manual_seed(0)
    expected = budget_aware_lstm(30, hidden_size=4, init_lr=0.01)
    assert to_spec(built) == to_spec(expected)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), expected.state_dict().values(), strict=True))
    chain = loop.rule_table_spec({"name": "chain", "rules": [{"name": "sgd", "lr": 0.1}, {"name": "scale", "factor": 2.0}]})
    assert [member["rule"] for member in chain["hyperparameters"]["rules"]] == ["sgd", "scale"]
    with pytest.raises(ValueError, match="registered rules"):
        TrainingConfig.from_dict({"rule": {"name": "lstmm"}, "family": {"name": "quadratic"}})
