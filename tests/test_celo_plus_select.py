"""benchmarks/celo_plus_select.py: meta-validation on held-out seeds of the training families."""

import importlib
import math
import sys
from pathlib import Path

import pytest

from metaoptimizer.meta.loop import TrainingConfig
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


def test_scores_are_geometric_mean_loss_ratios_and_the_lowest_wins(select_module):
    reference = {"a@300": 1.0, "b@300": 0.5}
    assert select_module.relative_score(reference, reference) == 1.0
    assert select_module.relative_score({"a@300": 2.0, "b@300": 0.125}, reference) == pytest.approx(math.sqrt(0.5))
    assert select_module.relative_score({"a@300": math.inf, "b@300": 0.1}, reference) == math.inf
    with pytest.raises(ValueError, match="same"):
        select_module.relative_score({"a@300": 1.0}, reference)
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
        "training": {"steps": 1, "horizon": 10, "tasks_per_step": 2},
    })
    tasks = select_module.validation_tasks(config, 2)
    assert [label for label, _ in tasks] == [
        "0:digits8_mlp+reparam:heldout0", "0:digits8_mlp+reparam:heldout1",
        "1:broad_mlp:digits8:heldout0", "1:broad_mlp:digits8:heldout1",
    ]
    assert isinstance(tasks[0][1], ReparamTask)
    assert all(int(task.name.split("seed=")[1].split(":")[0]) % 2 == 1 for _, task in tasks)  # held-out seeds are odd
    losses = select_module.final_losses(CeloRule.pretrained(), tasks[2:3], [12])
    assert list(losses) == ["1:broad_mlp:digits8:heldout0@12"]
    assert 0.0 < losses["1:broad_mlp:digits8:heldout0@12"] < 3.0
