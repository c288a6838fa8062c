import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from metaoptimizer.config import META_OBJECTIVES, OptimizerState
from metaoptimizer.meta.estimators import PES, FullES, PESParticles, TaskNormalization, TruncatedBPTT, TruncatedES, make_estimator
from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.meta.unroll import detach_params, unroll
from metaoptimizer.meta._vectorized import (
    UnrollJob,
    flatten_meta,
    loss_signature,
    run_jobs,
    unflatten_meta,
)
from metaoptimizer.rules.base import UpdateRule
from metaoptimizer.rules.hand import SGD
from metaoptimizer.rules.lstm import LSTMRule
from metaoptimizer.tasks.base import ModuleTask
from metaoptimizer.tasks.quadratic import QuadraticFamily, QuadraticTask
from metaoptimizer.tasks.sequence import CharRNNFamily


class LearnedLR(UpdateRule):
    """SGD with a learned log learning rate: the smallest rule with a meta-parameter."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(math.log(lr)))

    def init(self, params, *, num_steps=None):
        return OptimizerState(num_steps=num_steps)

    def update(self, grads, state, params, *, loss=None):
        step, state = self.begin_update(grads, state, params, loss)
        return {n: -self.log_lr.exp() * g for n, g in grads.items()}, state.replace(step_count=step)


def _double(batch):
    return tuple(t.double() for t in batch)


def _quadratic_job(rule, seed, steps=4, dtype=torch.float64):
    task = QuadraticTask(seed=seed, dim=4)
    params = {n: p.to(dtype) for n, p in task.init_params(seed + 10).items()}
    batches = [tuple(t.to(dtype) for t in b) for b in itertools.islice(task.train_batches(0), steps + 1)]
    valid = tuple(t.to(dtype) for t in next(task.valid_batches(0)))
    return UnrollJob(task, flatten_meta(rule)[None].to(dtype), params, rule.init(params), batches, valid)


# -- vectorized unrolls --------------------------------------------------------------------------


@pytest.mark.parametrize("objective", META_OBJECTIVES)
@pytest.mark.parametrize("second_order", [False, True])
def test_run_jobs_matches_reference_unroll(objective, second_order):
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=5).double()
    jobs = [_quadratic_job(rule, seed) for seed in range(3)]
    for vectorize in (False, True):
        outcomes = run_jobs(
            rule, jobs, meta_objective=objective, second_order=second_order, with_grad=True, vectorize=vectorize
        )
        for job, outcome in zip(jobs, outcomes, strict=True):
            params = detach_params(job.params)
            ref = unroll(
                rule, job.task, params, rule.init(params), iter(job.train_batches), job.steps,
                second_order=second_order, meta_objective=objective, valid_batches=iter([job.valid_batch]),
            )
            grads = torch.autograd.grad(ref.meta_loss, list(rule.parameters()))
            flat = torch.cat([g.reshape(-1) for g in grads])
            assert float(outcome.meta_losses[0]) == pytest.approx(float(ref.meta_loss.detach()), rel=1e-12)
            torch.testing.assert_close(outcome.grads[0], flat, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(outcome.losses[0], torch.tensor(ref.losses, dtype=torch.float64))
            torch.testing.assert_close(outcome.params["theta"][0], ref.params["theta"].detach())
            assert outcome.state.step_count == ref.state.step_count == job.steps
            assert bool(outcome.finite()[0])


def _mlp_task(seed, hidden=8, activation=nn.Tanh):
    """A small synthetic classification task (an MLP, so a ModuleTask)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    return ModuleTask(
        f"mlp{seed}", lambda: nn.Sequential(nn.Linear(5, hidden), activation(), nn.Linear(hidden, 3)),
        (x[:30], y[:30]), (x[30:], y[30:]), batch_size=10,
    )


def _lm_task(seed):
    return CharRNNFamily(cells="gru", hidden_sizes=6, seq_len=5, batch_size=4, n_chars=256, vocab_size=7).sample(seed)


