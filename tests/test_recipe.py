"""The Celo recipe's engine pieces: families with one estimator each, phases, the outer optimizer,
initial offsets, and a recipe-shaped config that survives being killed."""

import csv
import math
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
import torch

from metaoptimizer.checkpoint import load_checkpoint
from metaoptimizer.meta.estimators import PES, TaskNormalization
from metaoptimizer.meta.loop import TrainingConfig, build_trainer, run_meta_training
from metaoptimizer.meta.trainer import MetaTrainer, Phase
from metaoptimizer.meta._vectorized import flatten_meta
from metaoptimizer.rules import LSTMRule, MLPRule
from metaoptimizer.tasks import make_family
from metaoptimizer.tasks.augment import ReparamTask
from metaoptimizer.tasks.quadratic import QuadraticFamily

RECIPE = """
[optimizer]
meta_lr = 0.003
unroll_steps = 3
gradient_clipping = 1.0
seed = 1

[rule]
name = "l2o"
hidden_size = 2
num_layers = 1

[meta_optimizer]
name = "adamw"
weight_decay = 0.01

[[families]]
name = "synthetic8_mlp"
hidden = 4
batch_size = 16
n_examples = 100
augment = { levels = ["none", "global", "tensor", "parameter"], scale_range = [1e-3, 1e3] }

[[families]]
name = "quadratic"
dim = 3
augment = { levels = ["global"] }
estimator = { loss_range = [0.0, 50.0] }

[[phases]]
steps = 3
freeze = ["mlp.skip"]

[[phases]]
steps = 3
train = ["mlp.skip"]
init = { "mlp.biases.0" = 0.5, "mlp.skip" = 0.25 }  # a frozen and a trained one (never re-set on resume)

[training]
steps = 6
run_steps = 12
min_run_steps = 4
initial_offset = 12
tasks_per_step = 4
checkpoint_every = 1
estimator = "pes"

[estimator]
sigma = 0.01
num_pairs = 1
loss_range = [0.0, 3.5]
"""
TIMING = ("inner_steps_per_s", "seconds")


@pytest.fixture
def recipe_path(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE)
    return path


def _trainer(path):
    return build_trainer(TrainingConfig.from_toml(path))


def _params(rule):
    return {name: p.detach().clone() for name, p in rule.named_parameters()}


def test_recipe_config_builds_families_estimators_phases_and_adamw(recipe_path):
    config = TrainingConfig.from_toml(recipe_path)
    assert TrainingConfig.from_dict(config.to_dict()) == config
    trainer = _trainer(recipe_path)
    assert isinstance(trainer.rule, MLPRule) and trainer.rule.hidden_size == 2
    assert isinstance(trainer.meta_optimizer, torch.optim.AdamW)
    assert trainer.meta_optimizer.param_groups[0]["weight_decay"] == 0.01
    # one estimator per family, the second with its own loss range
    assert [type(e) for e in trainer.estimators] == [PES, PES]
    assert trainer.estimators[0].normalization == TaskNormalization(0.0, 3.5)
    assert trainer.estimators[1].normalization == TaskNormalization(0.0, 50.0)
    # slot s samples from family s % 2, every task augmented
    assert [type(run.task.task).__name__ for run in trainer.runs] == ["ModuleTask", "QuadraticTask"] * 2
    assert all(isinstance(run.task, ReparamTask) for run in trainer.runs)
    # first runs are shortened by an offset, keeping the full budget in the rule state
    assert all(0 <= run.offset < run.num_steps and run.state.num_steps == run.num_steps for run in trainer.runs)
    assert any(run.offset > 0 for run in trainer.runs)


def test_phases_train_only_their_part_and_restart_the_runs(recipe_path):
    trainer = _trainer(recipe_path)
    start = _params(trainer.rule)
    assert not trainer.rule.mlp.skip.requires_grad and trainer.rule.mlp.weights[0].requires_grad
    trainer.train(3)
    after_first = _params(trainer.rule)
    assert torch.equal(after_first["mlp.skip"], start["mlp.skip"])
    assert not torch.equal(after_first["mlp.weights.0"], start["mlp.weights.0"])
    before = [run.task_index for run in trainer.runs]
    trainer.step()  # the first step of phase 2: fresh runs, only the skip weights move
    assert trainer.phase == 1 and [run.task_index for run in trainer.runs] != before
    after_second = _params(trainer.rule)
    assert not torch.equal(after_second["mlp.skip"], after_first["mlp.skip"])
    assert bool((after_second["mlp.biases.0"] == 0.5).all())  # the phase's init, then frozen
    for name in after_second:
        if name not in ("mlp.skip", "mlp.biases.0"):
            assert torch.equal(after_second[name], after_first[name]), name
    trainer.train(2)
    with pytest.raises(ValueError, match="past the end of the phases"):
        trainer.step()


