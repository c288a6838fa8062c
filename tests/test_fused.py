"""The fused (pointwise) per-coordinate MLP: same numbers and gradients as the matrix form.

Compiling takes minutes on this CPU, so the compiled kernels are checked against the eager ones
by ``benchmarks/bench_scaling.py check`` rather than here; these tests pin the pointwise form
that the compiler receives, and the backend selection.
"""

from __future__ import annotations

import pytest
import torch

from metaoptimizer.rules.features import factored_pass, tensor_statistics
from metaoptimizer.rules.fused import compiled, mlp_pointwise
from metaoptimizer.rules.mlp import TensorPasses, mlp_matmul, tensor_update


def _network(num_features: int, hidden: int, layers: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(4)
    sizes = [num_features] + [hidden] * layers + [2]
    weights = [
        (torch.randn(i, o, generator=generator, dtype=dtype), torch.randn(o, generator=generator, dtype=dtype))
        for i, o in zip(sizes[:-1], sizes[1:], strict=True)
    ]
    return weights, torch.randn(num_features, generator=generator, dtype=dtype)


@pytest.mark.parametrize(("hidden", "layers"), [(4, 0), (4, 1), (3, 2), (8, 3)])
def test_pointwise_mlp_equals_the_matrix_form(hidden, layers):
    features = [torch.randn(37, dtype=torch.float64) for _ in range(5)]
    weights, skip = _network(5, hidden, layers)
    for got, expected in zip(mlp_pointwise(features, weights, skip), mlp_matmul(features, weights, skip), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_pointwise_mlp_matches_in_float32_to_rounding():
    features = [torch.randn(1000) for _ in range(6)]
    weights, skip = _network(6, 4, 2, torch.float32)
    for got, expected in zip(mlp_pointwise(features, weights, skip), mlp_matmul(features, weights, skip), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pointwise_mlp_has_the_same_gradients():
    features = [torch.randn(20, dtype=torch.float64) for _ in range(4)]
    weights, skip = _network(4, 3, 2)
    leaves = [t.requires_grad_() for pair in weights for t in pair] + [skip.requires_grad_()]

    def grads(evaluate):
        direction, magnitude = evaluate(features, weights, skip)
        return torch.autograd.grad((direction * magnitude.exp()).sum(), leaves)

    for got, expected in zip(grads(mlp_pointwise), grads(mlp_matmul), strict=True):
        torch.testing.assert_close(got, expected)


def test_compiled_is_cached_per_function():
    assert compiled(mlp_pointwise) is compiled(mlp_pointwise)
    assert compiled(mlp_pointwise) is not compiled(mlp_matmul)


def test_backend_selection():
    eager = TensorPasses.select("matmul", autograd=False)
    assert (eager.factored, eager.statistics, eager.update, eager.pointwise) == (
        factored_pass, tensor_statistics, tensor_update, False
    )
    assert TensorPasses.select("pointwise", autograd=True).pointwise
    fused = TensorPasses.select("compiled", autograd=False)
    assert fused.pointwise and fused.update is compiled(tensor_update)
    assert fused.statistics is compiled(tensor_statistics) and fused.factored is compiled(factored_pass)
    # Under autograd the compiled backend falls back to the differentiable matrix form.
    assert TensorPasses.select("compiled", autograd=True) == eager


def test_a_compiled_step_falls_back_to_eager_once_with_a_warning(monkeypatch):
    from metaoptimizer.rules import fused

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    step = fused.CompiledStep(mlp_pointwise)
    monkeypatch.setattr(step, "compiled", broken)
    features = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    weights, skip = _network(3, 2, 1)
    with pytest.warns(RuntimeWarning, match="running the eager step from now on"):
        got = step(features, weights, skip)
    for a, b in zip(got, mlp_pointwise(features, weights, skip), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert step.failed is not None
    with pytest.raises(TypeError):  # an error in the inputs still raises, from the eager function
        step([*features[:-1], "not a tensor"], weights, skip)
