"""Checkpoint files: atomic writes and safe, validated reads.

A checkpoint is a dict ``{"format": "metaoptimizer", "kind": ..., "version": ..., "config": ...,
**payload}`` written with ``torch.save`` and read back with ``torch.load(weights_only=True)``, so
it may hold only tensors, numbers, strings, bytes, ``None``, dtypes/devices and
dicts/lists/tuples/sets of them (convert dataclasses such as ``OptimizerState`` with
``to_dict()`` first). Every way a read can fail is reported as a :class:`CheckpointError` that
says which file and why.
"""

from __future__ import annotations

import os
import pickle
import secrets
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FORMAT", "CheckpointError", "atomic_save", "load_checkpoint", "save_checkpoint"]

FORMAT = "metaoptimizer"
_RESERVED = ("format", "kind", "version", "config")
_MAPPINGS = (dict, OrderedDict)
_SEQUENCES = (list, tuple, set, torch.Size)
_LEAVES = (torch.Tensor, nn.Parameter, str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, foreign, of another kind, or from a newer format."""


def _package_version() -> str:
    # Imported late: ``metaoptimizer/__init__`` may import this module before defining the version.
    from metaoptimizer import __version__

    return __version__


def _compat_key(version: str) -> tuple[int, ...]:
    """Releases with equal keys read each other's checkpoints: same major (same minor before 1.0)."""
    parts = version.split(".")
    if len(parts) < 2 or not all(part.isdigit() for part in parts[:2]):
        raise ValueError(f"version {version!r} is not of the form MAJOR.MINOR[.PATCH]")
    major, minor = int(parts[0]), int(parts[1])
    return (0, minor) if major == 0 else (major,)


def _summary(error: Exception, limit: int = 160) -> str:
    """``Type: first line of the message``, shortened (torch's messages run to paragraphs)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError naming the first value that ``torch.load(weights_only=True)`` would refuse.

    Types are matched exactly: subclasses such as namedtuples or defaultdicts are refused by the
    safe loader even though their bases are accepted.
    """
    if type(obj) in _MAPPINGS:
        for key, value in obj.items():
            _check_plain(key, f"a key of {where}")
            _check_plain(value, f"{where}[{key!r}]")
    elif type(obj) in _SEQUENCES:
        for index, value in enumerate(obj):
            _check_plain(value, f"{where}[{index}]")
    elif type(obj) not in _LEAVES:
        raise TypeError(
            f"{where} is a {type(obj).__name__}; checkpoints hold only tensors, numbers, strings, bytes, None, "
            "dtypes, devices and dicts/lists/tuples/sets of them (convert dataclasses with to_dict())"
        )


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    Writes a temporary file in the same directory, flushes and fsyncs it, then renames it over
    ``path`` with ``os.replace`` (atomic on POSIX and Windows), so a crash or kill at any point
    leaves either the previous file or the new one. Missing parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    path: str | os.PathLike, *, kind: str, payload: dict[str, Any], config: dict[str, Any] | None = None
) -> None:
    """Atomically write a checkpoint of ``kind`` holding ``payload``'s entries and ``config``.

    Raises ValueError for an empty kind or a payload key that clashes with the header keys
    (``format``, ``kind``, ``version``, ``config``), and TypeError for values that a
    ``weights_only`` load would refuse (before anything is written).
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict or None, got {type(config).__name__}")
    clashes = sorted(set(payload) & set(_RESERVED))
    if clashes:
        raise ValueError(f"payload keys {clashes} are reserved for the checkpoint header {list(_RESERVED)}")
    checkpoint = {"format": FORMAT, "kind": kind, "version": _package_version(), "config": config, **payload}
    _check_plain(checkpoint, "checkpoint")
    atomic_save(checkpoint, path)


def load_checkpoint(
    path: str | os.PathLike, expected_kind: str | None = None, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (header keys included).

    Tensors are loaded onto ``map_location``. Raises :class:`CheckpointError` when the file is
    missing, truncated or corrupt, not a metaoptimizer checkpoint, of a kind other than
    ``expected_kind``, or written by a newer, incompatible version of metaoptimizer.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a readable file that torch.load refuses is damaged (a truncated zip: OSError)
        if isinstance(error, pickle.UnpicklingError) and str(error).startswith("Weights only load failed"):
            raise CheckpointError(
                f"{path} is not a metaoptimizer checkpoint: it holds objects that safe loading "
                "(torch.load with weights_only=True) refuses"
            ) from error
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read ({_summary(error)})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a torch file but not a metaoptimizer checkpoint (no 'format': {FORMAT!r} marker)"
        )
    kind, version = checkpoint.get("kind"), checkpoint.get("version")
    if not isinstance(kind, str) or not isinstance(version, str):
        raise CheckpointError(f"{path} has a damaged header: kind={kind!r}, version={version!r}")
    if expected_kind is not None and kind != expected_kind:
        raise CheckpointError(f"{path} holds a {kind!r} checkpoint, expected a {expected_kind!r} checkpoint")
    try:
        newer = _compat_key(version) > _compat_key(_package_version())
    except ValueError as error:
        raise CheckpointError(f"{path} has an unreadable version: {error}") from error
    if newer:
        raise CheckpointError(
            f"{path} was written by metaoptimizer {version}, whose checkpoint format is newer than this "
            f"installation's ({_package_version()}); upgrade metaoptimizer to read it"
        )
    return checkpoint
