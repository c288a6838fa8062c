"""Local data loaders (MNIST, Omniglot, tiny Shakespeare) that never download anything.

Each loader takes a folder (or the ``METAOPT_DATA_DIR`` environment variable, see
:func:`data_dir`) and looks for its files there or in a sub-folder named after the data set
(``mnist/``, ``omniglot/``, ``tinyshakespeare/``), so both the data set's own folder and a
common parent holding all of them work. Missing files raise ``FileNotFoundError`` naming the
expected files; malformed files raise ``ValueError`` naming the file and the problem.
"""

from __future__ import annotations

import gzip
import json
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metaoptimizer.config import check_positive

DATA_DIR_ENV = "METAOPT_DATA_DIR"
MNIST_SPLITS = ("train", "test")
OMNIGLOT_SPLITS = ("background", "evaluation")
IDX_UBYTE = 0x08
ALPHABETS_FILE = "alphabets.json"
SHAKESPEARE_FILE = "input.txt"


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data folder: ``explicit`` when given, else ``$METAOPT_DATA_DIR``; it must exist."""
    if explicit is None:
        explicit = os.environ.get(DATA_DIR_ENV)
        if not explicit:
            raise ValueError(f"no data folder given: pass a folder (root=...) or set the {DATA_DIR_ENV} variable")
    path = Path(explicit).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {str(path)!r} does not exist or is not a folder")
    return path


def _find_files(root: str | os.PathLike | None, subdir: str, names: list[list[str]]) -> list[Path]:
    """For each group of alternative file names, the first one found in ``root`` or ``root/subdir``."""
    base = data_dir(root)
    for folder in (base, base / subdir):
        found = [next((folder / n for n in group if (folder / n).is_file()), None) for group in names]
        if all(p is not None for p in found):
            return found
    expected = ", ".join(" or ".join(group) for group in names)
    raise FileNotFoundError(f"expected the files {expected} in {str(base)!r} or {str(base / subdir)!r}")


def _read_bytes(path: Path) -> bytes:
    """The file's contents, gunzipped when its name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a valid (complete) gzip file: {err}") from err


def read_idx(path: str | os.PathLike) -> Tensor:
    """An unsigned-byte IDX array (the MNIST format), optionally gzipped, as a ``uint8`` tensor.

    Header: two zero bytes, the type code ``0x08`` (unsigned byte), the number of dimensions,
    then one big-endian ``int32`` per dimension.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file: it must start with two zero bytes")
    if data[2] != IDX_UBYTE:
        raise ValueError(
            f"{path} has IDX type code {data[2]:#04x}; only unsigned bytes ({IDX_UBYTE:#04x}) are supported"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0:
        raise ValueError(f"{path} declares 0 dimensions; IDX arrays have at least one")
    if len(data) < header:
        raise ValueError(f"{path} has a truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(
            f"{path} holds {len(data) - header} data bytes but its header shape {shape} needs {expected}"
        )
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy())


def load_mnist(root: str | os.PathLike | None = None, split: str = "train") -> tuple[Tensor, Tensor]:
    """MNIST images ``uint8 (N, H, W)`` and labels ``int64 (N,)`` from local IDX files.

    ``split`` is ``"train"`` (``train-*``) or ``"test"`` (``t10k-*``); each file may be gzipped.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"split={split!r} is not supported; accepted values: {MNIST_SPLITS}")
    prefix = "train" if split == "train" else "t10k"
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    image_path, label_path = _find_files(root, "mnist", [[s, s + ".gz"] for s in stems])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3:
        raise ValueError(f"{image_path} must hold a 3-d array (N, rows, cols), got shape {tuple(images.shape)}")
    if labels.ndim != 1:
        raise ValueError(f"{label_path} must hold a 1-d array (N,), got shape {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_path} has {images.shape[0]} images but {label_path} has {labels.shape[0]} labels")
    if labels.numel() and int(labels.max()) > 9:
        raise ValueError(f"{label_path} has label {int(labels.max())}; MNIST labels lie in 0..9")
    return images, labels.long()


@dataclass(frozen=True)
class OmniglotSet:
    """One Omniglot split: ``images`` is ``bool (characters, drawers, H, W)``, True where there
    is ink; row ``c`` holds the drawings of character ``c``; ``alphabets`` maps each alphabet to
    its rows (one alphabet is one task in the Leap/WarpGrad protocol)."""

    split: str
    images: Tensor
    alphabets: dict[str, range]


