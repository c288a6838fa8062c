"""Learning-rate adaptation on held-out digits-MLP tasks (issue 7's targets).

``hypergradient``: HypergradientAdam started from lr 1e-4, 1e-3 and 1e-2 against Adam with its lr
tuned on a log grid, by final training loss (seed mean of the smoothed curves, the evaluation
module's smoothing). Target: within a factor 2 of tuned Adam from every start. The hypergradient
step size ``beta`` is chosen on *training* tasks first (the lowest geometric-mean final loss over
the three starts), then frozen for the held-out tasks. Both optimizers run through the same
``torch.optim`` loop, paired: same initialisation and batches per seed.

``schedule``: a :class:`LearnedSchedule` on Adam, meta-trained with ``MetaTrainer`` on training
tasks (by default second order, through whole 200-step runs, on the mean log training loss),
against Adam with a tuned constant lr, tuned cosine decay and tuned linear warmup (10%) plus
cosine, by the evaluation module's steps-to-target speedup (``run_suite``; each baseline's lr
is tuned per held-out task, which favours the baselines). The learned schedule's base lr is
constant Adam's best lr on training tasks; meta-training learns the curve.

Usage::

    python benchmarks/bench_lr_adaptation.py hypergradient [--tasks 6] [--steps 200] [--seeds 0 1 2]
    python benchmarks/bench_lr_adaptation.py schedule [--tasks 6] [--steps 200] [--meta-steps 40] [--unroll 200]

Each prints markdown tables (ratios against the reference measured in the same run); ``--out``
also writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from metaoptimizer.config import META_OBJECTIVES
from metaoptimizer.evaluate import Baseline, compare, log_grid, run_suite, summarize, tune_lr
from metaoptimizer.evaluate.metrics import seed_mean, smoothing_window
from metaoptimizer.evaluate.runner import run_seeds
from metaoptimizer.evaluate.suites import heldout_suite
from metaoptimizer.hypergradient import HypergradientAdam
from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.rules.hand import Adam
from metaoptimizer.rules import named_chain, scale_by_schedule
from metaoptimizer.schedules import CosineDecay, LearnedSchedule, warmup_cosine
from metaoptimizer.tasks import TRAIN, make_family
from metaoptimizer.tasks.base import HELDOUT, Task

FAMILY = "digits_mlp"
ADAM_GRID = log_grid(1e-4, 10**-0.5)
HD_STARTS = (1e-4, 1e-3, 1e-2)  # all on ADAM_GRID, so constant Adam at each start is measured too
BETA_GRID = (1e-5, 1e-4, 1e-3, 1e-2)


def torch_optimizer_losses(task: Task, make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                           steps: int, seed: int) -> tuple[np.ndarray, float]:
    """Training loss per step of a ``torch.optim`` optimizer on ``task`` from ``init_params(seed)``
    with the batch stream of ``seed`` (the evaluation runner's pairing), and the final group lr."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in task.init_params(seed).items()}
    optimizer = make_optimizer(list(params.values()))
    batches = task.train_batches(seed)
    losses = np.full(steps, np.inf)
    for step in range(steps):
        optimizer.zero_grad()
        loss = task.loss(params, next(batches))
        if not torch.isfinite(loss):
            break
        loss.backward()
        optimizer.step()
        losses[step] = float(loss.detach())
    return losses, float(optimizer.param_groups[0]["lr"])


def final_loss(curves: Sequence[np.ndarray], steps: int) -> float:
    """Seed mean of the smoothed curves at the last step (``+inf`` if any seed diverged)."""
    return float(seed_mean(curves, smoothing_window(steps))[-1])


def run_config(task, make_optimizer, steps, seeds) -> tuple[float, float]:
    """(final loss, mean final lr) over ``seeds``."""
    runs = [torch_optimizer_losses(task, make_optimizer, steps, s) for s in seeds]
    return final_loss([r[0] for r in runs], steps), float(np.mean([r[1] for r in runs]))


def hd_adam(start: float, beta: float) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    return lambda params: HypergradientAdam(params, lr=start, hypergrad_lr=beta)


def choose_beta(family, steps: int, seeds: Sequence[int], num_tasks: int) -> tuple[float, dict[str, float]]:
    """The beta with the lowest geometric-mean final loss over the starts, on training tasks."""
    scores = {}
    for beta in BETA_GRID:
        logs = [
            math.log(run_config(family.task(i, TRAIN), hd_adam(start, beta), steps, seeds)[0])
            for i in range(num_tasks)
            for start in HD_STARTS
        ]
        scores[beta] = math.exp(float(np.mean(logs)))
    return min(scores, key=scores.get), {f"{b:g}": v for b, v in scores.items()}


def bench_hypergradient(args: argparse.Namespace) -> dict:
    family = make_family(FAMILY)
    started = time.perf_counter()
    beta, beta_scores = choose_beta(family, args.steps, args.seeds, args.beta_tasks)
    print(f"beta chosen on {args.beta_tasks} training tasks: {beta:g}  (geometric-mean final loss per beta: {beta_scores})")
    rows = []
    for index in range(args.tasks):
        task = family.task(index, HELDOUT)
        adam = {lr: run_config(task, lambda p, lr=lr: torch.optim.Adam(p, lr=lr), args.steps, args.seeds)[0]
                for lr in ADAM_GRID}
        best_lr = min(adam, key=adam.get)
        row = {"task": task.name, "tuned_lr": best_lr, "tuned_loss": adam[best_lr], "hd": {}}
        for start in HD_STARTS:
            loss, lr_end = run_config(task, hd_adam(start, beta), args.steps, args.seeds)
            constant = next(value for lr, value in adam.items() if math.isclose(lr, start))
            row["hd"][f"{start:g}"] = {"loss": loss, "ratio": loss / adam[best_lr], "final_lr": lr_end,
                                       "constant_adam_loss": constant}
        rows.append(row)
        print(f"  {task.name}: tuned lr {best_lr:.3g} -> {adam[best_lr]:.4f}; "
              + ", ".join(f"HD from {s}: x{row['hd'][s]['ratio']:.2f} (lr {row['hd'][s]['final_lr']:.2g})"
                          for s in row["hd"]))
    print()
    print("| task | tuned Adam lr | tuned Adam final loss | " + " | ".join(
        f"HD-Adam from {s:g}: final loss (ratio, end lr)" for s in HD_STARTS) + " |")
    print("|---" * (3 + len(HD_STARTS)) + "|")
    for row in rows:
        cells = [f"{row['hd'][f'{s:g}']['loss']:.4f} (x{row['hd'][f'{s:g}']['ratio']:.2f}, {row['hd'][f'{s:g}']['final_lr']:.2g})"
                 for s in HD_STARTS]
        print(f"| {row['task']} | {row['tuned_lr']:.3g} | {row['tuned_loss']:.4f} | " + " | ".join(cells) + " |")
    summary = {}
    for s in HD_STARTS:
        ratios = [row["hd"][f"{s:g}"]["ratio"] for row in rows]
        constant = [row["hd"][f"{s:g}"]["constant_adam_loss"] / row["tuned_loss"] for row in rows]
        summary[f"{s:g}"] = {
            "median_ratio": float(np.median(ratios)),
            "max_ratio": float(np.max(ratios)),
            "within_factor_2": int(sum(r <= 2.0 for r in ratios)),
            "constant_adam_median_ratio": float(np.median(constant)),
        }
    print()
    print("| start lr | median ratio to tuned Adam | worst ratio | tasks within x2 | constant Adam at that lr: median ratio |")
    print("|---|---|---|---|---|")
    for s, v in summary.items():
        print(f"| {s} | {v['median_ratio']:.2f} | {v['max_ratio']:.2f} | {v['within_factor_2']}/{len(rows)} "
              f"| {v['constant_adam_median_ratio']:.2f} |")
    seconds = time.perf_counter() - started
    print(f"\n{len(rows)} held-out tasks, {args.steps} steps, seeds {list(args.seeds)}, beta {beta:g}: {seconds:.0f} s")
    return {"beta": beta, "beta_scores": beta_scores, "rows": rows, "summary": summary, "seconds": seconds}


def scheduled_adam(schedule):
    """lr -> Adam(lr) with its updates scaled by ``schedule``."""
    return lambda lr: named_chain(adam=Adam(lr=lr), schedule=scale_by_schedule(schedule))


def adam_baselines(steps: int) -> list[Baseline]:
    warmup = max(1, steps // 10)
    return [
        Baseline("adam", lambda lr: Adam(lr=lr), ADAM_GRID),
        Baseline("adam_cosine", scheduled_adam(CosineDecay(steps)), ADAM_GRID),
        Baseline("adam_warmup_cosine", scheduled_adam(warmup_cosine(warmup, steps)), ADAM_GRID),
    ]


def base_lr_on_training_tasks(family, steps: int, num_tasks: int) -> float:
    """Constant Adam's best lr on training tasks (seed 0): the learned schedule's starting point."""
    window = smoothing_window(steps)
    logs = {lr: 0.0 for lr in ADAM_GRID}
    for index in range(num_tasks):
        task = family.task(index, TRAIN)
        tuned = tune_lr(adam_baselines(steps)[0], lambda f, task=task: run_seeds(f, task, steps=steps, seeds=(0,)),
                        window=window)
        for lr in ADAM_GRID:
            logs[lr] += math.log(float(tuned.mean_curves[lr][-1]))
    return min(logs, key=logs.get)


def bench_schedule(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    family = make_family(FAMILY)
    started = time.perf_counter()
    base_lr = base_lr_on_training_tasks(family, args.steps, args.beta_tasks)
    schedule = LearnedSchedule(total_steps=args.steps, num_knots=args.knots)
    rule = named_chain(adam=Adam(lr=base_lr), schedule=scale_by_schedule(schedule))
    trainer = MetaTrainer(rule, family, meta_lr=args.meta_lr, unroll_steps=args.unroll, run_steps=args.steps,
                          tasks_per_step=args.tasks_per_step, meta_objective=args.meta_objective,
                          second_order=args.second_order, seed=0)
    results = trainer.train(args.meta_steps)
    meta_seconds = time.perf_counter() - started
    fractions = [i / args.knots for i in range(args.knots + 1)]
    with torch.no_grad():
        knots = [float(schedule(round(f * args.steps))) for f in fractions]
    print(f"base lr (constant Adam, training tasks): {base_lr:.3g}; meta-trained {args.meta_steps} steps "
          f"({sum(r.skipped for r in results)} skipped) in {meta_seconds:.0f} s")
    print("learned factor at fractions " + ", ".join(f"{f:.2f}: {k:.3f}" for f, k in zip(fractions, knots, strict=True)))

    suite = heldout_suite(family=FAMILY, num_tasks=args.tasks, steps=args.steps, seeds=tuple(args.seeds))
    result = run_suite(suite, {"learned_schedule": lambda: rule}, baselines=adam_baselines(args.steps),
                       reference="adam")
    names = [b.name for b in adam_baselines(args.steps)]
    per_task = []
    for task in result.tasks:
        learned = task.optimizers["learned_schedule"]
        row = {"task": task.task_name, "tuned_lrs": {n: task.baselines[n].best_lr for n in names}}
        for name in names:
            c = compare(learned, task.baselines[name], task.window)
            row[name] = {"speedup": c.speedup.value, "reached": c.speedup.reached,
                         "final_loss_ratio": c.train_loss_ratio}
        per_task.append(row)
    print()
    print("| task | " + " | ".join(f"speedup vs tuned {n} (lr)" for n in names) + " |")
    print("|---" * (1 + len(names)) + "|")
    for row in per_task:
        cells = [f"{row[n]['speedup']:.2f}{'' if row[n]['reached'] else ' (not reached, cap)'} ({row['tuned_lrs'][n]:.2g})"
                 for n in names]
        print(f"| {row['task']} | " + " | ".join(cells) + " |")
    summary = {}
    for name in names:
        s = summarize([row[name]["speedup"] for row in per_task])
        f = summarize([row[name]["final_loss_ratio"] for row in per_task])
        summary[name] = {"speedup_median": s.median, "speedup_iqm": s.iqm, "final_loss_ratio_median": f.median,
                         "reached": sum(row[name]["reached"] for row in per_task)}
    baseline_vs_adam = result.summary()
    print()
    print("| learned schedule vs | median speedup | IQM speedup | target reached | median final-loss ratio |")
    print("|---|---|---|---|---|")
    for name, v in summary.items():
        print(f"| tuned {name} | {v['speedup_median']:.2f} | {v['speedup_iqm']:.2f} | {v['reached']}/{len(per_task)} "
              f"| {v['final_loss_ratio_median']:.2f} |")
    for name in ("adam_cosine", "adam_warmup_cosine"):
        print(f"(tuned {name} vs tuned adam: median speedup {baseline_vs_adam[name]['speedup'].median:.2f})")
    seconds = time.perf_counter() - started
    print(f"\n{len(per_task)} held-out tasks, {args.steps} steps, seeds {list(args.seeds)}: {seconds:.0f} s in all")
    if args.plot:
        plot_schedule(schedule, args.steps, base_lr, args.plot)
    return {"base_lr": base_lr, "knots": dict(zip(map(str, fractions), knots, strict=True)), "rows": per_task,
            "summary": summary, "meta_seconds": meta_seconds, "seconds": seconds,
            "meta_losses": [r.meta_loss for r in results]}


def plot_schedule(schedule: LearnedSchedule, steps: int, base_lr: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        learned = [base_lr * float(schedule(k)) for k in range(steps)]
    cosine = [base_lr * CosineDecay(steps)(k) for k in range(steps)]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(learned, label="learned schedule")
    ax.plot(cosine, "--", label="cosine from the same lr")
    ax.set_xlabel("step")
    ax.set_ylabel("Adam lr")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=("hypergradient", "schedule"))
    parser.add_argument("--tasks", type=int, default=6, help="held-out tasks")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--beta-tasks", type=int, default=2, help="training tasks used to pick beta / the base lr")
    parser.add_argument("--meta-steps", type=int, default=40)
    parser.add_argument("--meta-lr", type=float, default=0.05)
    parser.add_argument("--unroll", type=int, default=200, help="truncation length (200 = the whole run)")
    parser.add_argument("--meta-objective", default="log_train_loss", choices=META_OBJECTIVES)
    parser.add_argument("--second-order", action=argparse.BooleanOptionalAction, default=True,
                        help="differentiate through the inner gradients (first order favours large lrs)")
    parser.add_argument("--tasks-per-step", type=int, default=2)
    parser.add_argument("--knots", type=int, default=8)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the learned schedule (schedule only)")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON (suffixed _<which>)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = bench_hypergradient(args) if args.which == "hypergradient" else bench_schedule(args)
    if args.out is not None:
        out = args.out.with_name(f"{args.out.stem}_{args.which}{args.out.suffix}")
        out.write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"numbers written to {out}")


if __name__ == "__main__":
    main()
