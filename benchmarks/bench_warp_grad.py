"""Warp-Grad benchmarks (issues 6 and 14).

``accuracy``: few-shot N-way K-shot classification (digits split by default; Omniglot with
``--dataset omniglot --data-dir ...``). Every method meta-trains from the same seeded task learner
on the same meta-train episodes with the same budget (meta-steps x meta-batch) and is scored on
the same held-out meta-test episodes (query accuracy, 95% CI, and the paired difference against
``--reference`` on those episodes):

* ``meta_sgd`` (per-parameter rates, initialised to ``--inner-lr``), ``maml_layer_lr`` (one
  learned rate per tensor), ``maml_scalar_lr`` (one learned rate), ``maml`` (fixed rate):
  :class:`GradientMetaLearner`, second order unless ``--baseline-first-order``,
  ``--baseline-inner-steps`` inner steps;
* ``warp_grad``: :class:`WarpGradLearner` on the learner with identity-initialised warp layers
  (second-order trajectory objective, learned initialisation, ``--inner-steps`` inner steps,
  ``--trajectory-samples`` points per trajectory, ``--points-per-update`` points per meta-update);
* ablations of ``warp_grad``: ``warp_grad_random_init`` (warps at PyTorch's default
  initialisation, the first version), ``warp_grad_fo`` (first-order objective),
  ``warp_grad_nowarp`` (the trajectory objective without warps), ``warp_grad_fixed_init``
  (warps only, the initialisation not meta-learned);
* ``maml_warped``, ``meta_sgd_warped``: MAML / Meta-SGD on the warped architecture with every
  layer adapted (capacity controls: Warp-Grad's network without its warp treatment);
* ``no_meta_training``: the plain learner's random initialisation adapted with SGD (the floor).

Scores are taken at every meta-step count in ``--eval-at`` (default: the end); with
``--time-limit`` a method skips the milestones that its pace so far says it would reach after
that many seconds of meta-training, so that runs on a machine of unknown speed still compare
methods at equal budgets (the milestones that all of them reached).
``--jobs`` runs methods in parallel processes (one torch thread each).

``memory``: one meta-step on the same meta-batch at 5, 20 and 50 inner steps for second-order
MAML and Warp-Grad on the same warped learner. Memory is the peak of bytes that autograd holds
for backward (:class:`SavedTensorMeter`) and the growth of the process's peak RSS during the step
(each configuration in a fresh process). Ratios are against MAML in the same run. Target:
Warp-Grad's meta-step memory does not grow with the number of inner steps.

Usage::

    python benchmarks/bench_warp_grad.py accuracy [--k-shot 1] [--meta-steps 300] [--test-episodes 600]
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from metaoptimizer.evaluate.fewshot import fewshot_score, make_model, make_sampler, mean_confidence_interval
from metaoptimizer.meta.gradient_learner import GradientMetaLearner
from metaoptimizer.meta.warp_grad import SavedTensorMeter, WarpGradLearner
from metaoptimizer.tasks.warp_models import interleave_warps

WARP_VARIANTS = {
    "warp_grad": {},
    "warp_grad_random_init": {"init": "random"},
    "warp_grad_fo": {"first_order": True},
    "warp_grad_nowarp": {"warps": False},
    "warp_grad_fixed_init": {"learn_init": False},
}
#: GradientMetaLearner baselines -> lr_mode; the ``_warped`` ones run on Warp-Grad's warped
#: architecture with every layer adapted (capacity controls).
BASELINES = {
    "no_meta_training": "fixed", "maml": "fixed", "maml_scalar_lr": "scalar", "maml_layer_lr": "per_tensor",
    "meta_sgd": "per_parameter", "maml_warped": "fixed", "meta_sgd_warped": "per_parameter",
}
METHODS = (*BASELINES, *WARP_VARIANTS)
MEMORY_METHODS = ("maml", "warp_grad", "warp_grad_sampled")


def build(method: str, args: argparse.Namespace, inner_steps: int):
    """The learner of ``method`` on the seeded task learner of ``args.dataset``."""
    plain = make_model(args.dataset, args.n_way, width=args.width, seed=args.seed).to(args.device)
    variant = dict(WARP_VARIANTS.get(method, {}))
    init = variant.pop("init", "identity")
    warped = lambda: interleave_warps(  # noqa: E731
        plain, kernel_size=args.warp_kernel_size, activation=args.warp_activation, residual=args.warp_residual,
        init=init, seed=args.seed if init == "random" else None,
    ).to(args.device)
    if method in BASELINES:
        model = warped() if method.endswith("_warped") else plain
        steps = args.baseline_inner_steps or inner_steps
        return GradientMetaLearner(
            model, lr_mode=BASELINES[method], inner_steps=steps, inner_lr=args.inner_lr, meta_lr=args.meta_lr,
            first_order=args.baseline_first_order,
        )
    samples = 1 if method == "warp_grad_sampled" else args.trajectory_samples
    model = warped() if variant.pop("warps", True) else plain
    return WarpGradLearner(
        model, inner_steps=inner_steps, inner_lr=args.warp_inner_lr or args.inner_lr, meta_lr=args.meta_lr,
        trajectory_samples=samples, points_per_update=args.points_per_update, seed=args.seed, **variant,
    )


def _samplers(args: argparse.Namespace) -> dict:
    return {
        split: make_sampler(
            args.dataset, split, n_way=args.n_way, k_shot=args.k_shot, query_shots=args.query_shots,
            data_dir=args.data_dir, device=args.device,
        )
        for split in ("train", "test")
    }


def run_accuracy(method: str, args: argparse.Namespace) -> dict:
    """Meta-train ``method`` and score it at each milestone of ``args.eval_at``."""
    torch.set_num_threads(1)
    samplers = _samplers(args)
    learner = build(method, args, args.inner_steps)
    meta_params = sum(p.numel() for p in learner.meta_parameters())
    milestones = [0] if method == "no_meta_training" else sorted(args.eval_at or [args.meta_steps])
    batches = samplers["train"].batches(args.meta_batch_size, args.seed)
    rows, losses, seconds, done = [], [], 0.0, 0
    for milestone in milestones:
        if args.time_limit and done and seconds * milestone / done > args.time_limit:
            break  # this milestone would end past the time limit at the pace so far
        start = time.perf_counter()
        while done < milestone:
            losses.append(learner.meta_train_step(next(batches)).meta_loss)
            done += 1
        seconds += time.perf_counter() - start
        score = fewshot_score(learner, samplers["test"], episodes=args.test_episodes, seed=args.seed)
        tail = losses[-max(1, len(losses) // 10) :]
        rows.append({
            "method": method, "meta_steps": milestone, "accuracy": score.mean, "ci95": score.ci95,
            "values": score.values, "meta_parameters": meta_params if milestone else 0,
            "meta_updates": getattr(learner, "steps", 0), "meta_train_seconds": seconds,
            "seconds_per_meta_step": seconds / max(milestone, 1),
            "final_meta_loss": statistics.fmean(tail) if tail else float("nan"), "skipped": learner.skipped,
        })
        print(f"{method} @ {milestone}: {100 * score.mean:.2f}% ± {100 * score.ci95:.2f} ({seconds:.0f} s)", flush=True)
    return {"method": method, "rows": rows}


def accuracy(args: argparse.Namespace) -> dict:
    if args.jobs == 1:
        runs = [run_accuracy(m, args) for m in args.methods]
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(run_accuracy, args.methods, [args] * len(args.methods)))
    by_step: dict[int, dict[str, dict]] = {}
    for run in runs:
        for row in run["rows"]:
            by_step.setdefault(row["meta_steps"], {})[row["method"]] = row
    floor = by_step.pop(0, {})
    trained = [m for m in args.methods if m != "no_meta_training"]
    print(
        f"\n{args.dataset} {args.n_way}-way {args.k_shot}-shot, meta-batch {args.meta_batch_size}, warp_grad "
        f"{args.inner_steps} inner steps (lr {args.warp_inner_lr or args.inner_lr}), baselines "
        f"{args.baseline_inner_steps or args.inner_steps} (lr {args.inner_lr}), {args.test_episodes} meta-test episodes, "
        f"device {args.device}\n"
    )
    print(
        f"| meta-steps | method | meta-test accuracy (95% CI) | paired difference vs {args.reference} (points) "
        "| meta-params | s / meta-step | final meta-loss | skipped |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for step in sorted(by_step):
        rows = by_step[step]
        if not all(m in rows for m in trained):
            print(f"| {step} | (not reached by {sorted(set(trained) - set(rows))}) | | | | | | |")
            continue
        for method in args.methods:
            row = floor.get(method) or rows[method]
            reference = rows.get(args.reference)
            diff = "–"
            if reference is not None and method != args.reference:
                d, ci = mean_confidence_interval([a - b for a, b in zip(row["values"], reference["values"])])
                diff = f"{100 * d:+.2f} ± {100 * ci:.2f}"
            print(
                f"| {step} | {method} | {100 * row['accuracy']:.2f}% ± {100 * row['ci95']:.2f} | {diff} "
                f"| {row['meta_parameters']} | {row['seconds_per_meta_step']:.2f} | {row['final_meta_loss']:.3f} "
                f"| {row['skipped']} |"
            )
    return {"setup": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": runs}


def _measure(method: str, args: argparse.Namespace, inner_steps: int, queue) -> None:
    """One configuration in a fresh process: saved-tensor peak, RSS growth and time of a meta-step."""
    torch.set_num_threads(1)
    learner = build(method, args, inner_steps)
    sampler = _samplers(args)["train"]
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
    parser.add_argument("--warp-activation", action="store_true", help="a ReLU after each warp layer")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--meta-steps", type=int, default=300)
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-steps-list", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--inner-lr", type=float, default=0.05, help="baselines' inner lr (initial rate of Meta-SGD)")
    parser.add_argument("--warp-inner-lr", type=float, default=None, help="Warp-Grad's inner lr (default --inner-lr)")
    parser.add_argument("--baseline-inner-steps", type=int, default=None, help="default --inner-steps")
    parser.add_argument("--baseline-first-order", action="store_true", help="first-order baselines")
    parser.add_argument("--trajectory-samples", type=int, default=None, help="points per trajectory (None: all)")
    parser.add_argument("--points-per-update", type=int, default=None, help="buffered points per meta-update")
    parser.add_argument("--eval-at", type=int, nargs="+", default=None, help="meta-step milestones to score")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds of meta-training per method")
    parser.add_argument("--reference", default="meta_sgd")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="methods run in parallel processes")
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--test-episodes", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_warp_grad"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = accuracy(args) if args.part == "accuracy" else memory(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.part}_{args.dataset}_{args.n_way}way{args.k_shot}shot.json"
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
