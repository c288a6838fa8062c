"""Meta-trained optimizers shipped with the package: ``load(name)`` returns a ready ``MetaOptimizer``.

Each entry has a model card ``<name>.md`` in this folder. Our own meta-trained rules ship as a
checkpoint ``<name>.pt`` beside its recipe ``<name>.toml``: a ``metaopt meta-train`` config (a
:class:`~metaoptimizer.meta.loop.TrainingConfig`) that says what was trained and how. The recipe
lives here, inside the package, so that an installed wheel can rebuild its own optimizers:
``train(name, out_dir)`` (``metaopt pretrain NAME``) runs that file through the same loop as
``metaopt meta-train`` (checkpoints, ``resume``) and writes the trained rule as ``<name>.pt``.
``celo`` and ``celo-adam`` are the published weights of Moudgil et al. (2025), shipped as
``celo_theta.npz`` / ``celo_adam_theta.npz`` (MIT, see ``LICENSE-celo-MIT.txt``) and run by
:class:`~metaoptimizer.rules.celo.CeloRule` / :class:`~metaoptimizer.rules.celo.CeloAdamRule`; both
are budget-aware and read the loss, so their torch optimizer needs ``total_steps=N`` and a loss at
every step::

    optimizer = pretrained.load("celo", model).torch_optimizer(total_steps=N)
    optimizer.step(closure)   # or optimizer.step(loss=loss) after loss.backward()
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

from torch import nn

from metaoptimizer.facade import MetaOptimizer
from metaoptimizer.meta.loop import TrainingConfig, build_trainer, run_meta_training
from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.progress import Progress, ProgressCallback
from metaoptimizer.rules.celo import CeloAdamRule, CeloRule

__all__ = ["PUBLISHED", "TRAINED", "available", "load", "path", "recipe", "recipe_path", "train", "trained_optimizer"]

#: Optimizers this project meta-trained: each ships ``<name>.pt`` made by its recipe ``<name>.toml``.
TRAINED = ("lstm-digits-mlp",)
#: name -> rule class whose ``pretrained()`` loads published weights shipped in this folder.
PUBLISHED: dict[str, type[CeloRule] | type[CeloAdamRule]] = {"celo": CeloRule, "celo-adam": CeloAdamRule}


def available() -> list[str]:
    """Names that :func:`load` accepts."""
    return sorted([*TRAINED, *PUBLISHED])


def _shipped(filename: str) -> Path:
    return Path(str(resources.files(__package__).joinpath(filename)))


def path(name: str) -> Path:
    """Location of the shipped weights for ``name`` (a checkpoint, or a published weights file)."""
    if name in PUBLISHED:
        return _shipped(PUBLISHED[name].weights_file)
    if name in TRAINED:
        return _shipped(f"{name}.pt")
    raise ValueError(f"unknown pretrained optimizer {name!r}; available: {available()}")


def recipe_path(name: str) -> Path:
    """Location of the recipe (a ``metaopt meta-train`` TOML config) that made ``name``."""
    if name in PUBLISHED:
        raise ValueError(
            f"{name!r} ships the authors' published weights (see its model card); this project does not "
            f"meta-train it. Names with a recipe: {list(TRAINED)}"
        )
    if name not in TRAINED:
        raise ValueError(f"unknown pretrained optimizer {name!r}; available: {available()}")
    return _shipped(f"{name}.toml")


def recipe(name: str) -> TrainingConfig:
    """The meta-training run that made ``name``, as :func:`train` runs it."""
    return TrainingConfig.from_toml(recipe_path(name))


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
    name: str, out_dir: str | Path, *, meta_steps: int | None = None, seed: int | None = None, resume: bool = False,
    progress: ProgressCallback | None = None,
) -> Path:
    """Meta-train ``name`` from scratch with its recipe (:func:`recipe`; its meta-steps and seed
    unless given) and return the trained rule's file, ``out_dir/<name>.pt`` (loadable by
    :func:`MetaOptimizer.load <metaoptimizer.facade.MetaOptimizer.load>` and ``metaopt eval``).

    The run is :func:`~metaoptimizer.meta.loop.run_meta_training`'s, as ``metaopt meta-train``'s:
    ``out_dir`` also gets ``checkpoint.pt`` (every ``checkpoint_every`` meta-steps) and ``log.csv``,
    and ``resume=True`` continues an interrupted run from that checkpoint bit for bit (on CPU).
    ``progress`` hears of every meta-step.
    """
    settings = recipe(name)
    if seed is not None:
        settings = dataclasses.replace(settings, optimizer=dataclasses.replace(settings.optimizer, seed=seed))
    total = settings.steps if meta_steps is None else meta_steps
    trainer = build_trainer(settings)

    def report(iteration: int, result) -> None:
        if progress is not None:
            progress(Progress("meta-training", iteration, total, f"meta-loss {result.meta_loss:.3f}"))

    out = Path(out_dir)
    run_meta_training(
        trainer, out, total, settings.checkpoint_every, resume=resume, log_csv=settings.log_csv,
        tensorboard=settings.tensorboard, config=settings.to_dict(), callback=report,
    )
    checkpoint = out / f"{name}.pt"
    trained_optimizer(trainer, settings).save(checkpoint)
    return checkpoint


def trained_optimizer(trainer: MetaTrainer, settings: TrainingConfig) -> MetaOptimizer:
    """``trainer``'s rule as a ``MetaOptimizer`` with the run's ``[optimizer]`` settings and its
    meta-step counts: what :func:`train` saves as ``<name>.pt``."""
    meta = MetaOptimizer(None, settings.optimizer, rule=trainer.rule)
    meta.meta_steps, meta.skipped_meta_steps = trainer.steps, trainer.skipped_steps
    return meta
