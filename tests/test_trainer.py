import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaoptimizer.config import OptimizerState
from metaoptimizer.meta.distributed import SingleProcess
from metaoptimizer.meta.estimators import PES, RunEstimates, TruncatedBPTT
from metaoptimizer.meta.runs import ReplayableBatches, TaskRun
from metaoptimizer.meta.trainer import MetaTrainer, gather_slot_rows, slot_generator
from metaoptimizer.meta.unroll import detach_params, unroll
from metaoptimizer.meta._vectorized import flatten_meta
from metaoptimizer.rules.hand import SGD
from metaoptimizer.rules.lstm import LSTMRule, budget_aware_lstm
from metaoptimizer.tasks.quadratic import QuadraticFamily


def _trainer(estimator=None, **kwargs):
    torch.manual_seed(0)
    options = {"unroll_steps": 3, "run_steps": 6, "tasks_per_step": 2, "meta_lr": 0.01, "seed": 0}
    options.update(kwargs)
    return MetaTrainer(LSTMRule(hidden_size=4), QuadraticFamily(dim=3), estimator=estimator, **options)


def test_one_step_applies_the_clipped_mean_meta_gradient():
    trainer = _trainer(gradient_clipping=0.5, tasks_per_step=2)
    rule = trainer.rule
    starts = [(run.task, detach_params(run.params), run.train_batches.seed) for run in trainer.runs]
    before = [p.detach().clone() for p in rule.parameters()]
    grads = None
    for task, params, seed in starts:
        result = unroll(rule, task, params, rule.init(params), task.train_batches(seed), 3)
        g = torch.autograd.grad(result.meta_loss / 2, list(rule.parameters()))
        grads = g if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
    norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))
    reference = torch.optim.Adam([p.clone().requires_grad_() for p in before], lr=0.01)
    for p, g in zip(reference.param_groups[0]["params"], grads, strict=True):
        p.grad = g * (0.5 / (norm + 1e-12))
    reference.step()
    result = trainer.step()
    assert result.meta_grad_norm == pytest.approx(norm, rel=1e-5)
    assert not result.skipped and result.steps == 1 and result.inner_steps == 6
    for p, q in zip(rule.parameters(), reference.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(p.detach(), q.detach())


def test_vectorized_tbptt_matches_looped_tbptt():
    rows = []
    for vectorize in (False, True):
        trainer = _trainer(TruncatedBPTT(vectorize=vectorize), tasks_per_step=3)
        rows.append(trainer.estimator.estimate_runs(trainer.rule, trainer.runs, 3))
    torch.testing.assert_close(rows[0].grads, rows[1].grads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rows[0].meta_losses, rows[1].meta_losses)


def test_runs_are_replaced_at_their_end_and_meta_loss_falls():
    trainer = _trainer(tasks_per_step=2, run_steps=6, unroll_steps=3, meta_lr=0.03)
    first = [run.task_index for run in trainer.runs]
    trainer.step()
    assert [run.steps_done for run in trainer.runs] == [3, 3]
    trainer.step()
    assert all(run.steps_done == 0 for run in trainer.runs)
    assert [run.task_index for run in trainer.runs] != first
    calls = []
    results = trainer.train(40, callback=calls.append)
    assert calls == results and len(results) == 40
    early = sum(r.meta_loss for r in results[:10]) / 10
    late = sum(r.meta_loss for r in results[-10:]) / 10
    assert late < early


def test_min_run_steps_draws_log_uniform_run_lengths_in_range():
    trainer = _trainer(tasks_per_step=1, run_steps=400, min_run_steps=4)
    generator = slot_generator(0, 0)
    lengths = [trainer._sample_run_steps(generator) for _ in range(2000)]
    assert min(lengths) >= 4 and max(lengths) <= 400
    logs = torch.tensor(lengths, dtype=torch.float64).log()
    assert float(logs.mean()) == pytest.approx((math.log(4) + math.log(400)) / 2, rel=0.03)
    assert 4 <= trainer.runs[0].num_steps <= 400


class _ExplodingFamily(QuadraticFamily):
    """Every task's loss is NaN: every meta-step must be skipped."""

    def sample(self, seed):
        task = super().sample(seed)
        loss = task.loss
        task.loss = lambda params, batch: loss(params, batch) * math.nan
        return task


@pytest.mark.parametrize("vectorize", [False, True])
def test_non_finite_steps_are_skipped_counted_and_runs_replaced(vectorize):
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=3)
    trainer = MetaTrainer(rule, _ExplodingFamily(dim=3), unroll_steps=2, run_steps=10, tasks_per_step=2,
                          estimator=TruncatedBPTT(vectorize=vectorize))
    before = flatten_meta(rule)
    first = list(trainer.runs)
    results = trainer.train(2)
    assert all(r.skipped for r in results) and results[-1].skipped_total == 2 and trainer.steps == 0
    assert torch.equal(before, flatten_meta(rule))
    assert not any(run in first for run in trainer.runs)


