from pathlib import Path

import pytest
import torch

from metaoptimizer.meta._vectorized import loss_signature
from metaoptimizer.tasks import make_family
from metaoptimizer.tasks.image8 import Digits8Family, MNIST8Family, Omniglot8Family, Synthetic8Family

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="the shared data folder (../shared/data) is absent")


def _check_family(family, n_examples):
    task = family.sample(2)
    params = task.init_params(2)
    assert sum(p.numel() for p in params.values()) == 64 * 32 + 32 + 32 * 10 + 10 == 2410
    x, y = next(task.train_batches(0))
    assert x.shape == (64, 1, 8, 8) and y.shape == (64,)
    assert len(task.train_data[0]) + len(task.valid_data[0]) == n_examples
    assert set(task.train_data[1].tolist()) == set(range(10))
    assert 1.5 < float(task.loss(params, (x, y))) < 4.0
    again = family.sample(2)
    assert torch.equal(again.train_data[0], task.train_data[0]) and torch.equal(again.valid_data[1], task.valid_data[1])
    assert not torch.equal(family.sample(3).train_data[0], task.train_data[0])
    return task


def test_digits_and_synthetic_families():
    digits = _check_family(Digits8Family(), 1797)
    synthetic = _check_family(Synthetic8Family(n_examples=500), 500)
    # Same architecture, same loss function: the families' tasks run in one vmapped call.
    assert loss_signature(digits) == loss_signature(synthetic)


def test_synthetic_tasks_are_learnable_and_vary_in_difficulty():
    family = Synthetic8Family(n_examples=400, noise_range=(0.1, 3.0))
    noise = []
    for seed in range(6):
        x, y = family.examples(seed)
        means = torch.stack([x[y == c].mean(0) for c in range(10)])
        noise.append(float((x - means[y]).std()))
    assert max(noise) > 3 * min(noise)


@needs_data
def test_mnist_and_omniglot_at_8x8():
    mnist = _check_family(MNIST8Family(root=DATA, n_examples=3000), 3000)
    omniglot = _check_family(Omniglot8Family(root=DATA), 200)
    assert loss_signature(mnist) == loss_signature(omniglot)
    x, y = Omniglot8Family(root=DATA).examples(5)
    assert x.shape == (200, 1, 8, 8) and torch.bincount(y).tolist() == [20] * 10
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_registered_names_and_bad_options():
    assert isinstance(make_family("synthetic8_mlp", n_examples=50), Synthetic8Family)
    with pytest.raises(ValueError, match="n_examples=5000 exceeds"):
        Digits8Family(n_examples=5000)
    with pytest.raises(ValueError, match="noise_range needs low <= high"):
        Synthetic8Family(noise_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="hidden must be an integer"):
        Synthetic8Family(hidden=3.5)
    with pytest.raises(ValueError, match="valid_fraction"):
        Digits8Family(valid_fraction=1.5)
