"""General-suite median speedup of a meta-training run's snapshots against its meta-training hours.

Issue 16's curve: every rule a run saved (``[training] snapshot_every``: ``RUN/snapshots/
step_NNNNNN.pt``) is evaluated on the ``general`` suite at one horizon against the tuned baselines,
its median speedup over tuned Adam is plotted against the wall-hours the run's one-thread process had
spent by that meta-step (the ``seconds`` column of ``RUN/log.csv``; on a shared
machine this is an upper bound on its CPU-hours). Reference optimizers (the published Celo by
default) are drawn as horizontal lines. A task whose target a rule misses counts as the budget's
steps (an upper bound on its speedup), so each point is marked with the number of tasks that
reached the target; the table also gives the fraction of tasks on which the rule's final training
loss beats tuned AdamW + warmup-cosine. Each snapshot's figures are kept in ``OUT/step_NNNNNN.json``
so a later call only evaluates new snapshots.

    OMP_NUM_THREADS=1 python benchmarks/recipe_curve.py --run runs/celo_recipe --horizon 1000 \
        --data-dir ../shared/data --baseline-cache DIR --out runs/recipe_curve
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from metaoptimizer.evaluate.loading import load_optimizer  # noqa: E402
from metaoptimizer.evaluate.runner import run_suite  # noqa: E402
from metaoptimizer.evaluate.suites import make_suite  # noqa: E402

WARMUP_COSINE = "adamw-warmup-cosine"


def hours_at(log_path: Path) -> dict[int, float]:
    """Cumulative hours of meta-training after each meta-step, from the run's ``log.csv``."""
    seconds = {}
    with log_path.open() as handle:
        for row in csv.DictReader(handle):
            seconds[int(row["iteration"])] = float(row["seconds"])
    total, hours = 0.0, {0: 0.0}
    for iteration in sorted(seconds):
        total += seconds[iteration]
        hours[iteration] = total / 3600
    return hours


def figures(spec: str, label: str, horizon: int, data_dir: str | None, cache: str | None) -> dict[str, float]:
    """Median and IQM speedup over tuned Adam, targets reached, and the fraction of tasks whose
    final training loss beats tuned AdamW + warmup-cosine, for the optimizer ``spec``."""
    suite = make_suite("general", horizons=(horizon,), data_dir=data_dir)
    result = run_suite(suite, {label: lambda: load_optimizer(spec)}, cache=cache)
    headline = result.headline(label)
    beats = result.beat_fractions("train")[label][WARMUP_COSINE]
    return {"median": headline["median"], "iqm": headline["iqm"], "reached": headline["reached"],
            "tasks": headline["tasks"], "beats_warmup_cosine": beats, "per_task": headline["per_task"]}


def cached(path: Path, compute) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=2))
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/celo_recipe"))
    parser.add_argument("--horizon", type=int, default=1000)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--baseline-cache", default=None)
    parser.add_argument("--reference", action="append", default=None, help="pretrained names drawn as lines")
    parser.add_argument("--out", type=Path, default=Path("runs/recipe_curve"))
    parser.add_argument("--every", type=int, default=1, help="evaluate only snapshots at multiples of this meta-step")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="evaluate only the snapshots of these meta-steps (instead of --every)")
    parser.add_argument("--snapshots-only", action="store_true",
                        help="evaluate the snapshots and stop (no reference, table or plot): to run beside another call")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    hours = hours_at(args.run / "log.csv")
    found = {int(path.stem.removeprefix("step_")): path for path in (args.run / "snapshots").glob("step_*.pt")}
    missing = sorted(set(args.steps or ()) - set(found))
    if missing:
        raise SystemExit(f"no snapshot of meta-steps {missing} in {args.run / 'snapshots'}")
    steps = sorted(set(args.steps)) if args.steps else [step for step in sorted(found) if step % args.every == 0]
    if not steps:
        raise SystemExit(f"{args.run / 'snapshots'} holds no step_NNNNNN.pt snapshots (set [training] snapshot_every)")
    points = []
    for step in steps:
        path = found[step]
        if step not in hours:
            raise SystemExit(f"{path.name}: meta-step {step} is not in {args.run / 'log.csv'}")
        point = cached(args.out / f"{path.stem}_h{args.horizon}.json",
                       lambda path=path: figures(str(path), path.stem, args.horizon, args.data_dir, args.baseline_cache))
        points.append((step, hours[step], point))
    if args.snapshots_only:
        return
    references = {name: cached(args.out / f"{name}_h{args.horizon}.json",
                               lambda name=name: figures(name, name, args.horizon, args.data_dir, args.baseline_cache))
                  for name in args.reference or ["celo"]}

    print(f"general suite, {args.horizon} steps: median speedup over tuned Adam; beats = fraction of tasks whose final "
          "training loss beats tuned AdamW + warmup-cosine")
    print(f"{'meta-step':>10} {'hours':>7} {'median':>7} {'IQM':>7} {'reached':>8} {'beats':>6}")
    for step, hour, p in points:
        print(f"{step:>10} {hour:>7.2f} {p['median']:>7.3f} {p['iqm']:>7.3f} {p['reached']:>4}/{p['tasks']:<3} "
              f"{p['beats_warmup_cosine']:>6.2f}")
    for name, p in references.items():
        print(f"{name:>10} {'':>7} {p['median']:>7.3f} {p['iqm']:>7.3f} {p['reached']:>4}/{p['tasks']:<3} "
              f"{p['beats_warmup_cosine']:>6.2f}")

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([h for _, h, _ in points], [p["median"] for _, _, p in points], "o-", label=f"{args.run.name} snapshots")
    for _, hour, p in points:  # an unreached target counts as budget steps, so a median can look fine when few reach
        axis.annotate(f"{p['reached']}/{p['tasks']}", (hour, p["median"]), textcoords="offset points", xytext=(0, 6),
                      ha="center", fontsize=8)
    for name, p in references.items():
        axis.axhline(p["median"], linestyle="--", color="gray", label=f"{name} (published weights)")
    axis.axhline(1.0, linestyle=":", color="black", linewidth=0.8)
    axis.set_xlabel("meta-training wall-hours (one thread)")
    axis.set_ylabel(f"median speedup over tuned Adam ({args.horizon} steps)")
    axis.set_title("general suite vs meta-training time")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / f"curve_h{args.horizon}.png", dpi=120)
    print(f"plot: {args.out / f'curve_h{args.horizon}.png'}")


if __name__ == "__main__":
    main()