@pytest.mark.parametrize(
    "estimator", [None, TruncatedBPTT(vectorize=True), PES(sigma=0.05, num_pairs=2)], ids=["tbptt", "vmap", "pes"]
)
@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy-keys"])
def test_state_dict_round_trip_continues_exactly(estimator, legacy):
    trainer = _trainer(estimator, tasks_per_step=2, run_steps=9, min_run_steps=3, sync_runs=legacy)
    trainer.train(4)
    state = trainer.state_dict()
    if legacy:  # as checkpoints written before the run length was called num_steps hold it
        for table in (*state["runs"], state["cohort"]):
            table["horizon"] = table.pop("num_steps")
    torch.manual_seed(123)  # a different rule initialisation, then overwritten
    restored = MetaTrainer(LSTMRule(hidden_size=4), QuadraticFamily(dim=3), unroll_steps=3, run_steps=9, min_run_steps=3,
                           tasks_per_step=2, meta_lr=0.01, estimator=estimator, sync_runs=legacy)
    restored.load_state_dict(state)
    expected = trainer.train(4)
    assert restored.train(4) == expected
    assert torch.equal(flatten_meta(trainer.rule), flatten_meta(restored.rule))
    for a, b in zip(trainer.runs, restored.runs, strict=True):
        assert a.task_index == b.task_index and torch.equal(a.params["theta"], b.params["theta"])


def test_load_state_dict_rejects_another_meta_batch_size():
    state = _trainer(tasks_per_step=2).state_dict()
    with pytest.raises(ValueError, match="tasks_per_step=3"):
        _trainer(tasks_per_step=3).load_state_dict(state)


def test_estimate_averages_rows_for_the_facade():
    trainer = _trainer(tasks_per_step=2)
    runs = trainer.runs
    copies = [
        TaskRun(r.task, r.task_index, dict(r.params), r.state, ReplayableBatches(r.task.train_batches, r.train_batches.seed),
                ReplayableBatches(r.task.valid_batches, r.valid_batches.seed), 0, r.num_steps)
        for r in runs
    ]
    estimator = TruncatedBPTT()
    rows = estimator.estimate_runs(trainer.rule, runs, 3)
    estimate = estimator.estimate(trainer.rule, copies, 3)
    assert estimate.finite and estimate.inner_steps == 6
    assert estimate.meta_loss == pytest.approx(float(rows.meta_losses.mean()))
    flat = torch.cat([g.reshape(-1) for g in estimate.grads])
    torch.testing.assert_close(flat, rows.grads.mean(0))
    assert [g.shape for g in estimate.grads] == [p.shape for p in trainer.rule.parameters()]
    assert copies[0].generator is None  # made without a slot generator: gets one on first use
    PES(sigma=0.1, num_pairs=1).estimate_runs(trainer.rule, copies[:1], 3)
    assert isinstance(copies[0].generator, torch.Generator)


def test_rule_without_meta_parameters_is_rejected():
    with pytest.raises(ValueError, match="no trainable meta-parameters"):
        MetaTrainer(SGD(lr=0.05), QuadraticFamily(dim=3))
    with pytest.raises(ValueError, match="no runs"):
        RunEstimates(torch.zeros(0, 0), torch.zeros(0), torch.zeros(0)).mean(LSTMRule(hidden_size=2))


def test_tbptt_on_a_rule_without_meta_parameters_gives_empty_rows():
    trainer = _trainer(tasks_per_step=2)
    rows = TruncatedBPTT().estimate_runs(SGD(lr=0.05), trainer.runs, 2)
    assert rows.grads.shape == (2, 0) and bool(rows.finite().all())


def test_gather_on_one_process_is_the_identity():
    rows = RunEstimates(torch.ones(2, 3), torch.tensor([1.0, 2.0]), torch.tensor([3, 3]))
    assert gather_slot_rows(rows, [0, 1], 2, SingleProcess()) is rows


def test_gathered_rows_of_two_processes_are_exactly_the_rows_of_all_slots():
    gen = torch.Generator().manual_seed(0)
    full = RunEstimates(torch.randn(5, 4, generator=gen), torch.rand(5, generator=gen, dtype=torch.float64) * 1e3,
                        torch.tensor([3, 3, 2, 3, 1]))
    part = lambda slots: RunEstimates(full.grads[slots], full.meta_losses[slots], full.inner_steps[slots])  # noqa: E731

    class Capture:
        """Stands in for the collective: returns this process's buffer plus the other's."""

        rank, world_size = 0, 2

        def __init__(self, other=None):
            self.other, self.mine = other, None

        def all_reduce_sum(self, tensor):
            self.mine = tensor
            return tensor if self.other is None else tensor + self.other

    odd = Capture()
    gather_slot_rows(part([1, 3]), [1, 3], 5, odd)
    rows = gather_slot_rows(part([0, 2, 4]), [0, 2, 4], 5, Capture(odd.mine))
    assert torch.equal(rows.grads, full.grads) and rows.grads.dtype == full.grads.dtype
    assert torch.equal(rows.meta_losses, full.meta_losses)
    assert torch.equal(rows.inner_steps, full.inner_steps)