def test_later_runs_have_no_offset_and_offsets_end_runs_early():
    trainer = MetaTrainer(
        LSTMRule(hidden_size=4, num_layers=1), QuadraticFamily(dim=2), run_steps=6, unroll_steps=2,
        tasks_per_step=4, initial_offset=6,
    )
    first = {run.slot: (run.task_index, run.offset) for run in trainer.runs}
    for _ in range(4):
        trainer.step()
    for run in trainer.runs:
        if run.task_index != first[run.slot][0]:
            assert run.offset == 0
    shortened = [run for run in MetaTrainer(
        LSTMRule(hidden_size=4, num_layers=1), QuadraticFamily(dim=2), run_steps=6, unroll_steps=2,
        tasks_per_step=4, initial_offset=6,
    ).runs if run.offset]
    assert shortened and all(run.steps_left(10) == 6 - run.offset for run in shortened)


def test_trainer_rejects_bad_recipe_options():
    rule = LSTMRule(hidden_size=4, num_layers=1)
    family = QuadraticFamily(dim=2)
    with pytest.raises(ValueError, match="multiple of the number of families"):
        MetaTrainer(rule, [family, family], tasks_per_step=3)
    with pytest.raises(ValueError, match="one per family"):
        MetaTrainer(rule, [family, family], tasks_per_step=2, estimator=[PES()])
    with pytest.raises(ValueError, match="meta_optimizer='lion' is not supported"):
        MetaTrainer(rule, family, meta_optimizer="lion")
    with pytest.raises(ValueError, match="bad meta_optimizer_options"):
        MetaTrainer(rule, family, meta_optimizer="adamw", meta_optimizer_options={"decay": 0.1})
    with pytest.raises(ValueError, match="with meta_lr"):
        MetaTrainer(rule, family, meta_optimizer_options={"lr": 0.1})
    with pytest.raises(ValueError, match="prefix 'scheduler' matches no meta-parameter"):
        MetaTrainer(rule, family, phases=[Phase(5, freeze=("scheduler",))])
    with pytest.raises(ValueError, match="trains no meta-parameter"):
        MetaTrainer(rule, family, phases=[Phase(5, train=("head",), freeze=("head",))])
    with pytest.raises(ValueError, match="list of name prefixes"):
        Phase(5, train="head")
    with pytest.raises(ValueError, match="init names unknown meta-parameters"):
        MetaTrainer(rule, family, phases=[Phase(5, init={"head.w": 0.0})])
    with pytest.raises(ValueError, match="finite numbers"):
        Phase(5, init={"head.weight": float("nan")})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d["optimizer"].update(method="lstm"), "describe a rule"),
        (lambda d: d.update(family={"name": "quadratic"}), "exactly one of"),
        (lambda d: d["meta_optimizer"].update(name="lion"), "meta_optimizer='lion'"),
        (lambda d: d["phases"][1].update(steps=2), "cover 5 meta-steps"),
        (lambda d: d["phases"][0].update(thaw=["mlp"]), "accepted keys: steps, train, freeze"),
        (lambda d: d["rule"].pop("name"), r"\[rule\] needs"),
        (lambda d: d["families"][0].update(estimator=3), "estimator must be a table"),
    ],
)
def test_bad_recipe_configs(recipe_path, change, match):
    data = TrainingConfig.from_toml(recipe_path).to_dict()
    change(data)
    with pytest.raises(ValueError, match=match):
        TrainingConfig.from_dict(data)


