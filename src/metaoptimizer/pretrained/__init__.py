"""Meta-trained optimizers shipped with the package: ``load(name)`` returns a ready ``MetaOptimizer``.

Each entry has a checkpoint ``<name>.pt`` and a model card ``<name>.md`` (training command, data,
budget, seeds, results) in this folder. ``train(name, out_dir, ...)`` reproduces a checkpoint
with the recipe in :mod:`metaoptimizer.pretrained.lstm_digits_mlp`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from torch import nn

from metaoptimizer.facade import MetaOptimizer
from metaoptimizer.pretrained import lstm_digits_mlp
from metaoptimizer.progress import ProgressCallback

__all__ = ["REGISTRY", "available", "load", "path", "train"]

#: name -> (meta-training family, number of meta-steps used for the shipped checkpoint, seed)
REGISTRY: dict[str, tuple[str, int, int]] = {
    "lstm-digits-mlp": (lstm_digits_mlp.FAMILY, lstm_digits_mlp.META_STEPS, lstm_digits_mlp.SEED),
}


def available() -> list[str]:
    """Names that :func:`load` accepts."""
    return sorted(REGISTRY)


def path(name: str) -> Path:
    """Location of the shipped checkpoint for ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown pretrained optimizer {name!r}; available: {available()}")
    return Path(str(resources.files(__package__).joinpath(f"{name}.pt")))


def load(name: str, base_model: nn.Module | None = None) -> MetaOptimizer:
    """The shipped, meta-trained optimizer ``name`` bound to ``base_model`` (optional)."""
    checkpoint = path(name)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"the checkpoint for {name!r} is missing from the installation ({checkpoint}); "
            f"rebuild it with `metaopt pretrain {name} --out DIR`"
        )
    return MetaOptimizer.load(checkpoint, base_model)


def train(
    name: str, out_dir: str | Path, *, meta_steps: int | None = None, seed: int | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Meta-train ``name`` from scratch as the shipped checkpoint was (its meta-steps and seed
    unless given); returns the checkpoint path. ``progress`` hears of every meta-step."""
    if name not in REGISTRY:
        raise ValueError(f"unknown pretrained optimizer {name!r}; available: {available()}")
    _, default_steps, default_seed = REGISTRY[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta, trainer = lstm_digits_mlp.start(seed=default_seed if seed is None else seed)
    lstm_digits_mlp.meta_train(
        meta, trainer, default_steps if meta_steps is None else meta_steps, log_path=out / f"{name}.csv",
        progress=progress,
    )
    checkpoint = out / f"{name}.pt"
    meta.save(checkpoint)
    return checkpoint
