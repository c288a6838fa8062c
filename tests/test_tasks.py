"""Task families: determinism, split disjointness, trainability, double backward, bad arguments."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from metaoptimizer.tasks import (
    FAMILIES,
    HELDOUT,
    TRAIN,
    CharRNNFamily,
    DigitsCNNFamily,
    DigitsMLPFamily,
    QuadraticFamily,
    make_family,
    split_seed,
)
from metaoptimizer.tasks.digits import ClassifierFamily, ClassifierSpec, build_classifier, load_digits_tensors
from metaoptimizer.tasks.quadratic import quadratic_loss
from metaoptimizer.tasks.sampling import as_choices, task_rng
from metaoptimizer.tasks.sequence import RecurrentLM, markov_text, next_token_windows

SMALL_FAMILIES = {
    "quadratic": lambda: QuadraticFamily(),
    "quadratic_noisy": lambda: QuadraticFamily(dim=6, noise_std=0.5),
    "digits_mlp": lambda: DigitsMLPFamily(n_examples=(200, 300), batch_size=16),
    "digits_cnn": lambda: DigitsCNNFamily(n_examples=200, batch_size=16),
    "char_rnn": lambda: CharRNNFamily(cells=("gru", "rnn"), hidden_sizes=(8, 16), seq_len=8, n_chars=800),
}
# Step sizes small enough for plain SGD to descend and large enough for Adam to make progress.
SGD_LR = {"digits_mlp": 0.1, "digits_cnn": 0.1, "char_rnn": 0.5}
ADAM_LR = {"quadratic": 0.1, "quadratic_noisy": 0.1, "char_rnn": 3e-2}


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def assert_same_batches(a, b):
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)


def sgd_losses(task, lr, steps, seed=0):
    params = task.init_params(seed)
    losses = []
    for batch in take(task.train_batches(seed), steps):
        params = {k: v.requires_grad_() for k, v in params.items()}
        loss = task.loss(params, batch)
        grads = torch.autograd.grad(loss, list(params.values()))
        params = {k: (v - lr * g).detach() for (k, v), g in zip(params.items(), grads, strict=True)}
        losses.append(loss.item())
    return params, losses


def quadratic_lr(task):
    """1 / largest eigenvalue of the Hessian 2 W^T W: a stable gradient-descent step."""
    return 1.0 / float(torch.linalg.eigvalsh(2 * task.w.T @ task.w).max())


@pytest.fixture(params=sorted(SMALL_FAMILIES))
def family_case(request):
    return request.param, SMALL_FAMILIES[request.param]()


def test_same_seed_same_task(family_case):
    _, family = family_case
    a, b = family.sample(3), family.sample(3)
    assert a.name == b.name
    pa, pb = a.init_params(5), b.init_params(5)
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=0, atol=0)
    assert_same_batches(take(a.train_batches(1), 3), take(b.train_batches(1), 3))
    assert_same_batches(take(a.valid_batches(1), 2), take(b.valid_batches(1), 2))
    batch = next(a.train_batches(1))
    assert a.loss(pa, batch).item() == b.loss(pb, batch).item()


def test_different_seeds_differ(family_case):
    _, family = family_case
    a, b = family.sample(0), family.sample(2)
    loss_a = a.loss(a.init_params(0), next(a.train_batches(0)))
    loss_b = b.loss(b.init_params(0), next(b.train_batches(0)))
    assert loss_a.item() != loss_b.item()
    p0, p1 = a.init_params(0), a.init_params(1)
    assert any(not torch.equal(p0[k], p1[k]) for k in p0)


def test_heldout_tasks_never_share_a_seed_with_training_tasks(family_case):
    _, family = family_case
    train = {split_seed(TRAIN, i) for i in range(200)}
    heldout = {split_seed(HELDOUT, i) for i in range(200)}
    assert not train & heldout
    train_names = {family.task(i, TRAIN).name for i in range(4)}
    heldout_names = {family.task(i, HELDOUT).name for i in range(4)}
    assert not train_names & heldout_names


def test_shapes_and_finite_loss(family_case):
    _, family = family_case
    task = family.sample(0)
    params = {k: v.requires_grad_() for k, v in task.init_params(0).items()}
    assert params and all(v.is_floating_point() for v in params.values())
    for batch in take(task.train_batches(0), 2) + take(task.valid_batches(0), 1):
        loss = task.loss(params, batch)
        assert loss.shape == () and torch.isfinite(loss)
    grads = torch.autograd.grad(loss, list(params.values()))
    assert [g.shape for g in grads] == [p.shape for p in params.values()]
    metrics = task.metrics(params, batch)
    assert math.isfinite(metrics["loss"]) and metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_loss_decreases_under_sgd_on_a_fixed_batch(family_case):
    """Small gradient steps on one batch must lower that batch's loss (first-order descent)."""
    name, family = family_case
    for seed in (0, 1):
        task = family.sample(seed)
        batch = next(task.train_batches(0))
        repeated = type("Fixed", (), {"init_params": task.init_params, "loss": task.loss,
                                      "train_batches": lambda self, s: itertools.repeat(batch)})()
        lr = quadratic_lr(task) if name.startswith("quadratic") else SGD_LR[name]
        _, losses = sgd_losses(repeated, lr, steps=20)
        assert all(math.isfinite(v) for v in losses)
        assert all(b < a for a, b in zip(losses, losses[1:])), (task.name, losses)


