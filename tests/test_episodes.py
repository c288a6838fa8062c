"""Episodes and task-distribution samplers: validation, reproducibility, class splits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaoptimizer.tasks.episodes import (
    DIGITS_CLASSES,
    Episode,
    FewShotClassificationSampler,
    SinusoidSampler,
    digits_classes,
    digits_sampler,
    omniglot_classes,
    omniglot_sampler,
)


def classification_episode(**changes) -> Episode:
    fields = dict(
        support_x=torch.zeros(3, 4), support_y=torch.tensor([0, 1, 2]),
        query_x=torch.zeros(6, 4), query_y=torch.tensor([0, 1, 2, 2, 1, 0]),
        task_id="t", num_classes=3,
    )
    fields.update(changes)
    return Episode(**fields)


def regression_episode(**changes) -> Episode:
    fields = dict(
        support_x=torch.zeros(5, 1), support_y=torch.zeros(5, 1),
        query_x=torch.zeros(7, 1), query_y=torch.zeros(7, 1), task_id="r",
    )
    fields.update(changes)
    return Episode(**fields)


def test_episode_accessors():
    episode = classification_episode()
    assert episode.is_classification and not regression_episode().is_classification
    assert episode.support[0] is episode.support_x and episode.query[1] is episode.query_y
    moved = episode.to("cpu")
    assert torch.equal(moved.query_y, episode.query_y) and moved.num_classes == 3


@settings(max_examples=25, deadline=None)
@given(set_name=st.sampled_from(["support", "query"]), kind=st.sampled_from(["classification", "regression"]))
def test_empty_sets_are_rejected(set_name, kind):
    build = classification_episode if kind == "classification" else regression_episode
    empty_y = torch.zeros(0, dtype=torch.long) if kind == "classification" else torch.zeros(0, 1)
    width = 4 if kind == "classification" else 1
    with pytest.raises(ValueError, match=f"the {set_name} set is empty"):
        build(**{f"{set_name}_x": torch.zeros(0, width), f"{set_name}_y": empty_y})


@settings(max_examples=40, deadline=None)
@given(label=st.one_of(st.integers(-100, -1), st.integers(3, 100)), set_name=st.sampled_from(["support", "query"]))
def test_labels_out_of_range_are_rejected(label, set_name):
    labels = classification_episode().support_y.clone() if set_name == "support" else torch.tensor([0, 1, 2, 2, 1, 0])
    labels[0] = label
    with pytest.raises(ValueError, match=r"requires labels in \[0, 2\]"):
        classification_episode(**{f"{set_name}_y": labels})


@settings(max_examples=30, deadline=None)
@given(n_x=st.integers(1, 6), n_y=st.integers(1, 6))
def test_mismatched_lengths_are_rejected(n_x, n_y):
    if n_x == n_y:
        return
    with pytest.raises(ValueError, match="must have the same length"):
        regression_episode(support_x=torch.zeros(n_x, 1), support_y=torch.zeros(n_y, 1))


@settings(max_examples=30, deadline=None)
@given(width=st.integers(1, 8))
def test_mismatched_feature_shapes_are_rejected(width):
    if width == 4:
        return
    with pytest.raises(ValueError, match="features differ in shape"):
        classification_episode(query_x=torch.zeros(6, width))


@pytest.mark.parametrize(
    "changes, error, message",
    [
        (dict(support_x=[[0.0]] * 3), TypeError, "support_x must be a torch.Tensor"),
        (dict(support_y=torch.tensor([0.0, 1.0, 2.0])), TypeError, "integer class labels"),
        (dict(query_y=torch.ones(6, dtype=torch.bool)), TypeError, "integer class labels"),
        (dict(support_y=torch.zeros(3, 1, dtype=torch.long)), ValueError, "must be a vector of labels"),
        (dict(num_classes=0), ValueError, "num_classes must be a positive integer"),
        (dict(num_classes=True), ValueError, "num_classes must be a positive integer"),
        (dict(task_id=3), TypeError, "task_id must be a str"),
        (dict(support_x=torch.zeros(3, 4, dtype=torch.long)), TypeError, "floating-point"),
        (dict(query_x=torch.full((6, 4), math.nan)), ValueError, "query_x contains NaN"),
        (dict(support_x=torch.tensor(1.0)), ValueError, "support set is empty"),
        (dict(query_y=torch.tensor(1)), ValueError, "same length"),
    ],
)
def test_bad_classification_episodes(changes, error, message):
    with pytest.raises(error, match=message):
        classification_episode(**changes)


@pytest.mark.parametrize(
    "changes, error, message",
    [
        (dict(support_y=torch.zeros(5, 1, dtype=torch.long)), TypeError, "must be floating point"),
        (dict(query_y=torch.full((7, 1), math.inf)), ValueError, "query_y contains NaN or Inf"),
        (dict(query_y=torch.zeros(7, 2)), ValueError, "targets differ in shape"),
    ],
)
def test_bad_regression_episodes(changes, error, message):
    with pytest.raises(error, match=message):
        regression_episode(**changes)


def test_episode_tensors_must_share_a_device():
    with pytest.raises(ValueError, match="same device"):
        regression_episode(query_y=torch.zeros(7, 1, device="meta"))


# -- sinusoid --------------------------------------------------------------------------------


def test_sinusoid_episodes_lie_on_one_sinusoid_of_the_configured_distribution():
    sampler = SinusoidSampler(k_shot=5, query_size=20)
    for index in range(20):
        episode = sampler.episode(index)
        assert episode.support_x.shape == (5, 1) and episode.query_y.shape == (20, 1)
        x = torch.cat([episode.support_x, episode.query_x]).double().squeeze(1)
        y = torch.cat([episode.support_y, episode.query_y]).double().squeeze(1)
        # A sin(x - phase) = (A cos phase) sin x - (A sin phase) cos x: an exact linear fit.
        basis = torch.stack([torch.sin(x), torch.cos(x)], 1)
        (a, b), *_ = np.linalg.lstsq(basis.numpy(), y.numpy(), rcond=None)
        assert np.allclose(basis.numpy() @ np.array([a, b]), y.numpy(), atol=1e-5)
        assert 0.1 - 1e-5 <= math.hypot(a, b) <= 5 + 1e-5
        assert -1e-5 <= math.atan2(-b, a) <= math.pi + 1e-5
        assert x.min() >= -5 and x.max() <= 5


def test_sinusoid_sampler_is_reproducible_and_splits_differ():
    train, test = SinusoidSampler(5), SinusoidSampler(5, split="test")
    assert torch.equal(train.episode(3, seed=7).support_y, SinusoidSampler(5).episode(3, seed=7).support_y)
    assert not torch.equal(train.episode(3).support_y, train.episode(4).support_y)
    assert not torch.equal(train.episode(3).support_y, train.episode(3, seed=1).support_y)
    assert not torch.equal(train.episode(3).support_y, test.episode(3).support_y)
    assert train.episode(0, seed=2).task_id == "sinusoid/train/seed=2/index=0"


def test_batches_are_consecutive_episodes():
    sampler = SinusoidSampler(3, 4)
    stream = sampler.batches(2, seed=5)
    first, second = next(stream), next(stream)
    expected = sampler.episodes(4, seed=5)
    for got, want in zip(first + second, expected):
        assert torch.equal(got.query_y, want.query_y)
    assert [e.task_id for e in second] == [e.task_id for e in sampler.episodes(2, seed=5, start=2)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k_shot=0), "k_shot must be an integer > 0"),
        (dict(k_shot=2, query_size=-1), "query_size"),
        (dict(k_shot=2, amplitude=(5.0, 0.1)), "amplitude must be a finite"),
        (dict(k_shot=2, x_range=(-math.inf, 1.0)), "x_range must be a finite"),
        (dict(k_shot=2, split="dev"), "accepted values"),
    ],
)
def test_bad_sinusoid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SinusoidSampler(**kwargs)


@settings(max_examples=20, deadline=None)
@given(index=st.one_of(st.integers(max_value=-1), st.just(True), st.floats()))
def test_bad_episode_index(index):
    with pytest.raises(ValueError, match="index must be an integer >= 0"):
        SinusoidSampler(2).episode(index)


def test_sampler_device_argument():
    assert SinusoidSampler(2, device="cpu").episode(0).support_x.device.type == "cpu"


# -- classification --------------------------------------------------------------------------


def synthetic_classes(num_classes=6, per_class=10, side=3):
    """Class c holds examples whose every pixel is c + i / 100 (i = example index): a pixel tells
    the class and the example apart."""
    return [
        (c + torch.arange(per_class, dtype=torch.float32) / 100).view(-1, 1, 1, 1).expand(-1, 1, side, side).clone()
        for c in range(num_classes)
    ]


def test_classification_episode_structure():
    sampler = FewShotClassificationSampler(synthetic_classes(), n_way=4, k_shot=2, query_shots=3)
    episode = sampler.episode(0)
    assert episode.support_x.shape == (8, 1, 3, 3) and episode.query_x.shape == (12, 1, 3, 3)
    assert episode.num_classes == 4
    assert episode.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    support_class = episode.support_x[:, 0, 0, 0].floor()
    query_class = episode.query_x[:, 0, 0, 0].floor()
    for label in range(4):  # one source class per label, shared by support and query
        classes = set(support_class[episode.support_y == label].tolist()) | set(
            query_class[episode.query_y == label].tolist()
        )
        assert len(classes) == 1
    assert len(set(support_class.tolist())) == 4
    values = torch.cat([episode.support_x, episode.query_x])[:, 0, 0, 0].tolist()
    assert len(set(values)) == len(values)  # no example drawn twice


def test_classification_sampler_is_reproducible():
    a = FewShotClassificationSampler(synthetic_classes(), 3, 1, 2, split="test")
    b = FewShotClassificationSampler(synthetic_classes(), 3, 1, 2, split="test")
    assert torch.equal(a.episode(11, seed=4).query_x, b.episode(11, seed=4).query_x)
    assert not torch.equal(a.episode(11, seed=4).query_x, a.episode(12, seed=4).query_x)


def test_rotations_are_extra_classes():
    image = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3).expand(5, 1, 3, 3).clone()
    sampler = FewShotClassificationSampler([image], n_way=4, k_shot=1, query_shots=1, rotations=(0, 90, 180, 270))
    assert sampler.num_classes == 4
    episode = sampler.episode(0)
    seen = {tuple(x.flatten().tolist()) for x in episode.support_x}
    expected = {tuple(torch.rot90(image[0], k, (-2, -1)).flatten().tolist()) for k in range(4)}
    assert seen == expected
    for label in range(4):  # query images are rotated like their class's support image
        assert torch.equal(episode.query_x[episode.query_y == label], episode.support_x[episode.support_y == label])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n_way=7), ValueError, "needs at least 7 classes"),
        (dict(k_shot=8, query_shots=3), ValueError, "k_shot \\+ query_shots = 11"),
        (dict(classes=synthetic_classes()[:3] + [torch.zeros(10, 1, 2, 2)]), ValueError, "one shape"),
        (dict(classes=[torch.zeros(10, 1, 3, 3, dtype=torch.long)] * 4), TypeError, "floating point"),
        (dict(classes=[torch.zeros(10, 1, 3, 2)] * 4, rotations=(0, 90)), ValueError, "square images"),
        (dict(n_way=0), ValueError, "n_way"),
    ],
)
def test_bad_classification_sampler_arguments(kwargs, error, message):
    arguments = dict(classes=synthetic_classes(), n_way=3, k_shot=1, query_shots=2)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        FewShotClassificationSampler(**arguments)


@settings(max_examples=30, deadline=None)
@given(
    rotations=st.one_of(
        st.just(()),
        st.just("0"),
        st.lists(st.integers(-400, 400).filter(lambda r: r % 90), min_size=1, max_size=3),
        st.lists(st.sampled_from([0, 360, 90, 450]), min_size=2, max_size=4).filter(
            lambda r: len({a % 360 for a in r}) < len(r)
        ),
    )
)
def test_bad_rotations(rotations):
    with pytest.raises(ValueError, match="rotations must be"):
        FewShotClassificationSampler(synthetic_classes(), 3, 1, 2, rotations=rotations)


def test_digits_split_is_disjoint_and_complete():
    from sklearn.datasets import load_digits

    assert not set(DIGITS_CLASSES["train"]) & set(DIGITS_CLASSES["test"])
    counts = np.bincount(load_digits().target)
    for split, digits in DIGITS_CLASSES.items():
        classes = digits_classes(split)
        assert [c.shape[0] for c in classes] == [counts[d] for d in digits]
        assert all(c.shape[1:] == (1, 8, 8) and 0 <= c.min() and c.max() <= 1 for c in classes)
    sampler = digits_sampler("test", n_way=5, k_shot=1, query_shots=15)
    assert sampler.num_classes == 10 and sampler.episode(0).task_id.startswith("digits/test/")
    with pytest.raises(ValueError, match="accepted values: \\('train', 'test'\\)"):
        digits_sampler("valid")


# -- Omniglot (a tiny synthetic folder in the loader's format) -------------------------------


def write_fake_omniglot(folder, characters=(4, 3), side=12):
    """``images_background.npz`` / ``images_evaluation.npz`` (True = paper) and ``alphabets.json``."""
    entries = []
    for split, count in zip(("background", "evaluation"), characters):
        images = np.ones((count, 20, side, side), dtype=bool)
        for c in range(count):  # character c: ink in row c
            images[c, :, c, :] = False
        labels = np.repeat(np.arange(count)[:, None], 20, axis=1)
        np.savez(folder / f"images_{split}.npz", images=images, labels=labels)
        entries.append(
            {"set": split, "alphabet": f"{split}_alphabet", "npz_label_first": 0, "npz_label_last": count - 1}
        )
    (folder / "alphabets.json").write_text(json.dumps(entries))


def test_omniglot_sampler_reads_a_local_folder(tmp_path):
    write_fake_omniglot(tmp_path)
    classes = omniglot_classes(tmp_path, "train", image_size=6)
    assert len(classes) == 4 and classes[0].shape == (20, 1, 6, 6)
    assert classes[1][0, 0, 0].sum() == pytest.approx(6 * 6 / 12)  # row 1 of 12 inked, area-averaged
    sampler = omniglot_sampler(tmp_path, "test", n_way=5, k_shot=1, query_shots=5, image_size=6)
    assert sampler.num_classes == 3 * 4  # evaluation characters x rotations
    episode = sampler.episode(0)
    assert episode.support_x.shape == (5, 1, 6, 6) and episode.task_id.startswith("omniglot/test/")
    with pytest.raises(ValueError, match="accepted values"):
        omniglot_sampler(tmp_path, "valid")