@pytest.mark.parametrize("make_task", [_mlp_task, _lm_task], ids=["mlp", "gru_lm"])
def test_vmapped_jobs_match_looped_jobs_with_stacked_starts(make_task):
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=4)
    theta = flatten_meta(rule)
    assert loss_signature(make_task(0)) == loss_signature(make_task(1)) is not None  # one vmapped call
    jobs = []
    for index in range(2):
        task = make_task(index)
        params = task.init_params(index)
        members = theta + 0.01 * torch.randn(3, theta.numel())
        stacked = {n: p.expand(3, *p.shape) + 0.01 * torch.randn(3, *p.shape) for n, p in params.items()}
        state = rule.init(params).map_tensors(lambda t: t.expand(3, *t.shape).clone())
        batches = list(itertools.islice(task.train_batches(index), 4))
        jobs.append(UnrollJob(task, members, stacked, state, batches, stacked_start=True))
    with torch.no_grad():
        looped = run_jobs(rule, jobs, vectorize=False)
        vmapped = run_jobs(rule, jobs, vectorize=True)
    for a, b in zip(looped, vmapped, strict=True):
        torch.testing.assert_close(a.meta_losses, b.meta_losses, rtol=1e-5, atol=1e-6)
        for name in a.params:
            torch.testing.assert_close(a.params[name], b.params[name], rtol=1e-5, atol=1e-6)
        for x, y in zip(a.state.tensors(), b.state.tensors(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)  # float32 round-off of batched matmuls


def test_loss_signature_groups_equal_losses_only():
    assert loss_signature(_mlp_task(0)) == loss_signature(_mlp_task(1))
    assert loss_signature(_mlp_task(0)) != loss_signature(_mlp_task(0, hidden=6))
    assert loss_signature(_mlp_task(0)) != loss_signature(_mlp_task(0, activation=nn.ReLU))
    assert loss_signature(QuadraticTask(0, dim=3)) == loss_signature(QuadraticTask(5, dim=3))
    assert loss_signature(QuadraticTask(0, dim=3)) != loss_signature(QuadraticTask(0, dim=4))

    class Custom(QuadraticTask):
        def loss(self, params, batch):
            return 2 * super().loss(params, batch)

    assert loss_signature(Custom(0, dim=3)) is None  # a subclass that changes the loss: not vmapped

    class Declared(Custom):
        def loss_signature(self):
            return type(self), self.dim

    assert loss_signature(Declared(0, dim=3)) == loss_signature(Declared(1, dim=3)) != loss_signature(_mlp_task(0))


def test_tasks_of_different_shapes_run_unbatched_with_the_same_results():
    rule = LSTMRule(hidden_size=3)
    theta = flatten_meta(rule)[None]
    jobs = []
    class Unregistered(QuadraticTask):
        pass

    for task in (_mlp_task(0), _mlp_task(1, hidden=6), QuadraticTask(0, dim=3), Unregistered(1, dim=3)):
        params = task.init_params(0)
        jobs.append(UnrollJob(task, theta, params, rule.init(params), list(itertools.islice(task.train_batches(0), 3))))
    with torch.no_grad():
        mixed = run_jobs(rule, jobs)
        alone = [run_jobs(rule, [job], vectorize=False)[0] for job in jobs]
    for a, b in zip(mixed, alone, strict=True):
        torch.testing.assert_close(a.meta_losses, b.meta_losses)


def test_meta_vector_round_trip_and_errors():
    rule = LSTMRule(hidden_size=3)
    vector = flatten_meta(rule)
    assert vector.numel() == sum(p.numel() for p in rule.parameters())
    for (name, p), piece in zip(rule.named_parameters(), unflatten_meta(rule, vector).values(), strict=True):
        assert torch.equal(p.detach(), piece), name
    with pytest.raises(ValueError, match="shape"):
        unflatten_meta(rule, vector[:-1])
    assert flatten_meta(SGD(lr=0.1)).numel() == 0


def test_run_jobs_rejects_bad_jobs():
    rule = LSTMRule(hidden_size=3)
    job = _quadratic_job(rule, 0, dtype=torch.float32)
    with pytest.raises(ValueError, match="accepted values"):
        run_jobs(rule, [job], meta_objective="accuracy")
    short = UnrollJob(job.task, job.members, job.params, job.state, job.train_batches[:1])
    with pytest.raises(ValueError, match="steps >= 1"):
        run_jobs(rule, [short])
    no_valid = UnrollJob(job.task, job.members, job.params, job.state, job.train_batches)
    with pytest.raises(ValueError, match="valid_batch"):
        run_jobs(rule, [no_valid], meta_objective="valid_loss")


def test_hand_rule_without_meta_parameters_runs():
    rule = SGD(lr=0.05)
    job = _quadratic_job(rule, 1, dtype=torch.float32)
    (outcome,) = run_jobs(rule, [job], with_grad=True)
    assert outcome.grads.shape == (1, 0)
    assert outcome.losses[0, -1] < outcome.losses[0, 0]


# -- ES estimators -------------------------------------------------------------------------------


def _summed_estimate(estimator_type, pairs, seed, truncations=4, unroll_steps=3):
    """Sum of one run's estimates over its whole horizon (θ fixed), and the exact gradient of the
    summed truncation meta-losses (second order, through the whole horizon)."""
    rule = LearnedLR()
    family = QuadraticFamily(dim=3)
    estimator = estimator_type(sigma=0.01, num_pairs=pairs)
    trainer = MetaTrainer(
        rule, family, unroll_steps=unroll_steps, run_steps=unroll_steps * truncations, estimator=estimator, seed=seed
    )
    run = trainer.runs[0]
    params = detach_params(run.params)
    exact = unroll(rule, run.task, params, rule.init(params), run.task.train_batches(0), unroll_steps * truncations,
                   second_order=True)
    (grad,) = torch.autograd.grad(exact.meta_loss * truncations, [rule.log_lr])
    total = sum(estimator.estimate_runs(rule, trainer.runs, unroll_steps).grads[0, 0] for _ in range(truncations))
    assert trainer.runs[0].finished
    return float(total), float(grad)


@pytest.mark.parametrize("seed", [0, 1])
def test_pes_is_unbiased_across_truncations_where_truncated_es_is_not(seed):
    pes, exact = _summed_estimate(PES, pairs=32000, seed=seed)
    tes, _ = _summed_estimate(TruncatedES, pairs=8000, seed=seed)
    assert pes == pytest.approx(exact, rel=0.03)
    assert abs(tes - exact) > 0.1 * abs(exact)  # truncated ES ignores the history: biased


def test_full_es_estimates_the_whole_horizon_gradient():
    full, exact = _summed_estimate(FullES, pairs=32000, seed=0, truncations=1, unroll_steps=12)
    assert full == pytest.approx(exact, rel=0.03)


def test_truncated_es_matches_backprop_on_one_truncation():
    rule = LearnedLR()
    trainer = MetaTrainer(rule, QuadraticFamily(dim=3), unroll_steps=5, run_steps=50, estimator=TruncatedES(0.01, 32000))
    reference = MetaTrainer(LearnedLR(), QuadraticFamily(dim=3), unroll_steps=5, run_steps=50,
                            estimator=TruncatedBPTT(second_order=True))
    es = trainer.estimator.estimate_runs(rule, trainer.runs, 5)
    bptt = reference.estimator.estimate_runs(reference.rule, reference.runs, 5)
    assert float(es.grads[0, 0]) == pytest.approx(float(bptt.grads[0, 0]), rel=0.03)
    assert float(es.meta_losses[0]) == pytest.approx(float(bptt.meta_losses[0]), rel=1e-5)
    assert int(es.inner_steps[0]) == 5 * (1 + 2 * 32000)  # the centre and every particle count
    assert torch.allclose(trainer.runs[0].params["theta"], reference.runs[0].params["theta"])


@pytest.mark.parametrize("estimator_type", [TruncatedES, PES])
def test_vectorized_and_looped_es_agree(estimator_type):
    results = []
    for vectorize in (False, True):
        torch.manual_seed(0)
        trainer = MetaTrainer(
            LSTMRule(hidden_size=4), QuadraticFamily(dim=3), unroll_steps=3, run_steps=6, tasks_per_step=2,
            estimator=estimator_type(sigma=0.05, num_pairs=2, vectorize=vectorize), meta_lr=0.01,
        )
        results.append(([r.meta_loss for r in trainer.train(3)], flatten_meta(trainer.rule)))
    (loss_a, theta_a), (loss_b, theta_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    torch.testing.assert_close(theta_a, theta_b, rtol=1e-5, atol=1e-6)


def test_pes_keeps_particles_and_accumulates_noise():
    torch.manual_seed(0)
    estimator = PES(sigma=0.05, num_pairs=3)
    trainer = MetaTrainer(LSTMRule(hidden_size=4), QuadraticFamily(dim=3), unroll_steps=2, run_steps=6,
                          estimator=estimator)
    run = trainer.runs[0]
    rule = trainer.rule
    estimator.estimate_runs(rule, [run], 2)
    first = run.estimator_state
    assert isinstance(first, PESParticles)
    assert first.params["theta"].shape == (6, 3)
    assert first.perturbation.shape == (3, flatten_meta(rule).numel())
    assert not torch.equal(first.params["theta"][0], run.params["theta"])  # particles drift apart
    noise_so_far = first.perturbation.clone()
    estimator.estimate_runs(rule, [run], 2)
    second = run.estimator_state
    assert second.perturbation.norm() > noise_so_far.norm() * 1.1  # sums of independent noise grow
    assert second.state.step_count == 4
    # checkpoint form: plain tensors and numbers, under the key PES has always saved them
    saved = second.to_dict()
    assert set(saved) == {"pes"} and OptimizerState.from_dict(saved["pes"]["state"]).step_count == 4
    restored = estimator.restore_run_state(saved)
    assert torch.equal(restored.perturbation, second.perturbation) and restored.state.step_count == 4
    assert estimator.restore_run_state({}) is None
    with pytest.raises(ValueError, match="does not keep"):
        TruncatedBPTT().restore_run_state(saved)
    with pytest.raises(ValueError, match="num_pairs"):
        PES(sigma=0.05, num_pairs=2).estimate_runs(rule, [run], 2)
    trainer.step()  # the last truncation: the run reaches its end and is replaced, particles too
    assert trainer.runs[0] is not run and trainer.runs[0].estimator_state is None


class _ExplodingFamily(QuadraticFamily):
    """Quadratics whose loss is +inf once theta leaves the ball of radius 3."""

    def sample(self, seed):
        task = super().sample(seed)
        loss = task.loss
        task.loss = lambda params, batch: torch.where(params["theta"].norm() < 3, loss(params, batch), torch.inf)
        return task


def test_normalization_turns_diverging_particles_into_a_usable_step():
    torch.manual_seed(0)
    rule = LearnedLR(lr=0.3)  # large steps: particles with a larger lr leave the ball
    plain = MetaTrainer(rule, _ExplodingFamily(dim=3), unroll_steps=3, run_steps=30, estimator=PES(0.5, 8))
    assert plain.step().skipped
    rule = LearnedLR(lr=0.3)
    normalized = PES(0.5, 8, normalization=TaskNormalization(0.0, 50.0))
    trainer = MetaTrainer(rule, _ExplodingFamily(dim=3), unroll_steps=3, run_steps=30, estimator=normalized)
    run = trainer.runs[0]
    result = trainer.step()
    assert not result.skipped
    assert result.meta_grad_norm > 0 and math.isfinite(result.meta_grad_norm)
    assert run.diverged and run is not trainer.runs[0]  # a run with a dead particle is replaced


def test_task_normalization_clips_scales_and_maps_non_finite_to_max():
    norm = TaskNormalization(1.0, 3.0)
    values = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, math.nan, math.inf, -math.inf])
    expected = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(norm(values), expected)