def test_replayable_batches_resume_where_they_stopped():
    task = QuadraticFamily(dim=2, noise_std=0.1).sample(4)
    stream = ReplayableBatches(task.train_batches, seed=7)
    assert iter(stream) is stream
    seen = stream.take(3)
    assert stream.drawn == 3
    again = ReplayableBatches(task.train_batches, seed=7, drawn=2)
    assert torch.equal(next(again)[1], seen[2][1])


def test_slot_generators_are_independent_and_reproducible():
    draws = lambda seed, slot: torch.rand(4, generator=slot_generator(seed, slot))  # noqa: E731
    assert torch.equal(draws(0, 1), draws(0, 1))
    assert not torch.equal(draws(0, 1), draws(0, 2))
    assert not torch.equal(draws(0, 1), draws(1, 1))


def test_trainer_state_holds_only_checkpoint_safe_values():
    from metaoptimizer.checkpoint import _check_plain

    trainer = _trainer(PES(sigma=0.05, num_pairs=1))
    trainer.step()
    _check_plain(trainer.state_dict(), "state")
    assert OptimizerState.from_dict(trainer.state_dict()["runs"][0]["state"]).step_count == 3


@settings(max_examples=30, deadline=None)
@given(
    field=st.sampled_from(["meta_lr", "unroll_steps", "run_steps", "tasks_per_step", "gradient_clipping", "min_run_steps", "seed"]),
    value=st.one_of(st.integers(-3, 0), st.floats(allow_nan=True), st.just(math.inf), st.text(max_size=2)),
)
def test_bad_hyperparameters_are_rejected(field, value):
    kwargs = {field: value}
    if field in {"meta_lr", "gradient_clipping"} and isinstance(value, float) and value > 0 and math.isfinite(value):
        return  # a valid positive number
    if field == "seed" and isinstance(value, int) and value == 0:
        return
    with pytest.raises(ValueError, match=field):
        MetaTrainer(LSTMRule(hidden_size=2), QuadraticFamily(dim=2), **kwargs)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="accepted values"):
        MetaTrainer(LSTMRule(hidden_size=2), QuadraticFamily(dim=2), meta_objective="accuracy")
    with pytest.raises(ValueError, match="min_run_steps"):
        MetaTrainer(LSTMRule(hidden_size=2), QuadraticFamily(dim=2), run_steps=10, min_run_steps=20)
    with pytest.raises(ValueError, match="num_steps"):
        _trainer().train(0)

    class Four(SingleProcess):
        pass

    with pytest.raises(ValueError, match="number of processes"):
        MetaTrainer(LSTMRule(hidden_size=2), QuadraticFamily(dim=2), tasks_per_step=2,
                    communicator=Four(rank=0, world_size=4))


def test_each_run_tells_a_budget_aware_rule_its_own_length():
    rule = budget_aware_lstm(500, hidden_size=4, init_lr=0.01, momentum_decay=0.9)
    trainer = MetaTrainer(rule, QuadraticFamily(dim=3), run_steps=30, min_run_steps=10, tasks_per_step=4, seed=1)
    assert all(run.state.num_steps == run.num_steps for run in trainer.runs)
    assert len({run.num_steps for run in trainer.runs}) > 1 and rule.default_num_steps == 500  # the rule is unchanged
    assert not trainer.step().skipped


def test_meta_lr_scales_set_per_prefix_learning_rates():
    trainer = _trainer(meta_lr=0.01, meta_lr_scales={"head": 0.1, "head.bias": 0.5})
    lrs = {id(p): g["lr"] for g in trainer.meta_optimizer.param_groups for p in g["params"]}
    rule = trainer.rule
    assert lrs[id(rule.head.weight)] == pytest.approx(1e-3)
    assert lrs[id(rule.head.bias)] == pytest.approx(5e-3)  # the longest prefix wins
    assert lrs[id(rule.skip)] == pytest.approx(0.01)
    assert len(lrs) == len(list(rule.parameters()))
    before = rule.head.weight.detach().clone()
    assert not trainer.step().skipped
    assert not torch.equal(before, rule.head.weight)
    with pytest.raises(ValueError, match="matches no meta-parameter"):
        _trainer(meta_lr_scales={"decoder": 0.1})
    with pytest.raises(ValueError, match="meta_lr_scales"):
        _trainer(meta_lr_scales={"head": 0.0})
