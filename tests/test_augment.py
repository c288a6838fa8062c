import math

import pytest
import torch
from torch.func import grad

from metaoptimizer.meta._vectorized import loss_signature
from metaoptimizer.tasks import make_family
from metaoptimizer.tasks.augment import ReparamFamily, ReparamTask
from metaoptimizer.tasks.image8 import Digits8Family, Synthetic8Family
from metaoptimizer.tasks.quadratic import QuadraticFamily


@pytest.fixture(scope="module")
def digits():
    return Digits8Family(hidden=8, n_examples=300)


def _scales(family, seed):
    return family.sample(seed).scales


@pytest.mark.parametrize("level", ["global", "tensor", "parameter"])
def test_the_reparameterised_task_is_the_same_problem(digits, level):
    task = ReparamFamily(digits, levels=level).sample(4)
    inner = digits.sample(4)
    batch = next(task.train_batches(1))
    original = inner.init_params(4)
    params = task.init_params(4)
    for name, p in params.items():
        torch.testing.assert_close(p * task.scales[name], original[name])
    assert task.loss(params, batch) == pytest.approx(float(inner.loss(original, batch[0])), rel=1e-5)
    # The optimizer's gradient is the original one times the scale (chain rule of p = p' * s).
    ours = grad(task.loss)(params, batch)
    theirs = grad(inner.loss)(original, batch[0])
    for name in params:
        torch.testing.assert_close(ours[name], theirs[name] * task.scales[name], rtol=1e-4, atol=1e-6)


def test_levels_share_scales_as_documented(digits):
    none = _scales(ReparamFamily(digits, levels="none"), 2)
    assert all(bool((s == 1).all()) for s in none.values())
    one = _scales(ReparamFamily(digits, levels="global"), 2)
    assert len({float(v) for s in one.values() for v in s.flatten()}) == 1
    per_tensor = _scales(ReparamFamily(digits, levels="tensor"), 2)
    values = [float(s.flatten()[0]) for s in per_tensor.values()]
    assert all(bool((s == s.flatten()[0]).all()) for s in per_tensor.values()) and len(set(values)) == len(values)
    per_parameter = _scales(ReparamFamily(digits, levels="parameter"), 2)
    assert all(s.unique().numel() == s.numel() for s in per_parameter.values())


def test_scales_are_log_uniform_in_the_range_and_seeded(digits):
    family = ReparamFamily(digits, levels="parameter", scale_range=(1e-3, 1e3))
    logs = torch.cat([s.flatten() for s in _scales(family, 6).values()]).log10()
    assert logs.min() >= -3 and logs.max() <= 3
    assert abs(float(logs.mean())) < 0.2 and float(logs.std()) == pytest.approx(6 / math.sqrt(12), rel=0.1)
    again = _scales(family, 6)
    assert all(torch.equal(again[k], v) for k, v in _scales(family, 6).items())
    assert not torch.equal(_scales(family, 8)["1.weight"], again["1.weight"])


def test_each_task_draws_its_level_from_the_list(digits):
    family = ReparamFamily(digits, levels=("none", "global", "tensor", "parameter"))
    levels = {family.sample(seed).level for seed in range(40)}
    assert levels == {"none", "global", "tensor", "parameter"}


def test_augmented_tasks_of_one_architecture_share_a_vmapped_call(digits):
    family = ReparamFamily(digits)
    a, b = family.sample(0), family.sample(1)
    assert loss_signature(a) == loss_signature(b) == (ReparamTask, loss_signature(digits.sample(0)))
    assert loss_signature(ReparamFamily(Synthetic8Family(hidden=8)).sample(0)) == loss_signature(a)
    assert loss_signature(ReparamFamily(digits).sample(0)) != loss_signature(ReparamFamily(Digits8Family()).sample(0))


def test_a_task_that_cannot_be_vmapped_stays_alone_when_augmented(digits):
    task = ReparamFamily(digits).sample(0)
    task.task.loss_signature = lambda: None
    assert loss_signature(task) is None


def test_any_family_takes_the_augment_option():
    family = make_family("quadratic", dim=3, augment={"levels": ["global"], "scale_range": [0.1, 10.0]})
    assert isinstance(family, ReparamFamily) and isinstance(family.family, QuadraticFamily)
    task = family.sample(0)
    assert isinstance(task, ReparamTask) and 0.1 <= float(task.scales["theta"][0]) <= 10.0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"levels": "layer"}, "levels choice 'layer'"),
        ({"scale_range": (1.0,)}, "scale_range must be a pair"),
        ({"scale_range": (10.0, 1.0)}, "low <= high"),
        ({"scale_range": (0.0, 1.0)}, "scale_range bound"),
    ],
)
def test_bad_augmentation_options(digits, options, match):
    with pytest.raises(ValueError, match=match):
        ReparamFamily(digits, **options)


def test_bad_augment_option_and_family():
    with pytest.raises(ValueError, match="augment must be a table"):
        make_family("quadratic", augment=["global"])
    with pytest.raises(TypeError, match="family must be a TaskFamily"):
        ReparamFamily("digits")
