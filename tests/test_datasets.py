"""Local loaders on small synthetic IDX / npz / text files written to tmp_path."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaoptimizer.tasks import make_family
from metaoptimizer.tasks.datasets import (
    DATA_DIR_ENV,
    area_weights,
    data_dir,
    load_mnist,
    load_omniglot,
    load_tiny_shakespeare,
    read_idx,
    resize_images,
)
from metaoptimizer.tasks.mnist import MNISTMLPFamily

SHARED_DATA = Path("/work/shared/data")


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_mnist(folder: Path, n: int = 12, split: str = "train", gz: bool = True, seed: int = 0) -> tuple:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    write(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
    write(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
    return images, labels


# -- data_dir -------------------------------------------------------------------------------


def test_data_dir_prefers_the_explicit_folder_then_the_environment(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(other))
    assert data_dir(tmp_path) == tmp_path
    assert data_dir() == other
    monkeypatch.delenv(DATA_DIR_ENV)
    with pytest.raises(ValueError, match=DATA_DIR_ENV):
        data_dir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_dir(tmp_path / "missing")


# -- IDX / MNIST ----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips(tmp_path, gz):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write(tmp_path / "a-idx3-ubyte", idx_bytes(array), gz)
    out = read_idx(path)
    assert out.dtype == torch.uint8 and torch.equal(out, torch.from_numpy(array))


@pytest.mark.parametrize(("gz", "nested", "split"), [(True, False, "train"), (False, True, "test")])
def test_load_mnist(tmp_path, gz, nested, split):
    images, labels = write_mnist(tmp_path / "mnist" if nested else tmp_path, split=split, gz=gz)
    x, y = load_mnist(tmp_path, split)
    assert x.shape == (12, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.long
    assert torch.equal(x, torch.from_numpy(images)) and torch.equal(y, torch.from_numpy(labels).long())


def test_load_mnist_lists_the_expected_files_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte or train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path)
    write_mnist(tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        load_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="accepted values"):
        load_mnist(tmp_path, "validation")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x00\x08\x01" + struct.pack(">i", 1) + b"\x00", "two zero bytes"),
        (b"\x00\x00\x0d\x01" + struct.pack(">i", 1) + b"\x00\x00\x00\x00", "type code 0x0d"),
        (b"\x00\x00\x08\x03" + struct.pack(">i", 2), "truncated IDX header"),
        (idx_bytes(np.zeros((2, 3), np.uint8))[:-1], "needs 6"),
        (idx_bytes(np.zeros((2, 3), np.uint8)) + b"\x00", "needs 6"),
        (b"\x00\x00", "two zero bytes"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, data, message):
    path = write(tmp_path / "bad-idx", data, gz=False)
    with pytest.raises(ValueError, match=message):
        read_idx(path)


def test_read_idx_rejects_truncated_and_fake_gzip(tmp_path):
    compressed = gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))
    truncated = tmp_path / "cut-idx3-ubyte.gz"
    truncated.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match="not a valid .*gzip"):
        read_idx(truncated)
    fake = tmp_path / "fake-idx3-ubyte.gz"
    fake.write_bytes(b"this is not gzip data")
    with pytest.raises(ValueError, match="not a valid .*gzip"):
        read_idx(fake)


def test_load_mnist_checks_images_against_labels(tmp_path):
    write_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(5, np.uint8)), gz=True)
    with pytest.raises(ValueError, match="12 images but .* 5 labels"):
        load_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.full(12, 11, np.uint8)), gz=True)
    with pytest.raises(ValueError, match="label 11"):
        load_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros((12, 2), np.uint8)), gz=True)
    with pytest.raises(ValueError, match="1-d array"):
        load_mnist(tmp_path)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros(12, np.uint8)), gz=True)
    with pytest.raises(ValueError, match="3-d array"):
        load_mnist(tmp_path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=40))
def test_read_idx_never_fails_without_a_clear_error(tmp_path, data):
    path = tmp_path / "random-idx"
    path.write_bytes(data)
    try:
        out = read_idx(path)
    except ValueError as err:
        assert str(path) in str(err)
    else:
        assert out.numel() == len(data) - 4 - 4 * data[3]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=4), gz=st.booleans())
def test_read_idx_round_trips_any_shape(tmp_path, shape, gz):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = write(tmp_path / "shape-idx", idx_bytes(array), gz)
    assert torch.equal(read_idx(path), torch.from_numpy(array))


def test_mnist_mlp_family_on_a_synthetic_folder(tmp_path):
    write_mnist(tmp_path, n=40)
    family = make_family("mnist_mlp", root=tmp_path, n_examples=40, widths=8, depths=1, batch_size=8)
    assert isinstance(family, MNISTMLPFamily)
    task = family.sample(0)
    x, y = next(task.train_batches(0))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert task.init_params(0)["1.weight"].shape == (8, 784)
    assert torch.isfinite(task.loss(task.init_params(0), (x, y)))
    with pytest.raises(ValueError, match="exceed the 40"):
        MNISTMLPFamily(tmp_path)


# -- Omniglot -------------------------------------------------------------------------------


ALPHABETS = [
    {"set": "background", "alphabet": "Alpha", "npz_label_first": 0, "npz_label_last": 1},
    {"set": "background", "alphabet": "Beta", "npz_label_first": 2, "npz_label_last": 4},
    {"set": "evaluation", "alphabet": "Gamma", "npz_label_first": 0, "npz_label_last": 1},
]


def write_omniglot(folder: Path, split: str = "background", n: int = 5, alphabets=ALPHABETS, **arrays) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).random((n, 3, 10, 10)) > 0.2
    contents = {"images": images, "labels": np.repeat(np.arange(n)[:, None], 3, axis=1), **arrays}
    np.savez_compressed(folder / f"images_{split}.npz", **contents)
    (folder / "alphabets.json").write_text(json.dumps(alphabets))
    return images


@pytest.mark.parametrize("nested", [False, True])
def test_load_omniglot_inverts_ink_and_maps_alphabets(tmp_path, nested):
    images = write_omniglot(tmp_path / "omniglot" if nested else tmp_path)
    data = load_omniglot(tmp_path, "background")
    assert data.split == "background" and data.images.dtype == torch.bool
    assert torch.equal(data.images, torch.from_numpy(~images))
    assert data.alphabets == {"Alpha": range(0, 2), "Beta": range(2, 5)}


def test_load_omniglot_evaluation_split(tmp_path):
    write_omniglot(tmp_path, split="evaluation", n=2)
    assert load_omniglot(tmp_path, "evaluation").alphabets == {"Gamma": range(0, 2)}
    with pytest.raises(ValueError, match="accepted values"):
        load_omniglot(tmp_path, "test")


def test_load_omniglot_lists_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_background.npz, alphabets.json"):
        load_omniglot(tmp_path)
    write_omniglot(tmp_path)
    (tmp_path / "alphabets.json").unlink()
    with pytest.raises(FileNotFoundError, match="alphabets.json"):
        load_omniglot(tmp_path)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"labels": np.zeros((5, 3), np.int64)}, "labels\\[c, :\\] == c"),
        ({"labels": np.arange(5)}, "labels"),
        ({"images": np.zeros((5, 3, 10, 10), np.uint8)}, "must be a bool array"),
        ({"images": np.zeros((5, 3, 10), bool)}, "must be a bool array"),
    ],
)
def test_load_omniglot_rejects_bad_arrays(tmp_path, arrays, message):
    write_omniglot(tmp_path, **arrays)
    with pytest.raises(ValueError, match=message):
        load_omniglot(tmp_path)


def test_load_omniglot_rejects_missing_arrays(tmp_path):
    np.savez(tmp_path / "images_background.npz", images=np.zeros((2, 1, 3, 3), bool))
    (tmp_path / "alphabets.json").write_text(json.dumps(ALPHABETS))
    with pytest.raises(ValueError, match="lacks the arrays \\['labels'\\]"):
        load_omniglot(tmp_path)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "single_array"])
def test_load_omniglot_rejects_unreadable_npz(tmp_path, kind):
    write_omniglot(tmp_path)
    path = tmp_path / "images_background.npz"
    if kind == "garbage":
        path.write_bytes(b"not an archive at all")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        with path.open("wb") as f:
            np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_omniglot(tmp_path)


@pytest.mark.parametrize(
    ("alphabets", "message"),
    [
        ("{not json", "JSON list"),
        ([{"set": "background", "alphabet": "A"}], "JSON list"),
        ([{"set": "background", "alphabet": "A", "npz_label_first": 0, "npz_label_last": 3}], "cover 0..4"),
        (ALPHABETS[:1] + [{**ALPHABETS[1], "npz_label_first": 1}], "once each"),
    ],
)
def test_load_omniglot_rejects_bad_alphabets(tmp_path, alphabets, message):
    write_omniglot(tmp_path)
    (tmp_path / "alphabets.json").write_text(alphabets if isinstance(alphabets, str) else json.dumps(alphabets))
    with pytest.raises(ValueError, match=message):
        load_omniglot(tmp_path)


# -- resizing and text ----------------------------------------------------------------------


def test_resize_images_averages_areas():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = resize_images(images, 4, chunk=1)
    assert out.shape == (2, 3, 4, 4)
    torch.testing.assert_close(out, F.avg_pool2d(images.reshape(6, 1, 8, 8), 2).reshape(2, 3, 4, 4))
    ink = torch.zeros(1, 105, 105, dtype=torch.bool)
    ink[:, :, :50] = True
    small = resize_images(ink, 28)
    assert small.dtype == torch.float32 and small.shape == (1, 28, 28)
    assert small.sum().item() == pytest.approx(ink.sum().item() * (28 / 105) ** 2, rel=1e-5)
    expected_row = torch.cat([torch.ones(13), torch.tensor([(50 - 13 * 3.75) / 3.75]), torch.zeros(14)])
    torch.testing.assert_close(small[0], expected_row.expand(28, 28))
    assert resize_images(torch.zeros(0, 5, 5), 2).shape == (0, 2, 2)


def test_area_weights_rows_average_the_covered_pixels():
    weights = area_weights(5, 2)
    torch.testing.assert_close(weights, torch.tensor([[0.4, 0.4, 0.2, 0, 0], [0, 0, 0.2, 0.4, 0.4]]))
    torch.testing.assert_close(area_weights(3, 6).sum(1), torch.ones(6))


@settings(max_examples=20, deadline=None)
@given(size=st.one_of(st.integers(max_value=0), st.floats(), st.booleans()))
def test_resize_images_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="size"):
        resize_images(torch.zeros(1, 4, 4), size)


def test_resize_images_rejects_non_images():
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        resize_images(torch.zeros(4), 2)


def test_load_tiny_shakespeare(tmp_path):
    with pytest.raises(FileNotFoundError, match="input.txt"):
        load_tiny_shakespeare(tmp_path)
    folder = tmp_path / "tinyshakespeare"
    folder.mkdir()
    (folder / "input.txt").write_text("First Citizen:\nSpeak, speak.\n", encoding="utf-8")
    assert load_tiny_shakespeare(tmp_path) == "First Citizen:\nSpeak, speak.\n"
    (folder / "input.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_tiny_shakespeare(tmp_path)
    (folder / "input.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_tiny_shakespeare(tmp_path)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared real-data folder is absent")
def test_real_data_files_load_with_their_published_shapes():
    images, labels = load_mnist(SHARED_DATA, "test")
    assert images.shape == (10000, 28, 28) and labels.bincount().tolist()[:2] == [980, 1135]
    omniglot = load_omniglot(SHARED_DATA, "evaluation")
    assert omniglot.images.shape == (659, 20, 105, 105) and len(omniglot.alphabets) == 20
    text = load_tiny_shakespeare(SHARED_DATA)
    assert len(text) == 1115394 and len(set(text)) == 65
