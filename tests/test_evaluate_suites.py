"""Suite definitions: the built-in suites, overrides, validation, and that every entry runs."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaoptimizer.evaluate.runner import run_rule
from metaoptimizer.evaluate.suites import SUITES, Suite, SuiteEntry, make_suite
from metaoptimizer.rules.hand import Adam
from metaoptimizer.tasks import HELDOUT, make_family
from metaoptimizer.tasks.general import GENERAL_TASKS


def test_heldout_suite_is_ten_heldout_tasks_of_the_meta_training_family_with_three_seeds():
    suite = make_suite("heldout")
    (entry,) = suite.entries
    assert (entry.family, entry.split, entry.steps, entry.seeds) == ("digits_mlp", HELDOUT, 200, (0, 1, 2))
    assert entry.task_indices == tuple(range(10))
    assert entry.eval_every == 20


def test_architectures_suite_has_three_unseen_architectures():
    suite = make_suite("architectures", num_tasks=2, steps=50, seeds=(0,))
    assert [e.family for e in suite.entries] == ["digits_mlp", "digits_cnn", "char_rnn"]
    assert suite.entries[0].kwargs == {"widths": 128, "depths": 3, "activations": "relu"}
    assert all(e.task_indices == (0, 1) and e.steps == 50 for e in suite.entries)
    with_text = make_suite("architectures", data_dir="/data")
    assert with_text.entries[2].kwargs == {"cells": "gru", "root": "/data"}


def test_long_horizon_suite_multiplies_the_budget():
    suite = make_suite("long_horizon", steps=40, horizon_factor=5)
    assert suite.entries[0].steps == 200 and suite.entries[0].eval_every == 20
    assert make_suite("long_horizon").entries[0].steps == 1000


@pytest.mark.parametrize("name", ["smoke", "architectures", "heldout"])
def test_every_entry_builds_its_tasks_and_runs_a_few_steps(name):
    suite = make_suite(name, num_tasks=1, steps=3, seeds=(0,))
    for entry in suite.entries:
        task = make_family(entry.family, **entry.kwargs).task(entry.task_indices[0], entry.split)
        curve = run_rule(Adam(lr=1e-3), task, steps=entry.steps, seed=0, eval_batches=1)
        assert not curve.diverged and "accuracy" in curve.eval_metrics


def test_suites_are_plain_data():
    suite = make_suite("smoke")
    data = suite.to_dict()
    assert data["name"] == "smoke" and data["entries"][0]["task_indices"] == [0, 1]
    assert set(SUITES) == {"heldout", "architectures", "long_horizon", "smoke", "general"}
    assert data["baselines"] == "default" and data["entries"][0]["group"] == "digits_mlp_tiny"


def test_general_suite_is_every_general_task_at_three_horizons_grouped_by_horizon(monkeypatch):
    monkeypatch.delenv("METAOPT_DATA_DIR", raising=False)
    suite = make_suite("general")
    assert suite.baselines == "general" and len(suite.entries) == 3 * len(GENERAL_TASKS) >= 36
    assert suite.groups() == ["300 steps", "1000 steps", "3000 steps"]
    first = suite.entries[0]
    assert (first.family, first.steps, first.seeds, first.kwargs) == ("general", 300, (0, 1, 2), {"task": "mlp_gelu_4x32"})
    assert "fallback data" in suite.description
    small = make_suite("general", horizons=(20,), tasks=("cnn_mnist", "regression"), seeds=(0,), data_dir="/")
    assert [e.label for e in small.entries] == ["cnn_mnist@20", "regression@20"]
    assert small.entries[0].kwargs == {"task": "cnn_mnist", "root": "/"}


def test_general_suite_rejects_bad_tasks_horizons_and_folders(tmp_path):
    with pytest.raises(ValueError, match="not general tasks; accepted: mlp_gelu_4x32"):
        make_suite("general", tasks=("resnet50",))
    with pytest.raises(ValueError, match="horizons"):
        make_suite("general", horizons=())
    with pytest.raises(ValueError, match="steps"):
        make_suite("general", horizons=(0,))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_suite("general", data_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="baseline set"):
        Suite("x", "y", make_suite("smoke").entries, baselines="users")


def test_make_suite_rejects_unknown_names_and_overrides():
    with pytest.raises(ValueError, match="unknown suite"):
        make_suite("imagenet")
    with pytest.raises(ValueError, match="does not take"):
        make_suite("heldout", data_dir="/data")


def test_suite_needs_distinct_entries():
    entry = SuiteEntry("a", "digits_mlp", (0,), 10, (0,))
    with pytest.raises(ValueError, match="at least one entry"):
        Suite("empty", "", ())
    with pytest.raises(ValueError, match="repeated entry labels"):
        Suite("twice", "", (entry, entry))


@settings(max_examples=30, deadline=None)
@given(
    field=st.sampled_from(["steps", "task_indices", "seeds", "split", "eval_every", "eval_batches"]),
    value=st.one_of(st.integers(-5, 0), st.just(()), st.just([0]), st.just((0, -1)), st.just("test"), st.just(1.5)),
)
def test_suite_entry_rejects_bad_fields(field, value):
    valid = {"steps": 10, "task_indices": (0,), "seeds": (0,), "split": HELDOUT, "eval_every": 2, "eval_batches": 1}
    with pytest.raises(ValueError, match=field):
        SuiteEntry("label", "digits_mlp", **{**valid, field: value})
