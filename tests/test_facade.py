from types import SimpleNamespace

import pytest
import torch
from torch import nn

from metaoptimizer import MetaOptimizer, MetaOptimizerConfig
from metaoptimizer.checkpoint import CheckpointError
from metaoptimizer.config import METHODS
from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.optim import LearnedOptimizer
from metaoptimizer.tasks.quadratic import QuadraticFamily, QuadraticTask


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _grads(model):
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters())), strict=True))


def test_compute_update_advances_state_and_reports_effective_lr():
    model = _model()
    meta = MetaOptimizer(model, MetaOptimizerConfig(hidden_size=6))
    with pytest.raises(RuntimeError, match="compute_update"):
        meta.get_learned_lr()
    grads = _grads(model)
    updates, state = meta.compute_update(grads)
    assert state.step_count == 1 and meta.state is state
    assert {n: u.shape for n, u in updates.items()} == {n: p.shape for n, p in model.named_parameters()}
    lrs = meta.get_learned_lr()
    assert set(lrs) == set(grads) and all(v >= 0 for v in lrs.values())
    _, explicit = meta.compute_update(grads, state)
    assert explicit.step_count == 2 and meta.state.step_count == 1  # an explicit state is not stored
    meta.reset_optimizer_state()
    assert meta.state.step_count == 0


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda g: g.update({"0.weight": g["0.weight"] * float("nan")}), "NaN"),
        (lambda g: g.update({"0.weight": torch.zeros(2, 2)}), "shape"),
        (lambda g: g.update({"missing": torch.zeros(1)}), "unknown"),
    ],
)
def test_compute_update_rejects_bad_gradients(mutate, match):
    model = _model()
    meta = MetaOptimizer(model, MetaOptimizerConfig(hidden_size=6))
    grads = _grads(model)
    mutate(grads)
    with pytest.raises(ValueError, match=match):
        meta.compute_update(grads)


def test_meta_train_step_on_tasks_and_on_support_query_episodes():
    model = _model()
    meta = MetaOptimizer(model, MetaOptimizerConfig(hidden_size=6, unroll_steps=3, meta_lr=1e-2))
    before = [p.clone() for p in meta.rule.parameters()]
    result = meta.meta_train_step([QuadraticTask(seed=0, dim=3), QuadraticTask(seed=2, dim=3)])
    assert not result.skipped and result.steps == 1 and result.inner_steps == 6
    assert any(not torch.equal(a, b) for a, b in zip(before, meta.rule.parameters(), strict=True))
    episode = SimpleNamespace(
        support_x=torch.randn(5, 4), support_y=torch.randint(0, 3, (5,)),
        query_x=torch.randn(5, 4), query_y=torch.randint(0, 3, (5,)),
    )
    result = meta.meta_train_step([episode])
    assert result.steps == 2 and result.meta_grad_norm > 0
    with pytest.raises(ValueError, match="at least one"):
        meta.meta_train_step([])
    with pytest.raises(TypeError, match="episodes must be"):
        meta.meta_train_step([object()])
    with pytest.raises(ValueError, match="base_model"):
        MetaOptimizer(None, MetaOptimizerConfig(hidden_size=6)).meta_train_step([episode])


def test_non_finite_meta_step_is_skipped_and_counted():
    class Exploding(QuadraticTask):
        def loss(self, params, batch):
            return super().loss(params, batch) * float("inf")

    meta = MetaOptimizer(None, MetaOptimizerConfig(hidden_size=6, unroll_steps=2))
    before = [p.clone() for p in meta.rule.parameters()]
    result = meta.meta_train_step([Exploding(seed=0, dim=3)])
    assert result.skipped and result.skipped_total == 1 and result.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, meta.rule.parameters(), strict=True))


def test_torch_optimizer_trains_the_model():
    model = _model()
    meta = MetaOptimizer(model, MetaOptimizerConfig(hidden_size=6, rule_options={"init_lr": 0.01}))
    with pytest.warns(UserWarning, match="not been meta-trained"):
        opt = meta.torch_optimizer()
    assert isinstance(opt, LearnedOptimizer) and isinstance(opt, torch.optim.Optimizer)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="base_model"):
        MetaOptimizer(None).torch_optimizer()


