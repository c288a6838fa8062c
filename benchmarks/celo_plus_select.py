"""Pick a Celo-continuation snapshot on meta-validation: held-out tasks of its TRAINING families.

Meta-validation never touches the general suite. For each family of ``--config`` it takes
``--tasks`` held-out tasks (``tasks.HELDOUT`` seeds, which training never samples; augmentation
as configured), runs every candidate rule on each for every horizon of ``--horizons`` (the rule
told that budget, :func:`metaoptimizer.evaluate.runner.run_rule`, same initialisation and batches
for every candidate) and records the *normalised final loss*: the training loss at the end,
smoothed as the general suite smooths it (trailing mean over 5% of the budget), over the loss at
the first step, capped at 1.5 (a diverged run counts 1.5). A candidate's score is the mean over
(task, horizon); the lowest wins. Ratios of near-zero losses (small tasks that a 1000-step run
memorises) would dominate a geometric mean with noise, which is why the score averages
normalised losses instead. The candidates are published Celo (the run's step 0) and every
``RUN/snapshots/step_*.pt``; Celo itself wins when no snapshot beats it.

Losses are cached in ``--json`` per candidate, so calling it again during a run only scores the
new snapshots.

    OMP_NUM_THREADS=1 PYTHONPATH=src nice python benchmarks/celo_plus_select.py \
        --config configs/celo_plus.toml --run runs/celo_plus --json runs/celo_plus/meta_validation.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from metaoptimizer.evaluate.metrics import smooth, smoothing_window
from metaoptimizer.evaluate.runner import run_rule
from metaoptimizer.facade import MetaOptimizer
from metaoptimizer.meta.loop import TrainingConfig
from metaoptimizer.rules.celo import CeloRule
from metaoptimizer.tasks import HELDOUT, Task, make_family

REFERENCE = "celo"
#: Run seeds of meta-validation (initialisation and batch order), apart from any training seed.
RUN_SEED = 7919
#: Normalised losses are capped here; a diverged run counts this much.
CAP = 1.5


def validation_tasks(config: TrainingConfig, per_family: int) -> list[tuple[str, Task]]:
    """(label, task): the first ``per_family`` held-out tasks of every family of ``config``."""
    tasks = []
    for number, entry in enumerate(config.family_entries()):
        options = dict(entry)
        name = options.pop("name")
        options.pop("estimator", None)
        family = make_family(name, **options)
        tasks += [(f"{number}:{family.name}:heldout{i}", family.task(i, HELDOUT)) for i in range(per_family)]
    return tasks


def normalised_losses(rule, tasks: list[tuple[str, Task]], horizons: list[int]) -> dict[str, float]:
    """``label@horizon`` -> smoothed final training loss over the first step's, capped at :data:`CAP`."""
    losses = {}
    for label, task in tasks:
        for horizon in horizons:
            curve = run_rule(rule, task, steps=horizon, seed=RUN_SEED)
            if curve.diverged:
                losses[f"{label}@{horizon}"] = CAP
                continue
            final = float(smooth(curve.train_loss, smoothing_window(horizon))[-1])
            losses[f"{label}@{horizon}"] = min(CAP, final / max(float(curve.train_loss[0]), 1e-12))
    return losses


def mean_score(losses: dict[str, float], keys: list[str] | None = None) -> float:
    """Mean normalised loss over ``keys`` (all by default)."""
    chosen = list(losses) if keys is None else keys
    if not chosen:
        raise ValueError("no (task, horizon) runs to score")
    return sum(losses[key] for key in chosen) / len(chosen)


def select(scores: dict[str, float]) -> str:
    """The candidate with the lowest score (the earliest, in insertion order, on ties)."""
    if not scores:
        raise ValueError("no candidates to select from")
    return min(scores, key=lambda name: (scores[name], list(scores).index(name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/celo_plus.toml")
    parser.add_argument("--run", default="runs/celo_plus", help="meta-training folder with snapshots/")
    parser.add_argument("--tasks", type=int, default=1, help="held-out tasks per family")
    parser.add_argument("--horizons", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--json", default=None, help="score cache and result (default RUN/meta_validation.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.json or Path(args.run) / "meta_validation.json")
    setup = {"config": args.config, "tasks": args.tasks, "horizons": args.horizons, "score": "normalised_final"}
    cache = json.loads(out.read_text()) if out.exists() else {}
    if cache.get("setup") != setup:
        cache = {"setup": setup, "losses": {}}
    tasks = validation_tasks(TrainingConfig.from_toml(args.config), args.tasks)
    candidates = {REFERENCE: None, **{p.stem: p for p in sorted((Path(args.run) / "snapshots").glob("step_*.pt"))}}
    for name, path in candidates.items():
        if name in cache["losses"]:
            continue
        started = time.perf_counter()
        rule = CeloRule.pretrained() if path is None else MetaOptimizer.load(path).rule
        cache["losses"][name] = normalised_losses(rule, tasks, args.horizons)
        print(f"scored {name} in {time.perf_counter() - started:.0f} s", flush=True)
        out.write_text(json.dumps(cache, indent=1))
    scores = {name: mean_score(cache["losses"][name]) for name in candidates}
    by_horizon = {
        name: {h: mean_score(cache["losses"][name], [k for k in cache["losses"][name] if k.endswith(f"@{h}")])
               for h in args.horizons}
        for name in candidates
    }
    best = select(scores)
    cache["scores"], cache["scores_by_horizon"], cache["best"] = scores, by_horizon, best
    out.write_text(json.dumps(cache, indent=1))
    print(f"{'candidate':>12}  score  " + "  ".join(f"@{h}" for h in args.horizons))
    for name, score in scores.items():
        per = "  ".join(f"{by_horizon[name][h]:.4f}" for h in args.horizons)
        print(f"{name:>12}  {score:.4f}  {per}" + ("  <- best" if name == best else ""))
    print(f"selected: {best} ({'published Celo' if best == REFERENCE else candidates[best]})")


if __name__ == "__main__":
    main()
