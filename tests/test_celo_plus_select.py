"""benchmarks/celo_plus_select.py: meta-validation on held-out seeds of the training families."""

import importlib
import sys
from pathlib import Path

import pytest

from metaoptimizer.meta.loop import TrainingConfig
from metaoptimizer.rules import SGD
from metaoptimizer.rules.celo import CeloRule
from metaoptimizer.tasks.augment import ReparamTask

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def select_module():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("celo_plus_select")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_scores_are_mean_normalised_losses_and_the_lowest_wins(select_module):
    losses = {"a@300": 0.5, "b@300": 0.1, "a@1000": 0.2, "b@1000": 1.5}
    assert select_module.mean_score(losses) == pytest.approx(0.575)
    assert select_module.mean_score(losses, ["a@300", "b@300"]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no"):
        select_module.mean_score(losses, [])
    assert select_module.select({"celo": 1.0, "step_000025": 0.97, "step_000050": 0.97}) == "step_000025"
    assert select_module.select({"celo": 1.0, "step_000025": 1.02}) == "celo"


def test_validation_tasks_are_held_out_tasks_of_the_training_families(select_module):
    config = TrainingConfig.from_dict({
        "rule": {"name": "celo"},
        "families": [
            {"name": "digits8_mlp", "hidden": 4, "n_examples": 200, "augment": {"levels": ["global"]}},
            {"name": "broad_image", "source": "digits", "depths": 1, "widths": 8, "activations": "elu",
             "n_examples": 200},
        ],
        "training": {"steps": 1, "run_steps": 10, "tasks_per_step": 2},
    })
    tasks = select_module.validation_tasks(config, 2)
    assert [label for label, _ in tasks] == [
        "0:digits8_mlp+reparam:heldout0", "0:digits8_mlp+reparam:heldout1",
        "1:broad_mlp:digits8:heldout0", "1:broad_mlp:digits8:heldout1",
    ]
    assert isinstance(tasks[0][1], ReparamTask)
    assert all(int(task.name.split("seed=")[1].split(":")[0]) % 2 == 1 for _, task in tasks)  # held-out seeds are odd
    losses = select_module.normalised_losses(CeloRule.pretrained(), tasks[2:3], [40])
    assert list(losses) == ["1:broad_mlp:digits8:heldout0@40"]
    assert 0.0 < losses["1:broad_mlp:digits8:heldout0@40"] < 1.0  # Celo lowers the loss
    diverging = SGD(lr=1e30)  # the loss overflows within 5 steps: a diverged run counts the cap
    assert select_module.normalised_losses(diverging, tasks[2:3], [5]) == {"1:broad_mlp:digits8:heldout0@5": 1.5}
