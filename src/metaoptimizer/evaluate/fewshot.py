"""Few-shot evaluation of episodic meta-learners (MAML, MAML with learned scalar or per-layer
rates, Meta-SGD, Warp-Grad).

A run meta-trains each method from the same initial model on meta-train episodes, then adapts to
held-out meta-test episodes (disjoint classes, or fresh sinusoids) and reports the query accuracy
(classification) or MSE (regression) with a 95% confidence interval over episodes
(:func:`fewshot_score`, a :class:`FewShotScore`; ``MetaOptimizer.evaluate_fewshot`` is the same for
facade users). Reports are markdown + JSON + a PNG; ``metaopt fewshot``
(:mod:`metaoptimizer.cli.fewshot`) runs it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from metaoptimizer.config import MetaOptTrainResult, check_positive
from metaoptimizer.meta.gradient_learner import EpisodicLearner, GradientMetaLearner
from metaoptimizer.meta.warp_grad import WarpGradLearner
from metaoptimizer.tasks.episodes import SinusoidSampler, TaskDistributionSampler, digits_sampler, omniglot_sampler
from metaoptimizer.tasks.warp_models import interleave_warps

#: Method name -> ``GradientMetaLearner`` lr_mode.
#: Method -> the learning-rate mode of its GradientMetaLearner; ``warp_grad`` is a WarpGradLearner
#: on the same model with warp layers interleaved (its preconditioning is learned, not a rate).
METHODS = {
    "meta_sgd": "per_parameter", "maml_layer_lr": "per_tensor", "maml_scalar_lr": "scalar", "maml": "fixed",
    "warp_grad": None,
}
DATASETS = ("sinusoid", "digits", "omniglot")
#: Image side and number of conv blocks of the image learners (each block halves the side).
IMAGE_LEARNERS = {"digits": (8, 2), "omniglot": (28, 4)}


def mean_confidence_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation confidence interval
    (``z * std / sqrt(n)``, the convention of the few-shot literature for 600+ episodes)."""
    if len(values) < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {len(values)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    return statistics.fmean(values), z * statistics.stdev(values) / math.sqrt(len(values))


def make_sampler(
    dataset: str,
    split: str,
    *,
    n_way: int = 5,
    k_shot: int = 1,
    query_shots: int = 15,
    data_dir: str | Path | None = None,
    device: torch.device | str | None = None,
) -> TaskDistributionSampler:
    """The episode sampler of ``dataset`` for ``split`` ('train' or 'test'); for sinusoid,
    ``k_shot`` is the support size and ``query_shots`` the query size."""
    if dataset == "sinusoid":
        return SinusoidSampler(k_shot, query_shots, split, device=device)
    if dataset == "digits":
        return digits_sampler(split, n_way, k_shot, query_shots, device=device)
    if dataset == "omniglot":
        return omniglot_sampler(data_dir, split, n_way, k_shot, query_shots, device=device)
    raise ValueError(f"dataset={dataset!r} is not supported; accepted values: {DATASETS}")


def conv_learner(image_size: int, blocks: int, n_way: int, width: int, in_channels: int = 1) -> nn.Sequential:
    """The few-shot conv net of Finn et al. 2017: ``blocks`` x (3x3 conv, batch norm, ReLU, 2x2
    max-pool), then a linear classifier. Batch norm uses the statistics of the current batch
    (no running averages), so adapted parameters are the only state."""
    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for _ in range(blocks):
        layers += [
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels, side = width, side // 2
    if side < 1:
        raise ValueError(f"{blocks} pooling blocks shrink a {image_size}x{image_size} image to nothing")
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * side * side, n_way))


