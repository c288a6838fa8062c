"""On-disk cache of tuned baselines, so that evaluating a second optimizer on a suite does not
re-run the baselines' learning-rate searches (they are most of a suite's cost).

An entry is one baseline's :class:`~metaoptimizer.evaluate.baselines.TuningResult` on one task,
keyed by everything that determines its runs: the task's name, the baseline's name and grid, the
tuner and its trial count, the step budget, seeds, evaluation schedule, smoothing window, device
and the package version. A baseline is known by its name and grid, not by its code: give a
changed baseline (other betas, a schedule) a new name. Entries are checkpoints (atomic writes,
``weights_only`` loads); an unreadable entry is reported and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaoptimizer import __version__
from metaoptimizer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metaoptimizer.evaluate.baselines import TuningResult

KIND = "baseline_tuning"


def _curve_to_dict(curve: Any) -> dict[str, Any]:
    return {
        "train_loss": torch.from_numpy(np.asarray(curve.train_loss, dtype=np.float64)),
        "eval_steps": torch.from_numpy(np.asarray(curve.eval_steps, dtype=np.int64)),
        "eval_metrics": {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in curve.eval_metrics.items()},
        "diverged_at": curve.diverged_at,
        "seconds": float(curve.seconds),
    }


def _curve_from_dict(data: Mapping[str, Any]) -> Any:
    from metaoptimizer.evaluate.runner import Curve

    return Curve(
        data["train_loss"].numpy(), data["eval_steps"].numpy(),
        {k: v.numpy() for k, v in data["eval_metrics"].items()}, data["diverged_at"], data["seconds"],
    )


class BaselineCache:
    """Tuned baselines stored under ``directory`` (created on first write); ``hits`` and
    ``misses`` count the lookups that found, or did not find, a usable entry."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _canonical(key: Mapping[str, Any]) -> dict[str, Any]:
        """``key`` with the package version added, as it reads back from JSON (what entries store)."""
        return json.loads(json.dumps({**key, "version": __version__}, sort_keys=True, default=str))

    def path(self, key: Mapping[str, Any]) -> Path:
        """File of the entry for ``key`` (a JSON-serialisable description of the runs)."""
        digest = hashlib.sha256(json.dumps(self._canonical(key), sort_keys=True).encode()).hexdigest()[:24]
        return self.directory / f"{key['baseline']}-{digest}.pt"

    def lookup(self, key: Mapping[str, Any]) -> TuningResult | None:
        """The stored result for ``key``, or None (a warning says why when an entry exists but
        cannot be used)."""
        path = self.path(key)
        if path.is_file():
            try:
                entry = load_checkpoint(path, expected_kind=KIND)
                if entry["key"] == self._canonical(key):
                    self.hits += 1
                    return self._result(entry)
                warnings.warn(f"baseline cache entry {path} holds another key; recomputing", stacklevel=2)
            except (CheckpointError, KeyError, TypeError, AttributeError) as error:
                warnings.warn(f"unreadable baseline cache entry {path} ({error}); recomputing", stacklevel=2)
        self.misses += 1
        return None

    def store(self, key: Mapping[str, Any], result: TuningResult) -> None:
        """Write ``result`` as the entry for ``key`` (atomically)."""
        payload = {
            "key": self._canonical(key),
            "name": result.name,
            "window": result.window,
            "runs": [[float(lr), [_curve_to_dict(c) for c in curves]] for lr, curves in result.runs.items()],
        }
        save_checkpoint(self.path(key), kind=KIND, payload=payload)

    @staticmethod
    def _result(entry: Mapping[str, Any]) -> TuningResult:
        result = TuningResult(entry["name"], int(entry["window"]))
        for lr, curves in entry["runs"]:  # in the order tried, as Optuna produced them
            result.add(float(lr), [_curve_from_dict(c) for c in curves])
        return result
