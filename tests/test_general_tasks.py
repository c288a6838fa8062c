"""The general suite's tasks: every one builds, is tiny, trains, names its data; fallbacks and errors."""

from pathlib import Path

import pytest
import torch

from metaoptimizer.evaluate.runner import run_rule
from metaoptimizer.rules.hand import Adam
from metaoptimizer.tasks import make_family
from metaoptimizer.tasks.datasets import DATA_DIR_ENV
from metaoptimizer.tasks.general import GENERAL_TASKS, GeneralTaskFamily, TransformerLM, parameter_count

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared data folder (../shared/data) is absent")
FALLBACK_SOURCES = {"digits", "markov", "synthetic", "friedman1"}


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def test_there_are_at_least_twelve_kinds_of_task():
    assert len(GENERAL_TASKS) >= 12
    kinds = " ".join(GENERAL_TASKS)
    for kind in ("mlp", "cnn", "resmlp_layernorm", "transformer_lm", "gru_lm", "autoencoder", "regression",
                 "logistic_regression", "omniglot"):
        assert kind in kinds


@pytest.mark.parametrize("name", list(GENERAL_TASKS))
def test_every_task_builds_on_fallback_data_and_adam_lowers_its_loss(name):
    task = make_family("general", task=name).task(0, "heldout")
    assert task.name.startswith(f"general:{name}:") and task.name.split(":")[2] in FALLBACK_SOURCES
    assert parameter_count(task) <= 64_000
    curve = run_rule(Adam(lr=1e-2), task, steps=40, seed=0, eval_batches=1)
    assert not curve.diverged
    assert curve.train_loss[-5:].mean() < curve.train_loss[:5].mean()


def test_task_seed_draws_the_data_and_run_seed_the_initialisation():
    family = GeneralTaskFamily("mlp_gelu_4x32")
    a, b = family.task(0, "heldout"), family.task(1, "heldout")
    assert not torch.equal(a.train_data[0], b.train_data[0])
    assert torch.equal(a.train_data[0], family.task(0, "heldout").train_data[0])
    first, second = a.init_params(0), a.init_params(1)
    assert not torch.equal(first["1.weight"], second["1.weight"])


@needs_data
@pytest.mark.parametrize("name, source", [("cnn_mnist", "mnist"), ("cnn_omniglot", "omniglot"),
                                          ("transformer_lm", "shakespeare")])
def test_the_data_folder_gives_real_data(name, source, monkeypatch):
    task = GeneralTaskFamily(name, SHARED_DATA).task(0, "heldout")
    assert task.name.split(":")[2] == source
    monkeypatch.setenv(DATA_DIR_ENV, str(SHARED_DATA))  # the environment variable works too
    assert GeneralTaskFamily(name).task(0, "heldout").name == task.name
    assert torch.isfinite(task.loss(task.init_params(0), next(task.train_batches(0))))


def test_transformer_is_causal():
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=7, width=8, layers=1, heads=2, max_len=6)
    tokens = torch.randint(7, (1, 6))
    changed = tokens.clone()
    changed[0, 4:] = (changed[0, 4:] + 1) % 7
    assert torch.allclose(model(tokens)[0, :4], model(changed)[0, :4], atol=1e-6)


def test_bad_task_names_and_folders_are_reported(tmp_path):
    with pytest.raises(ValueError, match="accepted values: mlp_gelu_4x32"):
        GeneralTaskFamily("imagenet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GeneralTaskFamily("cnn_mnist", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):  # a folder without MNIST
        GeneralTaskFamily("cnn_mnist", tmp_path).task(0, "heldout")