def make_model(dataset: str, n_way: int = 5, *, width: int | None = None, seed: int = 0) -> nn.Module:
    """The learner of ``dataset``, initialised from ``seed``: an MLP 1-40-40-1 for sinusoid
    (Finn et al. 2017), a conv net for images (width 32 for digits, 64 for Omniglot by default)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is not supported; accepted values: {DATASETS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if dataset == "sinusoid":
            hidden = width or 40
            return nn.Sequential(
                nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
            )
        image_size, blocks = IMAGE_LEARNERS[dataset]
        return conv_learner(image_size, blocks, n_way, width or (32 if dataset == "digits" else 64))


@dataclass
class FewShotResult:
    """One method's meta-training run and its meta-test score.

    ``values`` holds the per-episode metric; ``mean`` and ``ci95`` summarise it.
    """

    method: str
    dataset: str
    metric: str
    mean: float
    ci95: float
    values: list[float]
    meta_steps: int
    skipped_steps: int
    meta_train_seconds: float
    meta_losses: list[float] = field(default_factory=list)
    learned_lr: dict[str, float] = field(default_factory=dict)


def meta_train(
    learner: GradientMetaLearner,
    sampler: TaskDistributionSampler,
    *,
    meta_steps: int,
    meta_batch_size: int,
    seed: int = 0,
    on_step: Callable[[MetaOptTrainResult], None] | None = None,
) -> list[MetaOptTrainResult]:
    """``meta_steps`` meta-updates on consecutive batches of ``sampler``'s episodes."""
    check_positive("meta_steps", meta_steps, integer=True)
    batches = sampler.batches(meta_batch_size, seed)
    history = []
    for _ in range(meta_steps):
        history.append(learner.meta_train_step(next(batches)))
        if on_step is not None:
            on_step(history[-1])
    return history


def evaluate_fewshot(
    learner: EpisodicLearner,
    sampler: TaskDistributionSampler,
    *,
    episodes: int = 600,
    seed: int = 0,
    steps: int | None = None,
    chunk: int = 50,
) -> tuple[str, list[float]]:
    """The metric name ('accuracy' or 'mse') and its value on each of ``episodes`` meta-test
    episodes, adapting with ``steps`` inner steps (default: the learner's)."""
    check_positive("episodes", episodes, integer=True)
    check_positive("chunk", chunk, integer=True)
    values: list[float] = []
    metric = "mse"
    for start in range(0, episodes, chunk):
        batch = sampler.episodes(min(chunk, episodes - start), seed, start)
        metric = "accuracy" if batch[0].is_classification else "mse"
        values += learner.evaluate(batch, steps)[metric]
    return metric, values


@dataclass(frozen=True)
class FewShotScore:
    """Meta-test score of an episodic learner: ``metric`` ('accuracy' or 'mse') on each episode
    (``values``), their ``mean`` and the half-width ``ci95`` of its 95% confidence interval."""

    metric: str
    mean: float
    ci95: float
    values: list[float]

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% confidence interval ``(mean - ci95, mean + ci95)``."""
        return self.mean - self.ci95, self.mean + self.ci95

    def paired_difference(self, other: FewShotScore) -> tuple[float, float]:
        """Mean and 95% CI half-width of ``self - other`` episode by episode (the same episodes)."""
        if other.metric != self.metric or len(other.values) != len(self.values):
            raise ValueError(
                f"paired differences need the same metric and episodes: {self.metric} on {len(self.values)} "
                f"vs {other.metric} on {len(other.values)}"
            )
        return mean_confidence_interval([a - b for a, b in zip(self.values, other.values)])


def fewshot_score(
    learner: EpisodicLearner,
    sampler: TaskDistributionSampler,
    *,
    episodes: int = 600,
    seed: int = 0,
    steps: int | None = None,
) -> FewShotScore:
    """:func:`evaluate_fewshot` summarised with its 95% confidence interval."""
    metric, values = evaluate_fewshot(learner, sampler, episodes=episodes, seed=seed, steps=steps)
    mean, ci95 = mean_confidence_interval(values)
    return FewShotScore(metric, mean, ci95, values)


def run_method(
    method: str,
    dataset: str,
    train_sampler: TaskDistributionSampler,
    test_sampler: TaskDistributionSampler,
    *,
    n_way: int = 5,
    width: int | None = None,
    inner_steps: int = 1,
    inner_lr: float = 0.4,
    first_order: bool = False,
    meta_lr: float = 1e-3,
    meta_steps: int = 1000,
    meta_batch_size: int = 16,
    test_episodes: int = 600,
    test_inner_steps: int | None = None,
    gradient_clipping: float | None = None,
    seed: int = 0,
    on_step: Callable[[MetaOptTrainResult], None] | None = None,
) -> FewShotResult:
    """Meta-train ``method`` from the seeded initial model and score it on meta-test episodes."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; accepted values: {tuple(METHODS)}")
    model = make_model(dataset, n_way, width=width, seed=seed)
    common = {
        "inner_steps": inner_steps, "inner_lr": inner_lr, "first_order": first_order, "meta_lr": meta_lr,
        "loss": "mse" if dataset == "sinusoid" else "cross_entropy", "gradient_clipping": gradient_clipping,
    }
    if method == "warp_grad":
        learner = WarpGradLearner(interleave_warps(model), seed=seed, **common)
    else:
        learner = GradientMetaLearner(model, lr_mode=METHODS[method], **common)
    start = time.perf_counter()
    history = meta_train(
        learner, train_sampler, meta_steps=meta_steps, meta_batch_size=meta_batch_size, seed=seed, on_step=on_step
    )
    seconds = time.perf_counter() - start
    metric, values = evaluate_fewshot(learner, test_sampler, episodes=test_episodes, seed=seed, steps=test_inner_steps)
    mean, ci95 = mean_confidence_interval(values)
    return FewShotResult(
        method=method, dataset=dataset, metric=metric, mean=mean, ci95=ci95, values=values,
        meta_steps=learner.steps, skipped_steps=learner.skipped, meta_train_seconds=seconds,
        meta_losses=[r.meta_loss for r in history],
        learned_lr=learner.learned_lr() if isinstance(learner, GradientMetaLearner) else {},
    )


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    window = max(1, min(window, len(values)))
    cumulative = [0.0]
    for v in values:
        cumulative.append(cumulative[-1] + v)
    return [(cumulative[i] - cumulative[i - window]) / window for i in range(window, len(cumulative))]


