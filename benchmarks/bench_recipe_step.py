"""Throughput of the Celo recipe's meta-step, and where its time goes.

Builds the trainer of a recipe config (default ``configs/celo_recipe.toml``: 32 tasks of the
2,410-parameter 8x8 MLP, an antithetic pair per task plus PES's unperturbed centre, so 96 unrolled
members), runs ``--steps`` meta-steps of ``--truncation`` inner steps after one warm-up, and
reports

* inner task-steps per second: unrolled members x inner steps / time (the 64 perturbed particles
  and the 32 centres all count: each is one inner training step of one task);
* outer (meta-) steps per hour at that truncation;
* the split of the time between the inner problem (loss and gradient of the tasks, vmapped), the
  rule (its update, vmapped), and the rest (the estimator: batches, stacking, perturbations,
  PES bookkeeping, vmap set-up, the outer AdamW step).

The split is measured inside the real meta-step: the inner gradient function and the rule's
``update`` are wrapped with timers (each runs once per vmapped inner step). Times are process CPU
seconds (what one thread spends, independent of other load on the machine) and wall seconds.

``--unsynced`` also measures the same step with ``sync_runs`` off (every task its own horizon,
so each task's particles run in their own vmapped call), in the same process.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_recipe_step.py --threads 1 --unsynced
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager

import torch

from metaoptimizer.meta import _vectorized as vectorized
from metaoptimizer.meta.loop import TrainingConfig, build_trainer


class Clock:
    """Accumulates CPU and wall seconds of the calls it wraps."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu += time.process_time() - cpu
                self.wall += time.perf_counter() - wall

        return timed


@contextmanager
def timed_parts(rule, inner: Clock, update: Clock):
    """Time the vmapped inner gradient (``grad_and_value`` of the task loss) and the rule's update."""
    real_grad_and_value = vectorized.grad_and_value
    vectorized.grad_and_value = lambda fn, *a, **k: inner.wrap(real_grad_and_value(fn, *a, **k))
    rule.update = update.wrap(rule.update)
    try:
        yield
    finally:
        vectorized.grad_and_value = real_grad_and_value
        del rule.update


def measure(config_path: str, truncation: int, steps: int, device: str | None, sync: bool = True) -> dict:
    config = TrainingConfig.from_toml(config_path)
    config.optimizer.unroll_steps = truncation
    config.initial_offset = 0
    config.sync_runs = sync
    if sync:  # one long horizon: no run ends inside the measurement
        config.min_run_steps = None
        config.run_steps = truncation * (steps + 2)
    if device is not None:
        config.device = device
    trainer = build_trainer(config)
    trainer.step()  # warm-up (first-call allocations)
    inner, update = Clock(), Clock()
    task_steps = 0
    cpu, wall = time.process_time(), time.perf_counter()
    with timed_parts(trainer.rule, inner, update):
        for _ in range(steps):
            result = trainer.step()
            task_steps += result.inner_steps
    if device is not None and device.startswith("cuda"):
        torch.cuda.synchronize()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    pairs = trainer.estimator.num_pairs
    members = len(trainer.runs) * (int(trainer.estimator.centre) + 2 * pairs)
    return {
        "config": config_path,
        "device": device or "cpu",
        "sync_runs": sync,
        "threads": torch.get_num_threads(),
        "tasks": len(trainer.runs),
        "parameters_per_task": sum(p.numel() for p in trainer.runs[0].params.values()),
        "members": members,
        "perturbed_particles": len(trainer.runs) * 2 * pairs,
        "truncation": truncation,
        "meta_steps": steps,
        "task_steps": task_steps,
        "cpu_s": cpu,
        "wall_s": wall,
        "task_steps_per_cpu_s": task_steps / cpu,
        "task_steps_per_wall_s": task_steps / wall,
        "meta_steps_per_hour_cpu": 3600 * steps / cpu,
        "split_cpu": {
            "inner_problem": inner.cpu / cpu,
            "rule": update.cpu / cpu,
            "estimator_and_rest": 1 - (inner.cpu + update.cpu) / cpu,
        },
        "split_wall": {
            "inner_problem": inner.wall / wall,
            "rule": update.wall / wall,
            "estimator_and_rest": 1 - (inner.wall + update.wall) / wall,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/celo_recipe.toml")
    parser.add_argument("--truncation", type=int, default=50, help="inner steps per meta-step (the recipe's 50)")
    parser.add_argument("--steps", type=int, default=3, help="meta-steps measured after one warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None, help="e.g. cuda (default: the config's, CPU)")
    parser.add_argument("--unsynced", action="store_true", help="also measure with sync_runs off")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures = measure(args.config, args.truncation, args.steps, args.device)
    if args.unsynced:
        unsynced = measure(args.config, args.truncation, args.steps, args.device, sync=False)
        figures = {
            "synced": figures, "unsynced": unsynced,
            "speedup_of_sync": figures["task_steps_per_cpu_s"] / unsynced["task_steps_per_cpu_s"],
        }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