def test_validation_loss_falls_when_training_with_adam(family_case):
    name, family = family_case
    for seed in (0, 1):
        task = family.sample(seed)
        params = {k: v.requires_grad_() for k, v in task.init_params(0).items()}
        optimizer = torch.optim.Adam(params.values(), lr=ADAM_LR.get(name, 1e-2))
        for batch in take(task.train_batches(0), 60):
            optimizer.zero_grad()
            task.loss(params, batch).backward()
            optimizer.step()
        valid = take(task.valid_batches(0), 4)
        before = sum(task.loss(task.init_params(0), b).item() for b in valid)
        after = sum(task.metrics(params, b)["loss"] for b in valid)
        assert after < 0.8 * before, (task.name, before, after)


def test_double_backward_matches_finite_differences(family_case):
    """Hessian-vector products through each loss (create_graph=True) against central differences."""
    _, family = family_case
    task = family.sample(1)
    x, y = next(task.train_batches(0))
    batch = (x.double() if x.is_floating_point() else x, y.double() if y.is_floating_point() else y)
    params = {k: v.double().requires_grad_() for k, v in task.init_params(0).items()}
    generator = torch.Generator().manual_seed(0)
    direction = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in params.items()}

    def grad_at(p, create_graph=False):
        return torch.autograd.grad(task.loss(p, batch), list(p.values()), create_graph=create_graph)

    grads = grad_at(params, create_graph=True)
    dot = sum((g * direction[k]).sum() for k, g in zip(params, grads, strict=True))
    hvp = torch.autograd.grad(dot, list(params.values()))
    eps = 1e-5
    plus = grad_at({k: (v + eps * direction[k]).detach().requires_grad_() for k, v in params.items()})
    minus = grad_at({k: (v - eps * direction[k]).detach().requires_grad_() for k, v in params.items()})
    for h, gp, gm in zip(hvp, plus, minus, strict=True):
        torch.testing.assert_close(h, (gp - gm) / (2 * eps), rtol=1e-4, atol=1e-6)


def test_families_run_on_a_given_device(family_case):
    """No hard-coded device: the meta device carries shapes through params, batches and loss."""
    name, _ = family_case
    builders = {
        "quadratic": lambda device: QuadraticFamily(device=device),
        "quadratic_noisy": lambda device: QuadraticFamily(noise_std=0.1, device=device),
        "digits_mlp": lambda device: DigitsMLPFamily(device=device),
        "digits_cnn": lambda device: DigitsCNNFamily(device=device),
        "char_rnn": lambda device: CharRNNFamily(n_chars=400, device=device),
    }
    task = builders[name]("meta").sample(0)
    params = task.init_params(0)
    batch = next(task.train_batches(0))
    assert {p.device.type for p in params.values()} == {"meta"}
    assert task.loss(params, batch).device.type == "meta"


# -- quadratic ------------------------------------------------------------------------------


