"""Few-shot evaluation: confidence intervals, learners, runs and report files (the command: test_cli_fewshot.py)."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaoptimizer.evaluate.fewshot import (
    METHODS,
    FewShotResult,
    FewShotScore,
    conv_learner,
    evaluate_fewshot,
    make_model,
    make_sampler,
    mean_confidence_interval,
    run_method,
    write_report,
)
from metaoptimizer.meta.gradient_learner import GradientMetaLearner
from metaoptimizer.tasks.episodes import FewShotClassificationSampler, SinusoidSampler


def test_confidence_interval_matches_the_normal_formula():
    rng = np.random.default_rng(0)
    values = rng.normal(0.7, 0.1, size=600).tolist()
    mean, half_width = mean_confidence_interval(values)
    assert mean == pytest.approx(np.mean(values))
    assert half_width == pytest.approx(1.959964 * np.std(values, ddof=1) / math.sqrt(600), rel=1e-6)
    _, wider = mean_confidence_interval(values, confidence=0.99)
    assert wider == pytest.approx(2.575829 * np.std(values, ddof=1) / math.sqrt(600), rel=1e-6)
    assert mean_confidence_interval([1.0, 1.0]) == (1.0, 0.0)


@settings(max_examples=30, deadline=None)
@given(confidence=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(math.nan)))
def test_bad_confidence_is_rejected(confidence):
    with pytest.raises(ValueError, match="confidence must lie in"):
        mean_confidence_interval([0.0, 1.0], confidence)


def test_too_few_values_are_rejected():
    with pytest.raises(ValueError, match="at least 2 values"):
        mean_confidence_interval([0.5])


def test_samplers_and_models_fit_together():
    sinusoid = make_sampler("sinusoid", "test", k_shot=5, query_shots=7)
    assert isinstance(sinusoid, SinusoidSampler) and sinusoid.episode(0).query_x.shape == (7, 1)
    assert make_model("sinusoid")(sinusoid.episode(0).query_x).shape == (7, 1)
    digits = make_sampler("digits", "train", n_way=3, k_shot=2, query_shots=4)
    episode = digits.episode(0)
    assert make_model("digits", 3)(episode.query_x).shape == (12, 3)
    assert conv_learner(28, 4, 5, width=8)(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    with pytest.raises(ValueError, match="shrink a 8x8 image to nothing"):
        conv_learner(8, 4, 5, width=8)
    for bad in (lambda: make_sampler("mnist", "train"), lambda: make_model("mnist")):
        with pytest.raises(ValueError, match="accepted values: \\('sinusoid', 'digits', 'omniglot'\\)"):
            bad()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_sampler("omniglot", "train", data_dir="/nonexistent/folder")


def test_models_are_seeded():
    first, second, other = make_model("digits", seed=3), make_model("digits", seed=3), make_model("digits", seed=4)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(first.parameters(), other.parameters()))


def test_evaluate_fewshot_is_independent_of_chunking():
    learner = GradientMetaLearner(make_model("sinusoid", width=8), inner_lr=0.01, loss="mse")
    sampler = SinusoidSampler(5, 10, "test")
    metric, whole = evaluate_fewshot(learner, sampler, episodes=7, seed=2, chunk=7)
    _, chunked = evaluate_fewshot(learner, sampler, episodes=7, seed=2, chunk=3)
    assert metric == "mse" and len(whole) == 7 and whole == pytest.approx(chunked)
    with pytest.raises(ValueError, match="episodes must be an integer > 0"):
        evaluate_fewshot(learner, sampler, episodes=0)


def test_the_facade_scores_episode_learners_with_intervals():
    from metaoptimizer import MetaOptimizer, MetaOptimizerConfig

    sampler = make_sampler("digits", "test", n_way=3, k_shot=1, query_shots=2)
    scores = {}
    for method in ("meta_sgd", "warp_grad"):
        meta = MetaOptimizer(
            make_model("digits", 3, width=4), MetaOptimizerConfig(method=method, rule_options={"inner_steps": 1})
        )
        scores[method] = meta.evaluate_fewshot(sampler, episodes=6, seed=1)
        _, expected = evaluate_fewshot(meta.learner, sampler, episodes=6, seed=1)
        score = scores[method]
        assert score.metric == "accuracy" and score.values == expected
        assert (score.mean, score.ci95) == mean_confidence_interval(expected)
        assert score.interval == (score.mean - score.ci95, score.mean + score.ci95)
    difference = scores["warp_grad"].paired_difference(scores["meta_sgd"])
    assert difference == mean_confidence_interval(
        [a - b for a, b in zip(scores["warp_grad"].values, scores["meta_sgd"].values)]
    )
    with pytest.raises(ValueError, match="same metric and episodes"):
        scores["meta_sgd"].paired_difference(FewShotScore("accuracy", 0.5, 0.1, [0.5, 0.5]))
    with pytest.raises(ValueError, match="needs an episode learner: method='meta_sgd' or 'warp_grad'"):
        MetaOptimizer(make_model("digits", 3, width=4)).evaluate_fewshot(sampler)
    with pytest.raises(TypeError, match="TaskDistributionSampler"):
        meta.evaluate_fewshot([sampler.episode(0)])


def tiny_classes():
    torch.manual_seed(0)
    return [torch.randn(6, 1, 8, 8) + c for c in range(4)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_run_method_meta_trains_and_scores(method):
    train = FewShotClassificationSampler(tiny_classes(), n_way=3, k_shot=1, query_shots=2)
    test = FewShotClassificationSampler(tiny_classes(), n_way=3, k_shot=1, query_shots=2, split="test")
    result = run_method(
        method, "digits", train, test, n_way=3, width=4, meta_steps=3, meta_batch_size=2, test_episodes=4, seed=1
    )
    assert result.method == method and result.metric == "accuracy" and len(result.values) == 4
    assert result.meta_steps == 3 and result.skipped_steps == 0 and len(result.meta_losses) == 3
    assert result.mean == pytest.approx(statistics.fmean(result.values)) and 0 <= result.mean <= 1
    names = {n for n, _ in make_model("digits", 3, width=4).named_parameters()}
    assert set(result.learned_lr) == (set() if method == "warp_grad" else names)  # warps are not rates
    with pytest.raises(ValueError, match="accepted values"):
        run_method("reptile", "digits", train, test)


def make_result(method, values, metric="accuracy"):
    mean, ci = mean_confidence_interval(values)
    return FewShotResult(
        method=method, dataset="digits", metric=metric, mean=mean, ci95=ci, values=values, meta_steps=3,
        skipped_steps=0, meta_train_seconds=1.5, meta_losses=[1.0, 0.8, 0.5], learned_lr={"w": 0.1},
    )


def test_write_report(tmp_path):
    results = [make_result("meta_sgd", [0.6, 0.8, 0.7]), make_result("maml", [0.5, 0.6, 0.4])]
    path = write_report(results, tmp_path / "out", title="Few-shot digits", setup={"meta-steps": 3})
    text = path.read_text()
    assert "# Few-shot digits" in text and "| meta-steps | 3 |" in text
    assert f"| meta_sgd | {100 * results[0].mean:.2f}% ± {100 * results[0].ci95:.2f} | 3 |" in text
    assert (tmp_path / "out" / "fewshot.png").stat().st_size > 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["results"][1]["values"] == [0.5, 0.6, 0.4]
    mse = write_report([make_result("maml", [0.5, 0.25], "mse")], tmp_path / "mse", title="t", setup={})
    assert "0.375 ± " in mse.read_text()
    with pytest.raises(ValueError, match="results is empty"):
        write_report([], tmp_path, title="t", setup={})
