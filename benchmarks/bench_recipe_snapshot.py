"""A recipe run's snapshot on held-out tasks of its own families, beside its initialisation and Adam.

Loads the rule from a meta-training checkpoint (``runs/celo_recipe/checkpoint.pt`` by default),
rebuilds the same rule freshly initialised (the run's step 0, with the first phase's ``init``
applied) and runs both, plus Adam at lr 1e-3, for ``--steps`` inner steps (the rule told that
budget) on ``--tasks`` held-out tasks of each family of the config (augmentation included, so
parameters come in all scales). Reports the mean final training loss (on the last minibatch
averaged over the last 10 steps) per family and optimizer. This is a sanity check of a snapshot
on the training distribution, not the general suite.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_recipe_snapshot.py --tasks 3 --steps 300
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from metaoptimizer.checkpoint import load_checkpoint
from metaoptimizer.meta.loop import TrainingConfig, build_config_rule
from metaoptimizer.rules import Adam
from metaoptimizer.rules.base import apply_updates
from metaoptimizer.tasks import HELDOUT, make_family


def final_loss(rule, task, seed: int, steps: int) -> float:
    """Mean training loss over the last 10 of ``steps`` updates of ``rule`` on ``task``."""
    params = task.init_params(seed)
    state = rule.init(params, num_steps=steps)
    batches = task.train_batches(seed)
    tail = []
    with torch.no_grad():
        for step in range(steps):
            batch = next(batches)
            with torch.enable_grad():
                leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
                loss = task.loss(leaves, batch)
                grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
            if not math.isfinite(float(loss)):
                return math.inf
            updates, state = rule.update(grads, state, params, loss=loss.detach())
            params = apply_updates(params, updates)
            if step >= steps - 10:
                tail.append(float(loss))
    return sum(tail) / len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/celo_recipe.toml")
    parser.add_argument("--checkpoint", default="runs/celo_recipe/checkpoint.pt")
    parser.add_argument("--tasks", type=int, default=3, help="held-out tasks per family")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = TrainingConfig.from_toml(args.config)
    checkpoint = load_checkpoint(args.checkpoint, expected_kind="meta_training")
    torch.manual_seed(config.optimizer.seed)
    initial = build_config_rule(config)
    with torch.no_grad():
        named = dict(initial.named_parameters())
        for name, value in (config.phases[0].get("init", {}) if config.phases else {}).items():
            named[name].fill_(value)
    trained = build_config_rule(config)
    trained.load_state_dict(checkpoint["trainer"]["rule"])
    optimizers = {"initial rule": initial, f"snapshot (meta-step {checkpoint['iteration']})": trained,
                  "Adam lr 1e-3": Adam(lr=1e-3)}
    results: dict[str, dict[str, float]] = {}
    for entry in config.family_entries():
        options = dict(entry)
        name = options.pop("name")
        options.pop("estimator", None)
        family = make_family(name, **options)
        for label, rule in optimizers.items():
            losses = [final_loss(rule, family.task(i, HELDOUT), 1000 + i, args.steps) for i in range(args.tasks)]
            results.setdefault(name, {})[label] = sum(losses) / len(losses)
    print(f"mean final training loss, {args.tasks} held-out tasks per family, {args.steps} steps")
    labels = list(optimizers)
    print("family".ljust(16) + "".join(label.rjust(28) for label in labels))
    for name, row in results.items():
        print(name.ljust(16) + "".join(f"{row[label]:28.4f}" for label in labels))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "iteration": checkpoint["iteration"], "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