def _load_npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not an archive of named arrays")
        with npz:
            arrays = {name: npz[name] for name in npz.files if name in ("images", "labels")}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"{path} is not a readable .npz file: {err}") from err
    missing = sorted({"images", "labels"} - set(arrays))
    if missing:
        raise ValueError(f"{path} lacks the arrays {missing}; expected the arrays 'images' and 'labels'")
    return arrays["images"], arrays["labels"]


def _alphabet_ranges(path: Path, split: str, n_characters: int) -> dict[str, range]:
    """Alphabet -> rows for ``split``, checked to tile ``0..n_characters-1`` exactly."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        ranges = {
            e["alphabet"]: range(int(e["npz_label_first"]), int(e["npz_label_last"]) + 1)
            for e in entries
            if e["set"] == split
        }
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(
            f"{path} must be a JSON list of objects with keys 'set', 'alphabet', 'npz_label_first', "
            f"'npz_label_last': {err!r}"
        ) from err
    rows = sorted(r for span in ranges.values() for r in span)
    if rows != list(range(n_characters)):
        raise ValueError(
            f"{path}: the {split} alphabets' label ranges must cover 0..{n_characters - 1} once each "
            f"(the npz has {n_characters} characters), got {len(rows)} labels"
        )
    return ranges


def load_omniglot(root: str | os.PathLike | None = None, split: str = "background") -> OmniglotSet:
    """Omniglot from ``images_<split>.npz`` (``images`` bool, True = paper; ``labels`` = row index)
    and ``alphabets.json``; the returned images are inverted so that True marks ink."""
    if split not in OMNIGLOT_SPLITS:
        raise ValueError(f"split={split!r} is not supported; accepted values: {OMNIGLOT_SPLITS}")
    npz_path, json_path = _find_files(root, "omniglot", [[f"images_{split}.npz"], [ALPHABETS_FILE]])
    images, labels = _load_npz_arrays(npz_path)
    if images.dtype != np.bool_ or images.ndim != 4:
        raise ValueError(
            f"{npz_path}: 'images' must be a bool array (characters, drawers, H, W), "
            f"got {images.dtype} with shape {images.shape}"
        )
    if labels.shape != images.shape[:2] or not (labels == np.arange(labels.shape[0])[:, None]).all():
        raise ValueError(
            f"{npz_path}: 'labels' must have shape {images.shape[:2]} with labels[c, :] == c, "
            f"got shape {labels.shape}"
        )
    alphabets = _alphabet_ranges(json_path, split, images.shape[0])
    np.logical_not(images, out=images)
    return OmniglotSet(split=split, images=torch.from_numpy(images), alphabets=alphabets)


def area_weights(n_in: int, n_out: int, device: torch.device | str | None = None) -> Tensor:
    """``(n_out, n_in)`` weights of exact area resampling along one axis: output cell ``i``
    averages the input pixels it covers, each weighted by its overlap (rows sum to 1)."""
    edges = torch.arange(n_out + 1, dtype=torch.float64) * (n_in / n_out)
    pixels = torch.arange(n_in, dtype=torch.float64)
    low = torch.maximum(edges[:-1, None], pixels[None, :])
    high = torch.minimum(edges[1:, None], pixels[None, :] + 1)
    return ((high - low).clamp_min(0) * (n_out / n_in)).to(device=device, dtype=torch.float32)


def resize_images(images: Tensor, size: int, chunk: int = 1024) -> Tensor:
    """Area-resample ``images (..., H, W)`` to ``float32 (..., size, size)`` (e.g. Omniglot 105 -> 28).

    Every output pixel is the exact mean of the input area it covers, so the ink total scales by
    the area ratio; bool images become ink fractions in [0, 1]. Works through ``chunk`` images
    at a time to bound memory.
    """
    check_positive("size", size, integer=True)
    check_positive("chunk", chunk, integer=True)
    if images.ndim < 2:
        raise ValueError(f"images must have shape (..., H, W), got {tuple(images.shape)}")
    rows = area_weights(images.shape[-2], size, images.device)
    cols = area_weights(images.shape[-1], size, images.device)
    flat = images.reshape(-1, *images.shape[-2:])
    out = [rows @ part.float() @ cols.T for part in flat.split(chunk)]
    return torch.cat(out).reshape(*images.shape[:-2], size, size)


def load_tiny_shakespeare(root: str | os.PathLike | None = None) -> str:
    """The tiny Shakespeare text (``input.txt``, UTF-8)."""
    (path,) = _find_files(root, "tinyshakespeare", [[SHAKESPEARE_FILE]])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from err
    if not text:
        raise ValueError(f"{path} is empty")
    return text