@settings(max_examples=25, deadline=None)
@given(low=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=2)),
       high=st.floats(allow_nan=True, allow_infinity=True))
def test_task_normalization_rejects_bad_ranges(low, high):
    valid = (
        isinstance(low, float) and math.isfinite(low) and math.isfinite(high) and low < high
    )
    if valid:
        assert TaskNormalization(low, high).low == low
    else:
        with pytest.raises(ValueError, match="TaskNormalization"):
            TaskNormalization(low, high)


@settings(max_examples=25, deadline=None)
@given(sigma=st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf)),
       pairs=st.one_of(st.integers(max_value=0), st.floats(min_value=0.5, max_value=5)))
def test_es_rejects_bad_sigma_and_pairs(sigma, pairs):
    with pytest.raises(ValueError, match="sigma"):
        TruncatedES(sigma=sigma)
    with pytest.raises(ValueError, match="num_pairs"):
        PES(num_pairs=pairs)


def test_es_rejects_bad_objective_and_normalization():
    with pytest.raises(ValueError, match="accepted values"):
        TruncatedES(meta_objective="acc")
    with pytest.raises(TypeError, match="TaskNormalization"):
        TruncatedES(normalization=(0.0, 1.0))


def test_make_estimator():
    assert isinstance(make_estimator("tbptt", second_order=True), TruncatedBPTT)
    assert make_estimator("tbptt", vectorize=True).vectorize
    pes = make_estimator("pes", sigma=0.1, num_pairs=2, loss_range=[0.0, 4.0], meta_objective="valid_loss")
    assert isinstance(pes, PES) and pes.normalization == TaskNormalization(0.0, 4.0)
    assert pes.meta_objective == "valid_loss"
    assert type(make_estimator("truncated_es")) is TruncatedES
    assert isinstance(make_estimator("full_es"), FullES)
    with pytest.raises(ValueError, match="accepted values"):
        make_estimator("reinforce")
    with pytest.raises(ValueError, match="unknown options"):
        make_estimator("tbptt", sigma=0.1)
    with pytest.raises(ValueError, match="unknown options"):
        make_estimator("pes", learning_rate=0.1)
    with pytest.raises(ValueError, match="second_order"):
        make_estimator("pes", second_order=True)
    with pytest.raises(ValueError, match="pair"):
        make_estimator("pes", loss_range=[1.0])