def format_metric(result: FewShotResult) -> str:
    """The score as the report prints it: mean ± 95% half-width (accuracy in percent)."""
    if result.metric == "accuracy":
        return f"{100 * result.mean:.2f}% ± {100 * result.ci95:.2f}"
    return f"{result.mean:.3f} ± {result.ci95:.3f}"


def write_report(
    results: Sequence[FewShotResult], out_dir: str | Path, *, title: str, setup: Mapping[str, object]
) -> Path:
    """Write ``report.md``, ``results.json`` and ``fewshot.png`` (scores with 95% CIs, and
    meta-training curves) to ``out_dir``; returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("results is empty; nothing to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric = results[0].metric
    scale = 100.0 if metric == "accuracy" else 1.0
    label = "accuracy (%)" if metric == "accuracy" else "MSE"

    figure, (scores, curves) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.method for r in results]
    scores.bar(names, [scale * r.mean for r in results], yerr=[scale * r.ci95 for r in results], capsize=6)
    scores.set_ylabel(f"meta-test {label}, 95% CI")
    scores.set_title(f"{len(results[0].values)} meta-test episodes")
    for r in results:
        curves.plot(_moving_average(r.meta_losses, 50), label=r.method)
    curves.set_xlabel("meta-step")
    curves.set_ylabel("query loss after adaptation (moving average)")
    curves.set_yscale("log")
    curves.legend()
    figure.tight_layout()
    figure.savefig(out / "fewshot.png", dpi=120)
    plt.close(figure)

    lines = [f"# {title}", "", "## Setup", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in setup.items()]
    lines += [
        "", "## Results", "",
        f"| method | meta-test {label} (95% CI) | episodes | meta-steps | skipped | meta-train time (s) "
        "| mean abs inner lr |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lr = statistics.fmean(r.learned_lr.values()) if r.learned_lr else float("nan")
        lines.append(
            f"| {r.method} | {format_metric(r)} | {len(r.values)} | {r.meta_steps} | {r.skipped_steps} "
            f"| {r.meta_train_seconds:.1f} | {lr:.4g} |"
        )
    lines += ["", "![scores and meta-training curves](fewshot.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps({"title": title, "setup": dict(setup), "results": [asdict(r) for r in results]}, indent=1),
        encoding="utf-8",
    )
    return path
