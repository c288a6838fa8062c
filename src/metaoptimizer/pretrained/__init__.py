"""Meta-trained optimizers shipped with the package: ``load(name)`` returns a ready ``MetaOptimizer``.

Each entry has a model card ``<name>.md`` in this folder. Our own meta-trained rules ship as a
checkpoint ``<name>.pt`` (training command, data, budget, seeds and results in the card), and
``train(name, out_dir, ...)`` reproduces one with the recipe in
:mod:`metaoptimizer.pretrained.lstm_digits_mlp`. ``celo`` and ``celo-adam`` are the published
weights of Moudgil et al. (2025), shipped as ``celo_theta.npz`` / ``celo_adam_theta.npz`` (MIT,
see ``LICENSE-celo-MIT.txt``) and run by :class:`~metaoptimizer.rules.celo.CeloRule` /
:class:`~metaoptimizer.rules.celo.CeloAdamRule`; both are budget-aware and read the loss, so
their torch optimizer needs ``total_steps=N`` and a loss at every step::

    optimizer = pretrained.load("celo", model).torch_optimizer(total_steps=N)
    optimizer.step(closure)   # or optimizer.step(loss=loss) after loss.backward()
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from torch import nn

from metaoptimizer.facade import MetaOptimizer
from metaoptimizer.pretrained import lstm_digits_mlp
from metaoptimizer.progress import ProgressCallback
from metaoptimizer.rules.celo import CeloAdamRule, CeloRule

__all__ = ["PUBLISHED", "REGISTRY", "available", "load", "path", "train"]

#: name -> (meta-training family, number of meta-steps used for the shipped checkpoint, seed)
REGISTRY: dict[str, tuple[str, int, int]] = {
    "lstm-digits-mlp": (lstm_digits_mlp.FAMILY, lstm_digits_mlp.META_STEPS, lstm_digits_mlp.SEED),
}
#: name -> rule class whose ``pretrained()`` loads published weights shipped in this folder.
PUBLISHED: dict[str, type[CeloRule] | type[CeloAdamRule]] = {"celo": CeloRule, "celo-adam": CeloAdamRule}


def available() -> list[str]:
    """Names that :func:`load` accepts."""
    return sorted([*REGISTRY, *PUBLISHED])


def path(name: str) -> Path:
    """Location of the shipped weights for ``name`` (a checkpoint, or a published weights file)."""
    if name in PUBLISHED:
        filename = PUBLISHED[name].weights_file
    elif name in REGISTRY:
        filename = f"{name}.pt"
    else:
        raise ValueError(f"unknown pretrained optimizer {name!r}; available: {available()}")
    return Path(str(resources.files(__package__).joinpath(filename)))


def load(name: str, base_model: nn.Module | None = None) -> MetaOptimizer:
    """The shipped, meta-trained optimizer ``name`` bound to ``base_model`` (optional)."""
    checkpoint = path(name)
    if not checkpoint.is_file():
        fix = "reinstall the package" if name in PUBLISHED else f"rebuild it with `metaopt pretrain {name} --out DIR`"
        raise FileNotFoundError(f"the weights of {name!r} are missing from the installation ({checkpoint}); {fix}")
    if name in PUBLISHED:
        return MetaOptimizer(base_model, rule=PUBLISHED[name]().load_weights(checkpoint))
    return MetaOptimizer.load(checkpoint, base_model)


def train(
    name: str, out_dir: str | Path, *, meta_steps: int | None = None, seed: int | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Meta-train ``name`` from scratch as the shipped checkpoint was (its meta-steps and seed
    unless given); returns the checkpoint path. ``progress`` hears of every meta-step."""
    if name in PUBLISHED:
        raise ValueError(
            f"{name!r} ships the authors' published weights (see its model card); this project does not "
            f"meta-train it. Names train() reproduces: {sorted(REGISTRY)}"
        )
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
