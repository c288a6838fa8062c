"""Meta-training at scale: throughput (1 vs 2 processes, vmap vs loop) and PES vs truncated BPTT.

    python benchmarks/bench_meta_training.py throughput
    python benchmarks/bench_meta_training.py compare --family quadratic --budget 90
    python benchmarks/bench_meta_training.py compare --family digits_mlp --budget 180

``throughput``: inner steps per second over the whole meta-batch (every task and, for PES, every
particle), for PES and truncated BPTT, looped and vmapped, in 1 process and in 2 processes
(gloo on loopback); every process runs one torch thread. Ratios are against the 1-process loop
measured in the same run.

``compare``: meta-trains the LSTM optimizer with truncated BPTT and with PES for the same
wall-clock budget from the same initialisation, then evaluates both (and the untrained rule) on
held-out tasks against learning-rate-tuned Adam (steps-to-target speedup,
:mod:`metaoptimizer.evaluate`), and measures each estimator's meta-gradient variance at the
initial meta-parameters over independent tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _speedups import speedups_over_tuned_adam
from metaoptimizer.evaluate.suites import heldout_suite
from metaoptimizer.meta.distributed import TorchDistributed
from metaoptimizer.meta.estimators import PES, TaskNormalization, TruncatedBPTT
from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.rules.lstm import LSTMRule
from metaoptimizer.tasks import make_family

# -- throughput -----------------------------------------------------------------------------------

THROUGHPUT_FAMILY = {"widths": 32, "depths": 1, "activations": "tanh", "n_examples": 600}
THROUGHPUT = {"tasks_per_step": 4, "unroll_steps": 10, "horizon": 10_000, "warmup": 1, "steps": 3}


def _estimator(name: str, vectorize: bool):
    return PES(sigma=0.01, num_pairs=2, vectorize=vectorize) if name == "pes" else TruncatedBPTT(vectorize=vectorize)


def _throughput_trainer(name: str, vectorize: bool, communicator=None) -> MetaTrainer:
    torch.manual_seed(0)
    return MetaTrainer(
        LSTMRule(), make_family("digits_mlp", **THROUGHPUT_FAMILY), unroll_steps=THROUGHPUT["unroll_steps"],
        run_steps=THROUGHPUT["horizon"], tasks_per_step=THROUGHPUT["tasks_per_step"],
        estimator=_estimator(name, vectorize), communicator=communicator,
    )


def _timed(trainer: MetaTrainer, barrier=lambda: None) -> float:
    """Inner steps per second over the timed meta-steps (after warm-up)."""
    trainer.train(THROUGHPUT["warmup"])
    barrier()
    started = time.perf_counter()
    results = trainer.train(THROUGHPUT["steps"])
    barrier()
    return sum(r.inner_steps for r in results) / (time.perf_counter() - started)


def _throughput_worker(rank: int, world_size: int, store: str, name: str, vectorize: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world_size), rank=rank, world_size=world_size)
    try:
        communicator = TorchDistributed()
        rate = _timed(_throughput_trainer(name, vectorize, communicator), communicator.barrier)
        if rank == 0:
            Path(out).write_text(json.dumps(rate))
    finally:
        dist.destroy_process_group()


def _two_processes(name: str, vectorize: bool) -> float:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rate.json")
        mp.spawn(_throughput_worker, args=(2, os.path.join(folder, "store"), name, vectorize, out), nprocs=2)
        return json.loads(Path(out).read_text())


def throughput(repeats: int) -> dict:
    """Best of ``repeats`` interleaved measurements of every configuration (the machine is shared)."""
    torch.set_num_threads(1)
    print(f"setup: digits MLP {THROUGHPUT_FAMILY}, LSTM 2x20, {THROUGHPUT}, PES num_pairs=2, "
          f"best of {repeats}; load average before: {os.getloadavg()}")
    table: dict[tuple, float] = {}
    configs = [(n, p, v) for n in ("pes", "tbptt") for p in (1, 2) for v in (False, True)]
    for _ in range(repeats):
        for name, processes, vectorize in configs:
            if processes == 1:
                rate = _timed(_throughput_trainer(name, vectorize))
            else:
                rate = _two_processes(name, vectorize)
            table[(name, processes, vectorize)] = max(rate, table.get((name, processes, vectorize), 0.0))
    for name in ("pes", "tbptt"):
        reference = table[(name, 1, False)]
        print(f"\n{name}: inner steps/s (ratio to 1 process, loop)")
        for processes in (1, 2):
            for vectorize in (False, True):
                rate = table[(name, processes, vectorize)]
                print(f"  {processes} process(es), {'vmap' if vectorize else 'loop'}: {rate:8.1f}  x{rate / reference:.2f}")
    print(f"load average after: {os.getloadavg()}")
    return {f"{n}/{p}proc/{'vmap' if v else 'loop'}": r for (n, p, v), r in table.items()}


# -- PES vs truncated BPTT --------------------------------------------------------------------------

COMPARE = {
    "quadratic": {"family_kwargs": {"dim": 10}, "horizon": 100, "unroll_steps": 20, "loss_range": (0.0, 500.0)},
    "digits_mlp": {"family_kwargs": {}, "horizon": 200, "unroll_steps": 20, "loss_range": (0.0, 5.0)},
}
META_LR, TASKS_PER_STEP, SIGMA, PAIRS = 1e-3, 4, 0.01, 4


def _compare_trainer(family: str, estimator, seed: int = 0, tasks_per_step: int = TASKS_PER_STEP) -> MetaTrainer:
    setup = COMPARE[family]
    torch.manual_seed(0)  # the same initial rule for every estimator
    return MetaTrainer(
        LSTMRule(), make_family(family, **setup["family_kwargs"]), meta_lr=META_LR,
        unroll_steps=setup["unroll_steps"], run_steps=setup["horizon"], tasks_per_step=tasks_per_step,
        estimator=estimator, seed=seed,
    )


def _estimators(family: str, normalize: bool = True) -> dict:
    """PES normalises its meta-losses to [0, 1] for training; the variance is measured on raw losses."""
    normalization = TaskNormalization(*COMPARE[family]["loss_range"]) if normalize else None
    return {
        "tbptt": lambda: TruncatedBPTT(vectorize=True),
        "pes": lambda: PES(sigma=SIGMA, num_pairs=PAIRS, normalization=normalization, vectorize=True),
    }


def _variance(family: str, make_estimator, replicas: int, truncations: int) -> dict:
    """Spread of one-task estimates at the initial meta-parameters over ``replicas`` tasks, each
    taken after ``truncations`` truncations of its run (so PES has accumulated perturbations)."""
    rows = []
    for replica in range(replicas):
        trainer = _compare_trainer(family, make_estimator(), seed=1000 + replica, tasks_per_step=1)
        for _ in range(truncations):
            trainer.estimator.estimate_runs(trainer.rule, trainer.runs, trainer.unroll_steps)
        rows.append(trainer.estimator.estimate_runs(trainer.rule, trainer.runs, trainer.unroll_steps).grads[0])
    grads = torch.stack(rows).double()
    mean = grads.mean(0)
    total_variance = float(((grads - mean) ** 2).sum(1).mean())
    return {
        "mean_norm": float(mean.norm()),
        "total_variance": total_variance,
        "relative_variance": total_variance / float(mean.norm() ** 2),
        "mean": mean,
    }


def compare(family: str, budget: float, num_tasks: int, seeds: tuple[int, ...], replicas: int) -> dict:
    torch.set_num_threads(1)
    setup = COMPARE[family]
    print(f"setup: {family} {setup}, LSTM 2x20, Adam meta_lr={META_LR}, tasks_per_step={TASKS_PER_STEP}, "
          f"PES sigma={SIGMA} pairs={PAIRS}, budget {budget:.0f} s per estimator, 1 torch thread; "
          f"load average before: {os.getloadavg()}")
    trained = {"untrained": _compare_trainer(family, TruncatedBPTT()).rule}
    training = {}
    for name, make_estimator in _estimators(family).items():
        trainer = _compare_trainer(family, make_estimator())
        started = time.perf_counter()
        results = []
        while time.perf_counter() - started < budget:
            results.append(trainer.step())
        seconds = time.perf_counter() - started
        tail = results[-max(1, len(results) // 10):]
        training[name] = {
            "meta_steps": len(results), "skipped": results[-1].skipped_total, "seconds": seconds,
            "inner_steps": sum(r.inner_steps for r in results),
            "final_meta_loss_mean_last_10pct": sum(r.meta_loss for r in tail) / len(tail),
        }
        trained[name] = trainer.rule
        print(f"  {name}: {training[name]}" + (" (PES meta-losses are normalised to [0, 1])" if name == "pes" else ""))
    suite = heldout_suite(family=family, family_kwargs=setup["family_kwargs"], num_tasks=num_tasks,
                          steps=setup["horizon"], seeds=seeds)
    header = f"\nheld-out speedup over tuned Adam ({num_tasks} tasks x {len(seeds)} seeds, {setup['horizon']} steps):"
    speedups = speedups_over_tuned_adam(trained, suite, header)
    variances = {
        name: _variance(family, make, replicas, truncations=2) for name, make in _estimators(family, False).items()
    }
    cosine = float(torch.nn.functional.cosine_similarity(variances["tbptt"]["mean"], variances["pes"]["mean"], dim=0))
    print(f"\nmeta-gradient spread at the initial rule over {replicas} independent one-task estimates "
          "(3rd truncation of each run):")
    for name, v in variances.items():
        print(f"  {name:6s} |mean| {v['mean_norm']:.4g}  E|g - mean|^2 {v['total_variance']:.4g}  "
              f"relative {v['relative_variance']:.3g}")
    print(f"  cosine(mean tbptt, mean pes) = {cosine:.3f}")
    print(f"load average after: {os.getloadavg()}")
    for v in variances.values():
        del v["mean"]
    return {"training": training, "speedup": speedups, "variance": variances, "cosine_of_means": cosine}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["throughput", "compare"])
    parser.add_argument("--family", choices=sorted(COMPARE), default="quadratic")
    parser.add_argument("--budget", type=float, default=60.0, help="meta-training seconds per estimator")
    parser.add_argument("--tasks", type=int, default=8, help="held-out tasks evaluated")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per held-out task")
    parser.add_argument("--replicas", type=int, default=8, help="independent estimates for the variance")
    parser.add_argument("--repeats", type=int, default=2, help="throughput: best of this many measurements")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.what == "throughput":
        figures = throughput(args.repeats)
    else:
        figures = compare(args.family, args.budget, args.tasks, tuple(range(args.seeds)), args.replicas)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
