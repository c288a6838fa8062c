"""Fast paths of the hand rules under autograd, pinned to their reference forms: Adam's one-node
update (values and derivatives), the unchecked hyperparameter copy, the direct MLP forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metaoptimizer.meta.hyperparams import LearnedHyperparameters
from metaoptimizer.rules import hand
from metaoptimizer.rules.base import apply_updates
from metaoptimizer.rules.hand import Adam, AdamW, RMSProp
from metaoptimizer.tasks import base
from metaoptimizer.tasks.base import ModuleTask

SHAPES = {"w": (4, 3), "b": (4,), "v": (2, 4)}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


def start(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g, dtype=dtype) for name, shape in SHAPES.items()}


def loss_fn(params, step, dead=True):
    x = (torch.linspace(-1, 1, 3, dtype=params["w"].dtype) + 0.3) * (1 + step)
    h = torch.tanh(params["w"] @ x + params["b"])
    # With ``dead``, v[:, 3] has a zero gradient (second moment 0): the case eps_root is for.
    return (params["v"][:, :3] @ h[:3]).square().sum() + h.square().mean() + (0 if dead else h[3]) * params["v"][:, 3].sum()


def trajectory(rule, dtype, steps=6, learn=None, dead=True):
    """A second-order unroll: parameters after ``steps`` updates and d(sum of losses)/d(learned tensors)."""
    params = {n: p.requires_grad_(True) for n, p in start(dtype).items()}
    state = rule.init(params)
    total = 0
    for step in range(steps):
        loss = loss_fn(params, step, dead)
        total = total + loss
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True), strict=True))
        updates, state = rule.update(grads, state, params)
        params = apply_updates(params, updates)
    total = total + loss_fn(params, steps, dead)
    learned = list(learn or [])
    derivatives = torch.autograd.grad(total, learned) if learned else []
    return params, state, list(derivatives)


def reference_path(monkeypatch):
    monkeypatch.setattr(Adam, "_records_one_node", lambda self, grads, slots: False)


def assert_close(a, b, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "make",
    [
        lambda lr: Adam(lr=lr),
        lambda lr: Adam(lr=lr, betas=(0.8, 0.99), eps=1e-6, eps_root=1e-12, weight_decay=0.01),
        lambda lr: Adam(lr=lr, eps_root=0.0, eps=1e-3),
        lambda lr: Adam(lr=lr, eps=0.0, eps_root=1e-10),
        lambda lr: AdamW(lr=lr, weight_decay=0.1),
    ],
    ids=["default", "coupled_decay", "eps_root_0", "eps_0", "adamw"],
)
def test_one_node_adam_matches_the_reference_form(make, dtype, monkeypatch):
    def run():
        lr = torch.tensor(0.05, dtype=dtype, requires_grad=True)
        rule = make(lr)
        # eps_root=0 makes a zero second moment's meta-gradient NaN on both paths: no dead unit there.
        params, state, (d_lr,) = trajectory(rule, dtype, learn=[lr], dead=hand._value(rule.eps_root) > 0)
        return params, state, d_lr

    fast_params, fast_state, fast_d_lr = run()
    reference_path(monkeypatch)
    ref_params, ref_state, ref_d_lr = run()
    assert fast_d_lr != 0 and torch.isfinite(fast_d_lr)
    assert_close(fast_d_lr, ref_d_lr, dtype)
    for name in SHAPES:
        assert_close(fast_params[name], ref_params[name], dtype)
        for slot in ("exp_avg", "exp_avg_sq"):
            assert_close(fast_state.slots[slot][name], ref_state.slots[slot][name], dtype)


def test_one_node_adam_is_what_autograd_records():
    lr = torch.tensor(0.05, requires_grad=True)
    params = {n: p.requires_grad_(True) for n, p in start(torch.float32).items()}
    rule = Adam(lr=lr)
    grads = dict(zip(params, torch.autograd.grad(loss_fn(params, 0), list(params.values()), create_graph=True), strict=True))
    updates, state = rule.update(grads, rule.init(params), params)
    nodes = {type(t.grad_fn).__name__ for t in (*updates.values(), *state.slots["exp_avg"].values())}
    assert nodes == {"_AdamStepBackward"}
    with torch.no_grad():  # nothing recorded: the reference form, bitwise as before
        plain, _ = rule.update(grads, rule.init(params), params)
    assert all(u.grad_fn is None for u in plain.values())
    amsgrad, _ = Adam(lr=lr, amsgrad=True).update(grads, Adam(amsgrad=True).init(params), params)
    assert all(type(u.grad_fn).__name__ != "_AdamStepBackward" for u in amsgrad.values())


def test_learned_betas_and_eps_take_the_reference_form(monkeypatch):
    """Only lr (and the weight decay, outside the node) may require grad on the fast path."""
    def run():
        beta1 = torch.tensor(0.85, dtype=torch.float64, requires_grad=True)
        eps = torch.tensor(1e-4, dtype=torch.float64, requires_grad=True)
        _, _, derivatives = trajectory(Adam(lr=0.05, betas=(beta1, 0.99), eps=eps), torch.float64, learn=[beta1, eps])
        return derivatives

    fast = run()
    reference_path(monkeypatch)
    for a, b in zip(fast, run(), strict=True):
        assert_close(a, b, torch.float64)


def node_inputs(lr_requires_grad=True):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in SHAPES.values()]
    moments = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in SHAPES.values()]
    second = [torch.rand(shape, generator=g, dtype=torch.float64) for shape in SHAPES.values()]
    second[0][0, 0] = 0.0  # a zero second moment: finite through eps_root
    lr = torch.tensor(0.02, dtype=torch.float64, requires_grad=lr_requires_grad)
    return lr, [t.requires_grad_(True) for t in (*tensors, *moments, *second)]


@pytest.mark.parametrize("constants", [(0.9, 0.999, 0.271, 0.002997, 1e-16, 1e-8), (0.8, 0.99, 0.2, 0.01, 0.0, 1e-3)])
def test_one_node_adam_passes_gradcheck_and_gradgradcheck(constants):
    """First derivatives by hand, second ones by autograd through the reference form: both exact."""
    lr, tensors = node_inputs()
    count = len(SHAPES)

    def node(lr, *tensors):
        return hand._AdamStep.apply(lr, constants, count, *tensors)

    assert torch.autograd.gradcheck(node, (lr, *tensors))
    assert torch.autograd.gradgradcheck(node, (lr, *tensors))

    def moments_only(lr, *tensors):  # outputs without incoming gradients (the last step's state)
        return node(lr, *tensors)[count:2 * count]

    assert torch.autograd.gradcheck(moments_only, (lr, *tensors))


@pytest.mark.parametrize("lr", [0.02, 1])
def test_one_node_adam_with_a_number_lr(lr):
    lr_tensor, tensors = node_inputs()
    count, constants = len(SHAPES), (0.9, 0.999, 0.19, 0.002, 1e-16, 1e-8)
    assert torch.autograd.gradcheck(lambda *t: hand._AdamStep.apply(lr, constants, count, *t), tuple(tensors))
    with torch.no_grad():
        lr_tensor.fill_(lr)
    for a, b in zip(
        hand._AdamStep.apply(lr, constants, count, *tensors), hand._AdamStep.apply(lr_tensor, constants, count, *tensors)
    ):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


def test_unchecked_hyperparameters_copy_the_rule():
    template = RMSProp(lr=0.1, momentum=0.5)
    lr = torch.tensor(0.2, requires_grad=True)
    rule = template.with_unchecked_hyperparameters(lr=lr)
    assert rule.lr is lr and template.lr == 0.1 and rule.momentum == 0.5 and rule is not template
    with pytest.raises(ValueError, match=r"RMSProp has no hyperparameters \['beta'\]"):
        template.with_unchecked_hyperparameters(beta=0.5)


def test_learned_adam_lr_takes_the_one_node_path():
    rule = LearnedHyperparameters("adam", lr=0.01, learn=("lr",))
    params = {n: p.requires_grad_(True) for n, p in start(torch.float32).items()}
    grads = {n: torch.ones_like(p) for n, p in params.items()}
    updates, _ = rule.update(grads, rule.init(params), params)
    assert {type(u.grad_fn).__name__ for u in updates.values()} == {"_AdamStepBackward"}
    assert rule.template.lr == 0.01  # the template is never changed


def mlp(bias_last=True):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3, bias=bias_last))


@pytest.mark.parametrize("factory", [mlp, lambda: mlp(bias_last=False)], ids=["bias", "no_bias"])
def test_direct_mlp_forward_is_functional_call(factory):
    """Same numbers and same second-order gradients as ``functional_call``, bitwise."""
    x = torch.randn(16, 3, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    task = ModuleTask("mlp", factory, (x, y), (x, y))
    params = {n: p.requires_grad_(True) for n, p in task.init_params(0).items()}

    def reference(params, batch):
        return F.cross_entropy(functional_call(task.model, params, (batch[0],)), batch[1])

    def value_and_derivatives(loss):
        value = loss(params, (x, y))
        grads = torch.autograd.grad(value, list(params.values()), create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), list(params.values()))
        return (value, *grads, *second)

    for a, b in zip(value_and_derivatives(task.loss), value_and_derivatives(reference), strict=True):
        assert torch.equal(a, b)


def test_other_models_and_partial_params_use_functional_call():
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    with_buffers = ModuleTask("bn", lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)), (x, y), (x, y))
    params = with_buffers.init_params(0)
    assert torch.equal(with_buffers.forward(params, x), functional_call(with_buffers.model, params, (x,)))
    task = ModuleTask("mlp", lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), (x, y), (x, y))
    partial = {"2.weight": torch.zeros(2, 3), "2.bias": torch.ones(2)}  # the rest from the module, as functional_call does
    assert torch.equal(task.forward(partial, x), torch.ones(6, 2))
    hooked = ModuleTask("hooked", lambda: nn.Sequential(nn.Linear(4, 2)), (x, y), (x, y))
    hooked.forward(hooked.init_params(0), x)  # the direct forward is set up; a hook added later still counts
    hooked.model[0].register_forward_hook(lambda module, args, out: out * 0)
    assert torch.equal(hooked.forward(hooked.init_params(0), x), torch.zeros(6, 2))
    params = task.init_params(0)
    task.forward(params, x)
    task.model[1] = nn.Tanh()  # a layer replaced after the first forward
    assert torch.equal(task.forward(params, x), functional_call(task.model, params, (x,)))
    assert not torch.equal(task.forward(params, x), torch.relu(x @ params["0.weight"].T + params["0.bias"]) @ params["2.weight"].T + params["2.bias"])


def test_named_sequential_layers_take_the_direct_forward():
    from collections import OrderedDict

    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    factory = lambda: nn.Sequential(OrderedDict(hidden=nn.Linear(4, 3), act=nn.Tanh(), out=nn.Linear(3, 2)))  # noqa: E731
    task = ModuleTask("named", factory, (x, y), (x, y))
    params = task.init_params(0)
    assert torch.equal(task.forward(params, x), functional_call(task.model, params, (x,)))
    assert base._linear_stack(task.model).parameter_names == ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]