def test_save_load_round_trip_and_bad_files(tmp_path):
    model = _model()
    meta = MetaOptimizer(model, MetaOptimizerConfig(hidden_size=6, unroll_steps=2))
    meta.meta_train_step([QuadraticTask(seed=0, dim=3)])
    path = tmp_path / "rule.pt"
    meta.save(path)
    loaded = MetaOptimizer.load(path, model)
    assert loaded.config == meta.config and loaded.meta_steps == 1
    for a, b in zip(meta.rule.state_dict().values(), loaded.rule.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    grads = _grads(model)
    torch.testing.assert_close(meta.compute_update(grads)[0], loaded.compute_update(grads)[0])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        MetaOptimizer.load(tmp_path / "junk.pt")


def test_constructor_type_errors():
    with pytest.raises(TypeError, match="MetaOptimizerConfig"):
        MetaOptimizer(_model(), {"method": "lstm"})
    with pytest.raises(TypeError, match="nn.Module"):
        MetaOptimizer("model")
    with pytest.raises(ValueError, match="base_model"):
        MetaOptimizer(None).compute_update({})


def _few_shot_episodes(n=2):
    from metaoptimizer.tasks.episodes import Episode

    gen = torch.Generator().manual_seed(0)
    return [
        Episode(
            support_x=torch.randn(6, 4, generator=gen), support_y=torch.arange(6) % 3,
            query_x=torch.randn(6, 4, generator=gen), query_y=torch.arange(6) % 3, task_id=f"t{i}", num_classes=3,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("method", ["meta_sgd", "warp_grad"])
def test_episode_methods_meta_train_and_save(method, tmp_path):
    model = _model()
    meta = MetaOptimizer(model, MetaOptimizerConfig(method=method, meta_lr=1e-2, rule_options={"inner_steps": 2}))
    result = meta.meta_train_step(_few_shot_episodes())
    assert not result.skipped and result.steps == 1
    if method == "meta_sgd":
        lrs = meta.get_learned_lr()
        assert set(lrs) == {n for n, _ in model.named_parameters()}
    else:
        assert meta.learner.warp_parameter_names()
    meta.save(tmp_path / "m.pt")
    assert MetaOptimizer.load(tmp_path / "m.pt", meta.base_model).config.method == method
    with pytest.raises(ValueError, match="base_model it was built with"):
        meta.meta_train_step(_few_shot_episodes(), base_model=_model())


def test_l2o_rules_through_the_facade():
    model = _model()
    for architecture in ("mlp", "hierarchical"):
        meta = MetaOptimizer(model, MetaOptimizerConfig(method="l2o", rule_options={"architecture": architecture}))
        updates, state = meta.compute_update(_grads(model))
        assert state.step_count == 1 and set(updates) == {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="hierarchical"):
        MetaOptimizer(model, MetaOptimizerConfig(method="l2o", rule_options={"architecture": "rnn"}))


def test_warp_grad_needs_a_sequential_or_warped_model():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x):
            return self.layer(x)

    with pytest.raises(TypeError, match="nn.Sequential"):
        MetaOptimizer(Custom(), MetaOptimizerConfig(method="warp_grad"))
    plain = MetaOptimizer(Custom(), MetaOptimizerConfig(method="warp_grad", preconditioning=False))
    assert plain.learner.warp_parameter_names() == []


def test_episode_methods_without_a_model_cannot_meta_train():
    with pytest.raises(ValueError, match="needs a base_model"):
        MetaOptimizer(None, MetaOptimizerConfig(method="meta_sgd")).meta_train_step(_few_shot_episodes())


@pytest.mark.parametrize("method", METHODS)
def test_the_spec_usage_works_for_every_method(method):
    """``meta.compute_update(grads, OptimizerState())``, exactly as the spec writes it."""
    from metaoptimizer import OptimizerState

    model = _model()
    meta = MetaOptimizer(model, MetaOptimizerConfig(method=method))
    grads = {name: torch.ones_like(p) for name, p in meta.base_model.named_parameters()}
    updates, state = meta.compute_update(grads, OptimizerState())
    assert set(updates) == set(grads) and state.step_count == 1
    assert all(torch.isfinite(u).all() for u in updates.values())


def test_any_rule_is_saved_and_loaded_by_its_spec(tmp_path):
    from metaoptimizer.checkpoint import load_checkpoint, save_checkpoint
    from metaoptimizer.rules import Adam, budget_aware_lstm, named_chain, scale_by_schedule, to_spec
    from metaoptimizer.schedules import CosineDecay

    for rule in (named_chain(adam=Adam(lr=0.02), schedule=scale_by_schedule(CosineDecay(30))), budget_aware_lstm(40)):
        meta = MetaOptimizer(_model(), rule=rule)
        meta.save(tmp_path / "rule.pt")
        loaded = MetaOptimizer.load(tmp_path / "rule.pt", _model())
        assert to_spec(loaded.rule) == to_spec(rule)
        for a, b in zip(loaded.rule.state_dict().values(), rule.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    data = load_checkpoint(tmp_path / "rule.pt", expected_kind="metaoptimizer")
    payload = {k: v for k, v in data.items() if k not in ("format", "kind", "version", "config")}
    payload["rule_spec"] = {"rule": "no_such_rule", "hyperparameters": {}}
    save_checkpoint(tmp_path / "bad.pt", kind="metaoptimizer", config=data["config"], payload=payload)
    with pytest.raises(ValueError, match="holds a rule spec that cannot be rebuilt: unknown rule 'no_such_rule'"):
        MetaOptimizer.load(tmp_path / "bad.pt")


def test_meta_sgd_builds_the_episodic_learner_and_the_online_rule_and_says_so():
    from metaoptimizer.meta.gradient_learner import GradientMetaLearner
    from metaoptimizer.rules import HypergradientRule

    options = {"inner_steps": 3, "base_lr": 0.05, "alpha_lr": 0.02}
    meta = MetaOptimizer(_model(), MetaOptimizerConfig(method="meta_sgd", rule_options=options))
    assert isinstance(meta.learner, GradientMetaLearner) and meta.learner.inner_steps == 3
    assert isinstance(meta.rule, HypergradientRule) and (meta.rule.base_lr, meta.rule.alpha_lr) == (0.05, 0.02)
    assert meta.rule.inner_steps == 1  # the window of the online rule is set through method='hypergradient'
    with pytest.raises(ValueError, match=r"unknown rule_options \['window'\] for method='meta_sgd'"):
        MetaOptimizer(_model(), MetaOptimizerConfig(method="meta_sgd", rule_options={"window": 2}))


def test_the_online_rule_has_its_own_method_with_every_option():
    from metaoptimizer.rules import HypergradientRule

    model = _model()
    options = {"base_lr": 0.05, "alpha_lr": 0.02, "inner_steps": 4, "clamp": (1e-6, 1.0)}
    meta = MetaOptimizer(model, MetaOptimizerConfig(method="hypergradient", rule_options=options))
    assert isinstance(meta.rule, HypergradientRule) and meta.rule.hyperparameters() == options
    assert meta.learner is None
    optimizer = meta.torch_optimizer()
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    optimizer.reset_per_param_lr()
    assert all(torch.all(rate == 0.05) for rate in optimizer.get_per_param_lr().values())
    with pytest.raises(ValueError, match="has nothing to meta-train"):
        meta.meta_train_step(_few_shot_episodes())
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr_mode'"):
        MetaOptimizer(model, MetaOptimizerConfig(method="hypergradient", rule_options={"lr_mode": "scalar"}))


def test_meta_sgd_defaults_train_a_small_mlp_below_adam_at_its_default_lr():
    """``method='meta_sgd'`` as a torch optimizer, at its defaults, against Adam(1e-3) after the
    same steps (benchmarks/bench_online_rates.py runs the full comparison)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()

    def train(make_optimizer):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
        optimizer = make_optimizer(model)
        for step in range(100):
            batch = torch.arange(32) + 32 * (step % 8)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        return nn.functional.cross_entropy(model(x), y).item()

    online = train(lambda m: MetaOptimizer(m, MetaOptimizerConfig(method="meta_sgd")).torch_optimizer())
    adam = train(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    assert online < adam


def test_only_untrained_learned_rules_warn_when_handed_to_torch(recwarn, tmp_path):
    model = _model()
    config = MetaOptimizerConfig(hidden_size=4, num_layers=1)
    MetaOptimizer(model, MetaOptimizerConfig(method="warp_grad")).torch_optimizer()  # plain SGD: nothing to learn
    trained = MetaOptimizer(model, config)
    MetaTrainer(trained.rule, QuadraticFamily(dim=3), meta_lr=0.01, unroll_steps=2, run_steps=4).train(1)
    trained.torch_optimizer()  # trained outside the facade: its weights moved
    trained.save(tmp_path / "t.pt")
    MetaOptimizer.load(tmp_path / "t.pt", model).torch_optimizer()
    MetaOptimizer(model, config, rule=trained.rule).torch_optimizer()  # a given rule is the caller's business
    assert not [w for w in recwarn if "meta-trained" in str(w.message)]
    with pytest.warns(UserWarning, match="'lstm' rule has not been meta-trained") as caught:
        MetaOptimizer(model, config).torch_optimizer()
    assert caught[0].filename == __file__  # points at the caller's line