def test_quadratic_gradient_hessian_and_minimiser_match_closed_form():
    task = QuadraticFamily().sample(4)
    w, y = task.w.double(), task.y.double()
    theta = task.init_params(0)["theta"].double().requires_grad_()
    (grad,) = torch.autograd.grad(task.loss({"theta": theta}, (w, y)), theta, create_graph=True)
    torch.testing.assert_close(grad, 2 * w.T @ (w @ theta - y))
    hessian = torch.stack([torch.autograd.grad(g, theta, retain_graph=True)[0] for g in grad])
    torch.testing.assert_close(hessian, 2 * w.T @ w)
    solution = torch.linalg.solve(w, y).requires_grad_()
    loss = task.loss({"theta": solution}, (w, y))
    assert loss.item() < 1e-20
    torch.testing.assert_close(torch.autograd.grad(loss, solution)[0], torch.zeros_like(y), atol=1e-10, rtol=0)


def test_quadratic_batches():
    task = QuadraticFamily(dim=4).sample(0)
    assert task.init_params(0)["theta"].shape == (4,)
    for w, y in take(task.train_batches(0), 3) + take(task.valid_batches(0), 2):
        assert w is task.w and y is task.y
    noisy = QuadraticFamily(dim=4, noise_std=0.5).sample(0)
    batches = take(noisy.train_batches(0), 2000)
    torch.testing.assert_close(batches[0][0], noisy.w)
    noise = torch.stack([y - noisy.y for _, y in batches])
    assert not torch.equal(batches[0][1], batches[1][1])
    assert noise.std().item() == pytest.approx(0.5, rel=0.05)
    assert noise.mean().abs().item() < 0.05
    assert quadratic_loss(noisy.y.new_zeros(4), noisy.w, noisy.y).item() == pytest.approx(noisy.y.square().sum().item())


# -- classifiers ----------------------------------------------------------------------------


def test_digits_tasks_use_standardised_subsets():
    family = DigitsMLPFamily(n_examples=(300, 500), valid_fraction=0.25)
    for seed in range(4):
        task = family.sample(seed)
        spec = family.spec(seed)
        (train_x, train_y), (valid_x, valid_y) = task.train_data, task.valid_data
        assert len(train_x) + len(valid_x) == spec.n_examples and len(valid_x) == round(spec.n_examples / 4)
        assert train_x.shape[1:] == (1, 8, 8) and train_y.dtype == torch.long
        assert train_x.mean().item() == pytest.approx(0.0, abs=1e-5)
        assert train_x.std().item() == pytest.approx(1.0, rel=1e-4)
        assert set(valid_y.tolist()) <= set(range(10))
    a, b = family.sample(0).train_data[0], family.sample(2).train_data[0]
    assert a.shape != b.shape or not torch.equal(a, b)


def test_digits_spec_choices_cover_the_options_and_can_be_fixed():
    family = DigitsMLPFamily()
    specs = [family.spec(seed) for seed in range(60)]
    assert {len(s.widths) for s in specs} == {1, 2}
    assert {w for s in specs for w in s.widths} == {16, 32, 64}
    assert {s.activation for s in specs} == {"relu", "tanh", "sigmoid", "elu"}
    assert {s.init_scale for s in specs} == {0.5, 1.0, 2.0}
    fixed = DigitsMLPFamily(widths=128, depths=3, activations="relu", init_scales=1.0)
    task = fixed.sample(7)
    assert fixed.spec(7).widths == (128, 128, 128)
    shapes = {k: tuple(v.shape) for k, v in task.init_params(0).items()}
    assert shapes == {
        "1.weight": (128, 64), "1.bias": (128,), "3.weight": (128, 128), "3.bias": (128,),
        "5.weight": (128, 128), "5.bias": (128,), "7.weight": (10, 128), "7.bias": (10,),
    }  # fmt: skip
    assert [type(m) for m in task.model if not isinstance(m, nn.Linear)] == [nn.Flatten] + [nn.ReLU] * 3


def test_init_scale_multiplies_weights_only():
    models = []
    for scale in (1.0, 2.0):
        torch.manual_seed(3)
        model = build_classifier(ClassifierSpec("mlp", (8,), "tanh", scale, 10), (4,), 3)
        models.append(dict(model.named_parameters()))
    for name, p in models[0].items():
        factor = 2.0 if name.endswith("weight") else 1.0
        torch.testing.assert_close(models[1][name], factor * p)


