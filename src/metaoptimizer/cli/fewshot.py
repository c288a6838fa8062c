"""``metaopt fewshot``: meta-train few-shot learners and compare them on meta-test episodes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from metaoptimizer.cli._common import out_option, progress_display, usage_errors
from metaoptimizer.config import MetaOptTrainResult
from metaoptimizer.evaluate.fewshot import DATASETS, METHODS, format_metric, make_sampler, run_method, write_report
from metaoptimizer.progress import Progress, ProgressCallback

__all__ = ["fewshot"]


def _step_reporter(report: ProgressCallback, label: str, total: int) -> Callable[[MetaOptTrainResult], None]:
    """``run_method``'s per-step hook, as progress reports counting ``total`` steps."""
    done = 0

    def on_step(result: MetaOptTrainResult) -> None:
        nonlocal done
        done += 1
        report(Progress(label, done, total, f"meta-loss {result.meta_loss:.4g}"))

    return on_step


def fewshot(
    dataset: Annotated[str, typer.Option(help=f"one of {', '.join(DATASETS)}")] = "digits",
    methods: Annotated[
        str, typer.Option(help=f"comma-separated, from {', '.join(METHODS)}")
    ] = "meta_sgd,maml_scalar_lr",
    n_way: Annotated[int, typer.Option(help="classes per episode (ignored for sinusoid)")] = 5,
    k_shot: Annotated[int, typer.Option(help="support examples per class (per task for sinusoid)")] = 1,
    query_shots: Annotated[int, typer.Option(help="query examples per class (per task for sinusoid)")] = 15,
    inner_steps: Annotated[int, typer.Option(help="inner gradient steps in meta-training")] = 1,
    test_inner_steps: Annotated[
        int | None, typer.Option(help="inner steps at meta-test (default: inner-steps)")
    ] = None,
    inner_lr: Annotated[float, typer.Option(help="inner learning rate (initial value when learned)")] = 0.4,
    first_order: Annotated[bool, typer.Option(help="drop second derivatives (FOMAML)")] = False,
    meta_lr: Annotated[float, typer.Option(help="Adam learning rate of the meta-update")] = 1e-3,
    meta_steps: Annotated[int, typer.Option(help="meta-training steps per method")] = 1000,
    meta_batch_size: Annotated[int, typer.Option(help="episodes per meta-step")] = 16,
    test_episodes: Annotated[int, typer.Option(help="meta-test episodes")] = 600,
    width: Annotated[int | None, typer.Option(help="conv channels / hidden units (default per dataset)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding omniglot/ (or METAOPT_DATA_DIR)")] = None,
    out: Annotated[Path, out_option("output folder for report.md, results.json, fewshot.png")] = Path(
        "fewshot-report"
    ),
    seed: Annotated[int, typer.Option(help="seed of the initial model and of the episodes")] = 0,
    progress: Annotated[bool, typer.Option(help="show progress (a bar on a terminal, lines in a log)")] = True,
) -> None:
    """Meta-train few-shot learners and compare them on meta-test episodes (95% CIs)."""
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if not chosen or unknown:
        raise typer.BadParameter(f"unknown methods {unknown or chosen}; accepted values: {', '.join(METHODS)}")
    with usage_errors():
        samplers = {
            split: make_sampler(
                dataset, split, n_way=n_way, k_shot=k_shot, query_shots=query_shots, data_dir=data_dir
            )
            for split in ("train", "test")
        }
    results = []
    with progress_display(progress) as report:
        for method in chosen:
            on_step = None if report is None else _step_reporter(report, f"meta-training {method}", meta_steps)
            results.append(
                run_method(
                    method, dataset, samplers["train"], samplers["test"], n_way=n_way, width=width,
                    inner_steps=inner_steps, inner_lr=inner_lr, first_order=first_order, meta_lr=meta_lr,
                    meta_steps=meta_steps, meta_batch_size=meta_batch_size, test_episodes=test_episodes,
                    test_inner_steps=test_inner_steps, seed=seed, on_step=on_step,
                )
            )
    shots = f"{k_shot}-shot" if dataset == "sinusoid" else f"{n_way}-way {k_shot}-shot"
    setup = {
        "dataset": dataset, "episodes": shots, "query per class/task": query_shots, "inner steps": inner_steps,
        "test inner steps": test_inner_steps or inner_steps, "inner lr (init)": inner_lr, "first order": first_order,
        "meta lr": meta_lr, "meta-steps": meta_steps, "meta-batch": meta_batch_size, "seed": seed,
    }
    path = write_report(results, out, title=f"Few-shot {dataset} {shots}", setup=setup)
    console = Console()
    for r in results:
        console.print(f"{r.method}: meta-test {r.metric} {format_metric(r)} over {len(r.values)} episodes")
    console.print(f"report written to {path}")