def _log(out):
    with open(out / "log.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def _train_until_killed(path, out):
    """The child: train the recipe, checkpointing every step; after step 4 wait to be killed."""

    def hang(iteration, result):
        if iteration == 4:
            (out / "step4").touch()
            time.sleep(600)

    run_meta_training(_trainer(path), out, 6, 1, callback=hang)


def test_killed_recipe_run_resumes_bit_exactly(tmp_path, recipe_path):
    """SIGKILL after step 4 (mid-phase-2), resume to step 6: the same rule, log and state as an
    uninterrupted run, across a phase change, augmentation, offsets, PES particles and AdamW."""
    full = _trainer(recipe_path)
    run_meta_training(full, tmp_path / "full", 6, 1)
    out = tmp_path / "killed"
    out.mkdir()
    child = multiprocessing.get_context("fork").Process(target=_train_until_killed, args=(recipe_path, out))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not (out / "step4").exists():
            assert child.is_alive() and time.monotonic() < deadline, "the child never reached step 4"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    finally:
        child.kill()
    torch.manual_seed(123)
    np.random.seed(123)
    resumed = _trainer(recipe_path)
    results = run_meta_training(resumed, out, 6, 1, resume=True)
    assert len(results) == 2
    assert torch.equal(flatten_meta(full.rule), flatten_meta(resumed.rule))
    assert all(torch.equal(a, b) for a, b in zip(full.rule.parameters(), resumed.rule.parameters(), strict=True))
    assert _log(tmp_path / "full") == _log(out)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(out / "checkpoint.pt")
    assert torch.equal(a["trainer"]["rule"]["mlp.skip"], b["trainer"]["rule"]["mlp.skip"])
    assert a["trainer"]["phase"] == b["trainer"]["phase"] == 1
    assert [r["task_index"] for r in a["trainer"]["runs"]] == [r["task_index"] for r in b["trainer"]["runs"]]


def test_synchronised_runs_share_one_horizon_and_one_vmapped_call(monkeypatch):
    from metaoptimizer.meta import estimators

    calls = []
    real = estimators.run_jobs

    def counting(rule, jobs, **options):
        calls.append(len(jobs))
        return real(rule, jobs, **options)

    monkeypatch.setattr(estimators, "run_jobs", counting)
    family = make_family("synthetic8_mlp", hidden=4, batch_size=8, n_examples=60, augment={})
    trainer = MetaTrainer(
        LSTMRule(hidden_size=4, num_layers=1), [family, family], run_steps=9, min_run_steps=2, unroll_steps=2,
        tasks_per_step=4, initial_offset=9, sync_runs=True, estimator=[PES(num_pairs=1), PES(num_pairs=1)],
    )
    cohorts = []
    for _ in range(12):
        assert len({(run.num_steps, run.offset + run.steps_done) for run in trainer.runs}) == 1
        cohorts.append(trainer.runs[0].task_index)
        trainer.step()
    # equal estimators of both families: one estimate call per step, all four runs in one job list
    assert calls == [4] * 12
    assert len(set(cohorts)) > 1  # cohorts ended and restarted together
    state = trainer.state_dict()
    assert state["cohort"] == trainer.cohort and state["cohort"]["num_steps"] == trainer.runs[0].num_steps


def test_a_checkpoint_taken_as_a_cohort_restarts_holds_no_run_tensors_and_resumes_exactly():
    def trainer():
        family = make_family("synthetic8_mlp", hidden=4, batch_size=8, n_examples=60,
                             augment={"levels": ["tensor", "parameter"], "scale_range": [1e-2, 1e2]})
        torch.manual_seed(0)
        return MetaTrainer(LSTMRule(hidden_size=4, num_layers=1), [family], run_steps=6, unroll_steps=2,
                           tasks_per_step=2, sync_runs=True, estimator=PES(num_pairs=1), seed=3)

    running = trainer()
    while any(run.steps_done for run in running.runs) or running.steps == 0:
        running.step()  # to the step after which the cohort restarts
    state = running.state_dict()
    assert all("params" not in run and "state" not in run for run in state["runs"])
    restored = trainer()
    restored.load_state_dict(state)
    for a, b in zip(running.runs, restored.runs, strict=True):
        assert a.params.keys() == b.params.keys() and all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert restored.train(5) == running.train(5)
    assert torch.equal(flatten_meta(restored.rule), flatten_meta(running.rule))
    mid_run = running.state_dict()["runs"]  # 5 steps on, the cohort is 2 truncations into its run
    assert all(run["steps_done"] == 4 and "params" in run and "state" in run for run in mid_run)


def test_pes_without_centre_gives_the_same_estimate_with_fewer_unrolls():
    def runs_and_rows(centre):
        trainer = MetaTrainer(
            LSTMRule(hidden_size=4, num_layers=1), QuadraticFamily(dim=3), run_steps=8, unroll_steps=2,
            tasks_per_step=2, estimator=PES(num_pairs=2, sigma=0.05, centre=centre), seed=4,
        )
        torch.manual_seed(0)
        trainer.rule.load_state_dict(reference.state_dict())
        estimates = [trainer.estimator.estimate_runs(trainer.rule, trainer.runs, 2) for _ in range(3)]
        return trainer, estimates

    reference = LSTMRule(hidden_size=4, num_layers=1)
    _, a = runs_and_rows(True)
    without, b = runs_and_rows(False)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grads, y.grads, rtol=1e-5, atol=1e-7)
        assert torch.equal(x.inner_steps * 4, y.inner_steps * 5)  # 5 unrolls per run with the centre, 4 without
    # without a centre the run follows its first particle
    saved = without.runs[0].estimator_state.params
    assert all(torch.equal(without.runs[0].params[k], v[0]) for k, v in saved.items())
    with pytest.raises(ValueError, match="centre=False needs particles"):
        from metaoptimizer.meta.estimators import TruncatedES

        TruncatedES(centre=False)