def test_cnn_channels_and_output_shape():
    family = DigitsCNNFamily(widths=(3, 5), depths=2, n_examples=100)
    spec = family.spec(0)
    task = family.sample(0)
    params = task.init_params(0)
    conv = [k for k in params if params[k].ndim == 4]
    assert [params[k].shape[0] for k in conv] == list(spec.widths)
    assert params[conv[0]].shape[1:] == (1, 3, 3)
    x, _ = next(task.train_batches(0))
    assert task.forward(params, x).shape == (x.shape[0], 10)
    assert params["6.weight"].shape == (10, spec.widths[-1] * 16)


def test_classifier_family_on_custom_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=generator)
    y = (x[:, 0] > 0).long()
    family = ClassifierFamily(x, y, name="toy", widths=4, depths=1, n_examples=40, batch_size=8)
    task = family.sample(0)
    assert task.name.startswith("toy:mlp[4,") and family.num_classes == 2
    assert next(task.train_batches(0))[0].shape == (8, 3)
    # the batch size is part of the name, which keys the baseline cache: another batch size is another task
    other = ClassifierFamily(x, y, name="toy", widths=4, depths=1, n_examples=40, batch_size=16).sample(0)
    assert other.name != task.name and "batch=16" in other.name


# -- sequences ------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_recurrent_lm_matches_torch_rnn_modules(cell):
    vocab, hidden = 7, 5
    model = RecurrentLM(vocab, hidden, cell)
    reference = (nn.GRU if cell == "gru" else nn.RNN)(vocab, hidden, batch_first=True)
    with torch.no_grad():
        reference.weight_ih_l0.copy_(model.w_in.T)
        reference.weight_hh_l0.copy_(model.w_h.T)
        reference.bias_ih_l0.copy_(model.b_in)
        reference.bias_hh_l0.copy_(model.b_h)
    tokens = torch.randint(vocab, (3, 6), generator=torch.Generator().manual_seed(1))
    states, _ = reference(nn.functional.one_hot(tokens, vocab).float())
    torch.testing.assert_close(model(tokens), model.readout(states))


def test_markov_text_follows_its_chain():
    ids = markov_text(3, 20000, 4, concentration=0.5)
    assert torch.equal(ids, markov_text(3, 20000, 4, concentration=0.5))
    assert not torch.equal(ids, markov_text(5, 20000, 4, concentration=0.5))
    assert ids.dtype == torch.long and ids.min() >= 0 and ids.max() <= 3
    rng = task_rng(3, 1)
    transitions = torch.from_numpy(rng.dirichlet([0.5] * 4, size=4))
    counts = torch.zeros(4, 4, dtype=torch.float64)
    counts.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1, dtype=torch.float64), accumulate=True)
    visited = counts.sum(1) > 500
    empirical = counts[visited] / counts[visited].sum(1, keepdim=True)
    torch.testing.assert_close(empirical, transitions[visited], rtol=0, atol=0.03)


def test_next_token_windows_shift_targets_by_one():
    x, y = next_token_windows(torch.arange(11), 3)
    assert torch.equal(x, torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]]))
    assert torch.equal(y, x + 1)


def test_char_rnn_on_a_text_folder(tmp_path):
    (tmp_path / "input.txt").write_text("to be or not to be, that is the question. " * 20, encoding="utf-8")
    family = CharRNNFamily(tmp_path, n_chars=400, seq_len=10, hidden_sizes=8)
    assert family.vocab_size == len(set("to be or not to be, that is the question. "))
    task = family.sample(0)
    assert "shakespeare" in task.name
    x, y = next(task.train_batches(0))
    assert x.shape == y.shape == (16, 10)
    metrics = task.metrics(task.init_params(0), (x, y))
    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["loss"] == pytest.approx(math.log(family.vocab_size), rel=0.2)
    assert family.sample(0).train_data[0].shape == task.train_data[0].shape
    with pytest.raises(ValueError, match="vocab_size applies"):
        CharRNNFamily(tmp_path, vocab_size=5)
    with pytest.raises(ValueError, match="exceeds"):
        CharRNNFamily(tmp_path, n_chars=10**6)


