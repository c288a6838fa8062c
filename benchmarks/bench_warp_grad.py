"""Warp-Grad benchmarks (issue 6's targets).

``accuracy``: few-shot N-way K-shot classification (digits split by default; Omniglot with
``--dataset omniglot --data-dir ...``). Every method meta-trains from the same seeded task learner
on the same meta-train episodes with the same budget (meta-steps, meta-batch, inner steps, inner
lr) and is scored on the same held-out meta-test episodes (query accuracy, 95% CI):

* ``maml``, ``meta_sgd``: :class:`GradientMetaLearner` (second order) on the plain learner;
* ``warp_grad``: :class:`WarpGradLearner` on the learner with warp layers (second-order
  trajectory objective at every inner step, learned initialisation);
* ``warp_grad_fo``: the same, first-order (Hessian-free) objective;
* ``warp_grad_nowarp``: the trajectory objective without warps (``preconditioning=False``);
* ``maml_warped``: second-order MAML on the warped architecture with every layer adapted (a
  capacity control: same network as Warp-Grad, no warp treatment);
* ``no_meta_training``: the plain learner's random initialisation adapted with SGD (the floor).

Target: Warp-Grad at least as accurate as Meta-SGD on 5-way 5-shot.

``memory``: one meta-step on the same meta-batch at 5, 20 and 50 inner steps for second-order
MAML and Warp-Grad on the same warped learner. Memory is the peak of bytes that autograd holds
for backward (:class:`SavedTensorMeter`) and the growth of the process's peak RSS during the step
(each configuration in a fresh process). Ratios are against MAML in the same run. Target:
Warp-Grad's meta-step memory does not grow with the number of inner steps.

Usage::

    python benchmarks/bench_warp_grad.py accuracy [--meta-steps 300] [--inner-steps 5] [--test-episodes 300]
    python benchmarks/bench_warp_grad.py memory [--inner-steps-list 5 20 50] [--repeats 2]

Both print markdown tables and write JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import torch

from metaoptimizer.evaluate.fewshot import (
    evaluate_fewshot,
    make_model,
    make_sampler,
    mean_confidence_interval,
    meta_train,
)
from metaoptimizer.meta.gradient_learner import GradientMetaLearner
from metaoptimizer.meta.warp_grad import SavedTensorMeter, WarpGradLearner
from metaoptimizer.tasks.warp_models import interleave_warps

METHODS = ("no_meta_training", "maml", "meta_sgd", "warp_grad", "warp_grad_fo", "warp_grad_nowarp", "maml_warped")
MEMORY_METHODS = ("maml", "warp_grad", "warp_grad_sampled")


def build(method: str, args: argparse.Namespace, inner_steps: int):
    """The learner of ``method`` on the seeded task learner of ``args.dataset``."""
    plain = make_model(args.dataset, args.n_way, width=args.width, seed=args.seed)
    warped = lambda: interleave_warps(  # noqa: E731
        plain, kernel_size=args.warp_kernel_size, residual=args.warp_residual, seed=args.seed
    )
    common = dict(inner_steps=inner_steps, inner_lr=args.inner_lr, meta_lr=args.meta_lr)
    if method in ("no_meta_training", "maml", "meta_sgd", "maml_warped"):
        model = warped() if method == "maml_warped" else plain
        mode = "per_parameter" if method == "meta_sgd" else "fixed"
        return GradientMetaLearner(model, lr_mode=mode, **common)
    if method == "warp_grad_nowarp":
        return WarpGradLearner(plain, seed=args.seed, **common)
    samples = 1 if method == "warp_grad_sampled" else None
    return WarpGradLearner(
        warped(), first_order=method == "warp_grad_fo", trajectory_samples=samples, seed=args.seed, **common
    )


def accuracy(args: argparse.Namespace) -> dict:
    samplers = {
        split: make_sampler(
            args.dataset, split, n_way=args.n_way, k_shot=args.k_shot, query_shots=args.query_shots,
            data_dir=args.data_dir,
        )
        for split in ("train", "test")
    }
    rows = []
    for method in args.methods:
        learner = build(method, args, args.inner_steps)
        meta_params = sum(p.numel() for p in learner.meta_parameters())
        meta_steps = 0 if method == "no_meta_training" else args.meta_steps
        start = time.perf_counter()
        history = meta_train(
            learner, samplers["train"], meta_steps=meta_steps, meta_batch_size=args.meta_batch_size, seed=args.seed
        ) if meta_steps else []
        seconds = time.perf_counter() - start
        _, values = evaluate_fewshot(learner, samplers["test"], episodes=args.test_episodes, seed=args.seed)
        mean, ci95 = mean_confidence_interval(values)
        tail = [r.meta_loss for r in history[-max(1, len(history) // 10) :]]
        rows.append({
            "method": method, "accuracy": mean, "ci95": ci95, "meta_parameters": meta_params if meta_steps else 0,
            "meta_train_seconds": seconds, "seconds_per_meta_step": seconds / max(meta_steps, 1),
            "final_meta_loss": statistics.fmean(tail) if tail else float("nan"), "skipped": learner.skipped,
        })
        print(f"{method}: {100 * mean:.2f}% ± {100 * ci95:.2f} ({seconds:.0f} s)", flush=True)
    reference = {r["method"]: r for r in rows}.get("meta_sgd")
    print(
        f"\n{args.dataset} {args.n_way}-way {args.k_shot}-shot, {args.meta_steps} meta-steps x {args.meta_batch_size} "
        f"episodes, {args.inner_steps} inner steps (lr {args.inner_lr}), {args.test_episodes} meta-test episodes\n"
    )
    print(
        "| method | meta-test accuracy (95% CI) | minus Meta-SGD (points) | meta-params | s / meta-step "
        "| final meta-loss | skipped |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        delta = f"{100 * (r['accuracy'] - reference['accuracy']):+.2f}" if reference else "n/a"
        print(
            f"| {r['method']} | {100 * r['accuracy']:.2f}% ± {100 * r['ci95']:.2f} | {delta} | {r['meta_parameters']} "
            f"| {r['seconds_per_meta_step']:.2f} | {r['final_meta_loss']:.3f} | {r['skipped']} |"
        )
    return {"setup": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}


def _measure(method: str, args: argparse.Namespace, inner_steps: int, queue) -> None:
    """One configuration in a fresh process: saved-tensor peak, RSS growth and time of a meta-step."""
    torch.set_num_threads(1)
    learner = build(method, args, inner_steps)
    sampler = make_sampler(args.dataset, "train", n_way=args.n_way, k_shot=args.k_shot, query_shots=args.query_shots,
                           data_dir=args.data_dir)
    episodes = sampler.episodes(args.meta_batch_size, args.seed)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with SavedTensorMeter() as meter:
        learner.meta_train_step(episodes)
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        learner.meta_train_step(episodes)
        times.append(time.perf_counter() - start)
    queue.put({"saved_mib": meter.peak / 2**20, "rss_growth_mib": rss_growth / 1024, "seconds": min(times)})


def memory(args: argparse.Namespace) -> dict:
    context = multiprocessing.get_context("spawn")
    rows = []
    for inner_steps in args.inner_steps_list:
        for method in MEMORY_METHODS:
            queue = context.Queue()
            process = context.Process(target=_measure, args=(method, args, inner_steps, queue))
            process.start()
            row = queue.get()
            process.join()
            rows.append({"method": method, "inner_steps": inner_steps, **row})
            print(f"{method} K={inner_steps}: {row}", flush=True)
    maml = {r["inner_steps"]: r for r in rows if r["method"] == "maml"}
    print(
        f"\n{args.dataset} {args.n_way}-way {args.k_shot}-shot, meta-batch {args.meta_batch_size}, "
        f"best of {args.repeats} timed meta-steps after one measured step\n"
    )
    print("| method | inner steps | autograd peak (MiB) | vs MAML | peak-RSS growth (MiB) | s / meta-step | vs MAML |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = maml[r["inner_steps"]]
        print(
            f"| {r['method']} | {r['inner_steps']} | {r['saved_mib']:.2f} | {r['saved_mib'] / ref['saved_mib']:.3f} "
            f"| {r['rss_growth_mib']:.1f} | {r['seconds']:.2f} | {r['seconds'] / ref['seconds']:.2f} |"
        )
    return {"setup": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("accuracy", "memory"))
    parser.add_argument("--dataset", choices=("digits", "omniglot"), default="digits")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--k-shot", type=int, default=5)
    parser.add_argument("--query-shots", type=int, default=15)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--warp-kernel-size", type=int, default=3)
    parser.add_argument("--warp-residual", action="store_true", help="residual warp layers: x + warp(x)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--meta-steps", type=int, default=300)
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-steps-list", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--inner-lr", type=float, default=0.05)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--test-episodes", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_warp_grad"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = accuracy(args) if args.part == "accuracy" else memory(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.part}_{args.dataset}{'_residual' if args.warp_residual else ''}.json"
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
