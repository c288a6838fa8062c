"""Few-shot benchmarks of issue 4: Meta-SGD (per-parameter rates) against the same model with one
learned scalar rate (and plain MAML), same initial model, same episodes, same meta-training budget.

  classification (digits split, or Omniglot from a folder), 5-way 1-shot by default:
    python benchmarks/bench_fewshot.py digits --meta-steps 1500 --out docs/results/fewshot_digits
    python benchmarks/bench_fewshot.py omniglot --data-dir /work/shared/data --width 32 --meta-steps 500
  sinusoid regression, 5/10/20-shot MSE next to the Meta-SGD paper's Table 1:
    python benchmarks/bench_fewshot.py sinusoid --shots 5 10 20 --meta-steps 10000

Each run prints per-method scores with 95% CIs over the meta-test episodes, the paired
difference of Meta-SGD against the reference method on the same episodes, and the meta-step time
ratio measured in the same run; it writes the report (markdown, JSON, PNG) under --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from metaoptimizer.evaluate.fewshot import (
    METHODS,
    FewShotResult,
    make_sampler,
    mean_confidence_interval,
    run_method,
    write_report,
)
from metaoptimizer.tasks.episodes import SinusoidSampler

#: Li et al. 2017 (Meta-SGD), Table 1: sinusoid MSE after one step, mean and 95% CI.
PAPER_SINUSOID = {
    "maml": {5: (1.13, 0.18), 10: (0.85, 0.14), 20: (0.71, 0.12)},
    "meta_sgd": {5: (0.90, 0.16), 10: (0.53, 0.09), 20: (0.31, 0.05)},
}


def paired_difference(first: FewShotResult, second: FewShotResult) -> tuple[float, float]:
    """Mean and 95% CI of ``first - second`` over the same meta-test episodes."""
    return mean_confidence_interval([a - b for a, b in zip(first.values, second.values)])


def print_comparison(results: list[FewShotResult], reference: str, scale: float, unit: str) -> dict[str, object]:
    by_method = {r.method: r for r in results}
    base = by_method[reference]
    base_time = base.meta_train_seconds / max(base.meta_steps + base.skipped_steps, 1)
    summary: dict[str, object] = {}
    for r in results:
        step_time = r.meta_train_seconds / max(r.meta_steps + r.skipped_steps, 1)
        line = f"{r.method:>15}: {scale * r.mean:8.3f} ± {scale * r.ci95:.3f} {unit}"
        line += f"  meta-step {1e3 * step_time:7.1f} ms"
        line += f" ({step_time / base_time:.2f}x {reference})"
        if r.method != reference:
            diff, ci = paired_difference(r, base)
            line += f"  paired difference vs {reference}: {scale * diff:+.3f} ± {scale * ci:.3f} {unit}"
            summary[f"{r.method}-{reference}"] = (scale * diff, scale * ci)
        print(line, flush=True)
    return summary


def _run(job: tuple) -> FewShotResult:
    method, dataset, train, test, options, threads = job
    torch.set_num_threads(threads)
    result = run_method(method, dataset, train, test, **options)
    print(f"done {method}: {result.metric} {result.mean:.4f} after {result.meta_train_seconds:.0f} s", flush=True)
    return result


def run_methods(args: argparse.Namespace, jobs: list[tuple]) -> list[FewShotResult]:
    """``run_method`` for each job, in ``args.jobs`` worker processes (results are identical to a
    sequential run: every method is seeded and single-process deterministic)."""
    jobs = [(*job, args.threads) for job in jobs]
    if args.jobs == 1:
        return [_run(job) for job in jobs]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_run, jobs))


def classification(args: argparse.Namespace) -> None:
    samplers = {
        split: make_sampler(
            args.dataset, split, n_way=args.n_way, k_shot=args.k_shot, query_shots=args.query_shots,
            data_dir=args.data_dir,
        )
        for split in ("train", "test")
    }
    options = dict(
        n_way=args.n_way, width=args.width, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
        first_order=args.first_order, meta_lr=args.meta_lr, meta_steps=args.meta_steps,
        meta_batch_size=args.meta_batch_size, test_episodes=args.test_episodes,
        test_inner_steps=args.test_inner_steps, seed=args.seed,
    )
    jobs = [(method, args.dataset, samplers["train"], samplers["test"], options) for method in args.methods]
    results = run_methods(args, jobs)
    summary = print_comparison(results, args.reference, 100.0, "points")
    setup = common_setup(args) | {
        "episodes": f"{args.n_way}-way {args.k_shot}-shot", "query per class": args.query_shots
    }
    write_report(results, args.out, title=f"Few-shot {args.dataset} {args.n_way}-way {args.k_shot}-shot", setup=setup)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))


def sinusoid(args: argparse.Namespace) -> None:
    table = []
    for shots in args.shots:
        train = SinusoidSampler(shots, shots, "train")
        test = SinusoidSampler(shots, args.test_query, "test")
        options = dict(
            inner_steps=args.inner_steps, inner_lr=args.inner_lr, first_order=args.first_order,
            meta_lr=args.meta_lr, meta_steps=args.meta_steps, meta_batch_size=args.meta_batch_size,
            test_episodes=args.test_episodes, test_inner_steps=args.test_inner_steps, seed=args.seed,
        )
        results = run_methods(args, [(method, "sinusoid", train, test, options) for method in args.methods])
        print(f"-- {shots}-shot sinusoid (MSE over {args.test_episodes} test tasks, {args.test_query} points each)")
        print_comparison(results, args.reference, 1.0, "MSE")
        for r in results:
            paper = PAPER_SINUSOID.get(r.method, {}).get(shots)
            table.append((shots, r.method, r.mean, r.ci95, paper))
        write_report(results, Path(args.out) / f"{shots}shot", title=f"Sinusoid {shots}-shot", setup=common_setup(args))
    print("\n| K | method | our MSE (95% CI) | paper MSE (95% CI) |\n|---|---|---|---|")
    for shots, method, mean, ci, paper in table:
        reported = f"{paper[0]:.2f} ± {paper[1]:.2f}" if paper else "-"
        print(f"| {shots} | {method} | {mean:.3f} ± {ci:.3f} | {reported} |")


def common_setup(args: argparse.Namespace) -> dict[str, object]:
    return {
        "dataset": args.dataset, "inner steps": args.inner_steps,
        "test inner steps": args.test_inner_steps or args.inner_steps,
        "inner lr (init)": args.inner_lr, "first order": args.first_order, "meta lr": args.meta_lr,
        "meta-steps": args.meta_steps, "meta-batch": args.meta_batch_size, "test episodes": args.test_episodes,
        "width": args.width or "default", "seed": args.seed, "torch threads per method": args.threads,
        "parallel jobs": args.jobs,
        "machine": f"{platform.machine()}, torch {torch.__version__}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("digits", "omniglot", "sinusoid"))
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=None)
    parser.add_argument("--reference", default=None, help="method the others are compared against")
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--query-shots", type=int, default=15)
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10, 20], help="sinusoid support sizes")
    parser.add_argument("--test-query", type=int, default=100, help="sinusoid query points per test task")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--test-inner-steps", type=int, default=None)
    parser.add_argument("--inner-lr", type=float, default=None, help="default 0.4 (images), 0.01 (sinusoid)")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--meta-steps", type=int, default=1500)
    parser.add_argument("--meta-batch-size", type=int, default=None, help="default 8 (images), 4 (sinusoid)")
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per method (the machine is shared)")
    parser.add_argument("--jobs", type=int, default=1, help="methods meta-trained in parallel processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fewshot-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    regression = args.dataset == "sinusoid"
    args.methods = args.methods or (["maml", "meta_sgd"] if regression else ["maml_scalar_lr", "meta_sgd"])
    args.reference = args.reference or args.methods[0]
    if args.reference not in args.methods:
        parser.error(f"--reference {args.reference} must be one of --methods {args.methods}")
    args.inner_lr = args.inner_lr or (0.01 if regression else 0.4)
    args.meta_batch_size = args.meta_batch_size or (4 if regression else 8)
    start = time.perf_counter()
    (sinusoid if regression else classification)(args)
    print(f"total wall time {time.perf_counter() - start:.0f} s ({args.jobs} job(s) x {args.threads} torch thread(s))")


if __name__ == "__main__":
    main()