# -- registry and bad arguments -------------------------------------------------------------


def test_make_family_builds_registered_families():
    assert isinstance(make_family("quadratic", dim=3), QuadraticFamily)
    assert isinstance(make_family("char_rnn", n_chars=400), CharRNNFamily)
    assert {"quadratic", "digits_mlp", "digits_cnn", "char_rnn", "mnist_mlp"} <= set(FAMILIES)
    with pytest.raises(ValueError, match="accepted names"):
        make_family("imagenet")


BAD_POSITIVE_INT = st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.booleans(), st.text(max_size=2))


@settings(max_examples=25, deadline=None)
@given(dim=BAD_POSITIVE_INT)
def test_quadratic_rejects_bad_dim(dim):
    with pytest.raises(ValueError, match="dim"):
        QuadraticFamily(dim=dim)


@settings(max_examples=25, deadline=None)
@given(noise=st.one_of(st.floats(max_value=-1e-9), st.just(float("nan")), st.just(float("inf"))))
def test_quadratic_rejects_bad_noise(noise):
    with pytest.raises(ValueError, match="noise_std"):
        QuadraticFamily(noise_std=noise)


@settings(max_examples=25, deadline=None)
@given(seed=st.one_of(st.integers(max_value=-1), st.booleans(), st.floats(), st.none()))
def test_families_reject_bad_seeds(seed):
    with pytest.raises(ValueError, match="seed"):
        QuadraticFamily().sample(seed)
    with pytest.raises(ValueError, match="seed"):
        CharRNNFamily(n_chars=400).sample(seed)
    with pytest.raises(ValueError, match="seed"):
        QuadraticFamily().sample(0).init_params(seed)


@settings(max_examples=30, deadline=None)
@given(
    option=st.sampled_from(["widths", "depths", "init_scales", "n_examples", "batch_size"]),
    value=st.one_of(st.integers(max_value=0), st.just(()), st.just([0, 4]), st.just("a"), st.just(float("nan"))),
)
def test_digits_family_rejects_bad_options(option, value):
    with pytest.raises(ValueError, match=option):
        DigitsMLPFamily(**{option: value})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"activations": "swish"}, "accepted values"),
        ({"activations": ("relu", "swish")}, "swish"),
        ({"n_examples": 5000}, "exceed the 1797"),
        ({"n_examples": 2}, "no training or no validation"),
        ({"valid_fraction": 1.0}, "valid_fraction"),
        ({"valid_fraction": 0}, "valid_fraction"),
        ({"valid_fraction": "half"}, "valid_fraction"),
    ],
)
def test_digits_family_rejects_bad_choices(options, message):
    with pytest.raises(ValueError, match=message):
        DigitsMLPFamily(**options)


def test_classifier_family_rejects_bad_data():
    x, y = load_digits_tensors()
    with pytest.raises(ValueError, match="architecture"):
        ClassifierFamily(x, y, name="d", architecture="transformer")
    with pytest.raises(ValueError, match="same N"):
        ClassifierFamily(x, y[:-1], name="d")
    with pytest.raises(ValueError, match="N > 0"):
        ClassifierFamily(x[:0], y[:0], name="d")
    with pytest.raises(ValueError, match="needs images"):
        ClassifierFamily(x.flatten(1), y, name="d", architecture="cnn")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cells": "lstm"}, "accepted values"),
        ({"hidden_sizes": 0}, "hidden_sizes"),
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": -1}, "batch_size"),
        ({"n_chars": 30}, "fewer than seq_len"),
        ({"valid_fraction": 1.5}, "valid_fraction"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_char_rnn_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        CharRNNFamily(**options)


def test_recurrent_lm_and_markov_text_reject_bad_arguments():
    with pytest.raises(ValueError, match="accepted values"):
        RecurrentLM(5, 4, "lstm")
    with pytest.raises(ValueError, match="hidden_size"):
        RecurrentLM(5, 0)
    with pytest.raises(ValueError, match="concentration"):
        markov_text(0, 10, 3, concentration=0.0)
    with pytest.raises(ValueError, match="empty"):
        as_choices("widths", [])
    with pytest.raises(ValueError, match="task index"):
        QuadraticFamily().task(-1)
