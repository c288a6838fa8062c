"""Pick a Celo-continuation snapshot on meta-validation: held-out tasks of its TRAINING families.

Meta-validation never touches the general suite. For each family of ``--config`` it takes
``--tasks`` held-out tasks (``tasks.HELDOUT`` seeds, which training never samples; augmentation
as configured), runs every candidate rule on each for every horizon of ``--horizons`` (the rule
told that budget), and records the final training loss (mean of the last 10 minibatch losses,
``bench_recipe_snapshot.final_loss``). A candidate's score is the geometric mean over (task,
horizon) of its final loss over published Celo's on the same run (same initialisation and
batches): below 1 is better than Celo. The candidates are published Celo (the run's step 0) and
every ``RUN/snapshots/step_*.pt``; the lowest score wins (Celo itself when no snapshot beats it).

Scores are cached in ``--json`` per candidate, so calling it again during a run only scores the
new snapshots.

    OMP_NUM_THREADS=1 PYTHONPATH=src nice python benchmarks/celo_plus_select.py \
        --config configs/celo_plus.toml --run runs/celo_plus --json runs/celo_plus/meta_validation.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from bench_recipe_snapshot import final_loss

from metaoptimizer.facade import MetaOptimizer
from metaoptimizer.meta.loop import TrainingConfig
from metaoptimizer.rules.celo import CeloRule
from metaoptimizer.tasks import HELDOUT, Task, make_family

REFERENCE = "celo"
#: Run seeds of meta-validation (initialisation and batch order), apart from any training seed.
RUN_SEED = 7919


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


def final_losses(rule, tasks: list[tuple[str, Task]], horizons: list[int]) -> dict[str, float]:
    """``label@horizon`` -> final training loss of ``rule`` (inf when the run diverged)."""
    return {f"{label}@{h}": final_loss(rule, task, RUN_SEED, h) for label, task in tasks for h in horizons}


def relative_score(losses: dict[str, float], reference: dict[str, float]) -> float:
    """Geometric mean of ``losses / reference`` over their shared keys; inf if a run diverged."""
    if set(losses) != set(reference) or not losses:
        raise ValueError("a candidate and the reference must be scored on the same (task, horizon) runs")
    logs = []
    for key, value in losses.items():
        if not math.isfinite(value):
            return math.inf
        logs.append(math.log(max(value, 1e-12) / max(reference[key], 1e-12)))
    return math.exp(sum(logs) / len(logs))


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
    setup = {"config": args.config, "tasks": args.tasks, "horizons": args.horizons}
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
        cache["losses"][name] = final_losses(rule, tasks, args.horizons)
        print(f"scored {name} in {time.perf_counter() - started:.0f} s", flush=True)
        out.write_text(json.dumps(cache, indent=1))
    reference = cache["losses"][REFERENCE]
    scores = {name: relative_score(cache["losses"][name], reference) for name in candidates}
    best = select(scores)
    cache["scores"], cache["best"] = scores, best
    out.write_text(json.dumps(cache, indent=1))
    for name, score in scores.items():
        print(f"{name:>12}  {score:.4f}" + ("  <- best" if name == best else ""))
    print(f"selected: {best} ({'published Celo' if best == REFERENCE else candidates[best]})")


if __name__ == "__main__":
    main()