def test_the_shipped_recipe_config_describes_the_celo_recipe():
    from pathlib import Path

    from metaoptimizer.rules import RULES

    root = Path(__file__).resolve().parents[1]
    config = TrainingConfig.from_toml(root / "configs" / "celo_recipe.toml")
    assert TrainingConfig.from_dict(config.to_dict()) == config
    assert config.rule == {"name": "celo"} and config.estimator == "pes"
    assert (config.meta_optimizer, config.optimizer.meta_lr, config.optimizer.unroll_steps) == ("adamw", 3e-4, 50)
    assert (config.min_run_steps, config.run_steps, config.initial_offset) == (100, 2000, 2000)
    assert [f["name"] for f in config.families] == ["digits8_mlp", "mnist8_mlp", "omniglot8_mlp", "synthetic8_mlp"]
    assert all(f["augment"]["scale_range"] == [1e-3, 1e3] for f in config.families)
    assert config.tasks_per_step == 32 and config.estimator_options["num_pairs"] == 1
    assert config.estimator_options["centre"] is False  # 32 tasks x 2 = 64 particles
    first, second = config.phases
    assert first["freeze"] == ["scheduler"] and second["train"] == ["scheduler"] and "init" not in second
    # phase 1 runs without the scheduler: lr_mult = 0.1 exp(h @ 0 + ln 10) = 1
    assert first["init"] == {"scheduler.step_weight": 0.0, "scheduler.step_bias": pytest.approx(math.log(10))}
    if "celo" in RULES:  # the rule line builds a fresh Celo whose phases name real parts
        rule = RULES["celo"]()
        for phase in config.build_phases():
            phase.check(rule)


def test_metaopt_meta_train_runs_the_recipe_config_and_resumes(tmp_path, recipe_path):
    from typer.testing import CliRunner

    from metaoptimizer.cli.main import app

    runner = CliRunner()
    out = tmp_path / "run"
    first = runner.invoke(app, ["meta-train", "--config", str(recipe_path), "--out", str(out), "--steps", "4"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["meta-train", "--config", str(recipe_path), "--out", str(out)])
    assert again.exit_code != 0 and "--resume" in again.output
    resumed = runner.invoke(app, ["meta-train", "--config", str(recipe_path), "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "2 meta-steps run" in resumed.output
    assert [row["iteration"] for row in _log(out)] == [str(i) for i in range(1, 7)]
    assert load_checkpoint(out / "checkpoint.pt")["trainer"]["phase"] == 1


def test_synchronised_full_es_runs_end_with_their_cohort():
    from metaoptimizer.meta.estimators import FullES

    trainer = MetaTrainer(
        LSTMRule(hidden_size=4, num_layers=1), QuadraticFamily(dim=2), run_steps=6, min_run_steps=3, unroll_steps=2,
        tasks_per_step=2, sync_runs=True, estimator=FullES(num_pairs=1),
    )
    for _ in range(3):
        before = [run.task_index for run in trainer.runs]
        horizon = trainer.cohort["num_steps"]
        assert trainer.runs[0].steps_left(2) == 2  # FullES ignores the truncation: the whole run at once
        result = trainer.step()
        assert result.inner_steps == 2 * 3 * horizon
        assert [run.task_index for run in trainer.runs] != before and trainer.cohort["steps_done"] == 0
