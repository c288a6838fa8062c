"""Evaluation machinery: runner overhead against a plain torch.optim loop, and suite costs.

Part 1 times ``run_rule`` (functional Adam, autograd.grad, no_grad updates) against a hand-written
``torch.optim.Adam`` loop on the same digits MLP task and batches, measured in the same run, and
prints the ratio. Part 2 (``--suite``) runs a built-in suite with the hand-designed baselines only
(momentum and RMSProp at their tuned learning rates, compared with tuned Adam), writes the report
to ``--out`` and prints the wall time and the summary.

    python benchmarks/bench_evaluate.py                       # part 1 only
    python benchmarks/bench_evaluate.py --suite heldout --out runs/bench-heldout
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from metaoptimizer.evaluate.report import write_report
from metaoptimizer.evaluate.runner import run_rule, run_suite
from metaoptimizer.evaluate.suites import SUITES, make_suite
from metaoptimizer.rules.hand import Adam
from metaoptimizer.tasks import make_family


def torch_optim_seconds(task, steps: int, seed: int) -> float:
    """Wall time of the reference loop: nn.Module + torch.optim.Adam on the task's batches."""
    model = task.model_factory()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(task.init_params(seed)[name])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = task.train_batches(seed)
    started = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def runner_overhead(steps: int, repeats: int) -> None:
    task = make_family("digits_mlp").task(0, "heldout")
    torch_optim_seconds(task, 5, 0)  # warm-up (imports, allocator)
    run_rule(Adam(lr=1e-2), task, steps=5, seed=0)
    ours, reference = [], []
    for _ in range(repeats):
        reference.append(torch_optim_seconds(task, steps, 0))
        ours.append(run_rule(Adam(lr=1e-2), task, steps=steps, seed=0, eval_every=None, eval_batches=1).seconds)
    ours_ms = 1e3 * statistics.median(ours) / steps
    reference_ms = 1e3 * statistics.median(reference) / steps
    print(f"task: {task.name}")
    print(f"run_rule (functional Adam): {ours_ms:.3f} ms/step; torch.optim.Adam loop: {reference_ms:.3f} ms/step; "
          f"ratio {ours_ms / reference_ms:.2f} (median of {repeats} runs of {steps} steps, "
          f"{torch.get_num_threads()} thread(s))")


def suite_costs(name: str, out: str, overrides: dict) -> None:
    suite = make_suite(name, **overrides)
    result = run_suite(suite, {})
    files = write_report(result, out, extra={"command": "benchmarks/bench_evaluate.py", "optimizers": "baselines only"})
    runs = sum(len(t.entry.seeds) * sum(len(b.lrs) for b in t.baselines.values()) for t in result.tasks)
    print(f"suite {name}: {len(result.tasks)} tasks, {runs} runs, {result.seconds:.0f} s wall ({files.markdown})")
    for label in result.groups():
        for compared, figures in result.summary(label).items():
            s = figures["speedup"]
            print(f"  {label}: tuned {compared} vs tuned adam: speedup median {s.median:.3f}, IQM {s.iqm:.3f} "
                  f"(n={s.count}); accuracy ratio median {figures['accuracy_ratio'].median:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per timed run (part 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--suite", choices=sorted(SUITES), help="also run this suite with the baselines")
    parser.add_argument("--num-tasks", type=int)
    parser.add_argument("--suite-steps", type=int)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--out", default="runs/bench-evaluate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runner_overhead(args.steps, args.repeats)
    if args.suite:
        overrides = {"num_tasks": args.num_tasks, "steps": args.suite_steps}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if args.seeds is not None:
            overrides["seeds"] = tuple(range(args.seeds))
        suite_costs(args.suite, args.out, overrides)


if __name__ == "__main__":
    main()
