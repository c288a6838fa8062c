"""The broader meta-training families (tasks/broad.py): seeded, tiny, augmentable, vmappable, and
never a task of the general evaluation suite."""

import math
import tomllib
from pathlib import Path

import pytest
import torch

from metaoptimizer.meta._vectorized import UnrollJob, flatten_meta, loss_signature, run_jobs
from metaoptimizer.rules.celo import CeloRule
from metaoptimizer.tasks import HELDOUT, TRAIN, make_family
from metaoptimizer.tasks.augment import ReparamTask
from metaoptimizer.tasks.broad import FOLDED_VOCAB, BroadImageFamily, CaseFoldedLMFamily, fold_text
from metaoptimizer.tasks.general import GENERAL_TASKS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="the shared data folder (../shared/data) is absent")


def _count(task) -> int:
    return sum(p.numel() for p in task.init_params(0).values())


def test_digits_family_draws_seeded_architectures_within_the_parameter_cap():
    family = BroadImageFamily("digits", max_params=20_000)
    specs = [family.spec(seed) for seed in range(40)]
    assert {len(s.widths) for s in specs} == {1, 2, 3}
    assert len({s.activation for s in specs}) >= 4 and max(max(s.widths) for s in specs) >= 128
    for seed in (0, 7):
        task, again = family.sample(seed), family.sample(seed)
        assert task.name == again.name and torch.equal(task.train_data[0], again.train_data[0])
        assert _count(task) <= 20_000
        x, y = next(task.train_batches(0))
        assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
        assert 1.0 < float(task.loss(task.init_params(0), (x, y))) < 8.0
    assert not torch.equal(family.sample(1).train_data[0], family.sample(2).train_data[0])


def test_fixed_architecture_tasks_share_one_loss_function_and_general_stacks_are_redrawn():
    family = BroadImageFamily("digits", depths=2, widths=64, activations=("tanh", "relu"))
    # (64, 64) tanh is the general suite's regressor stack: only ReLU is ever drawn.
    assert {family.spec(seed).activation for seed in range(20)} == {"relu"}
    fixed = BroadImageFamily("digits", depths=2, widths=32, activations="elu", init_scales=(0.5, 2.0))
    assert loss_signature(fixed.sample(0)) == loss_signature(fixed.sample(5)) is not None
    with pytest.raises(ValueError, match="general-suite MLPs"):
        BroadImageFamily("digits", depths=1, widths=256, activations="tanh").sample(0)


def test_cnn_tasks_and_bad_options():
    family = BroadImageFamily("digits", architecture="cnn", depths=(1, 2))
    task = family.sample(3)
    assert "Conv2d" in repr(task.model) and "AvgPool2d" in repr(task.model) and _count(task) <= 20_000
    for options, match in [
        ({"source": "mnist"}, "source='mnist' is not supported"),
        ({"architecture": "rnn"}, "architecture='rnn'"),
        ({"image_size": 16}, "digits are 8x8"),
        ({"n_examples": 5000}, "exceeds the 1797"),
        ({"activations": "swish"}, "activations choice 'swish'"),
        ({"max_params": 0}, "max_params"),
    ]:
        with pytest.raises(ValueError, match=match):
            BroadImageFamily(**options)


def test_augmented_broad_tasks_keep_their_loss_signature():
    family = make_family("broad_image", source="digits", depths=1, widths=16, activations="gelu",
                         augment={"levels": ["parameter"], "scale_range": [1e-2, 1e2]})
    task = family.sample(4)
    assert isinstance(task, ReparamTask) and task.level == "parameter"
    assert loss_signature(task) == loss_signature(family.sample(6)) is not None


def test_fold_text_maps_to_the_29_token_alphabet():
    assert len(FOLDED_VOCAB) == 29
    ids = fold_text("Hi, you!\nz")
    assert "".join(FOLDED_VOCAB[i] for i in ids.tolist()) == "hi. you.\nz"


@needs_data
def test_omniglot_evaluation_and_mnist_test_tasks():
    omniglot = BroadImageFamily("omniglot_eval", DATA, depths=1, widths=32, activations="tanh")
    task = omniglot.sample(2)
    assert task.train_data[0].shape[1:] == (1, 16, 16)
    assert len(task.train_data[0]) + len(task.valid_data[0]) == 200 and ",n=200]" in task.name
    assert set(task.train_data[1].tolist()) == set(range(10))
    mnist = BroadImageFamily("mnist_test", DATA, n_examples=600)
    assert mnist.sample(1).train_data[0].shape == (480, 1, 10, 10)


@needs_data
def test_lm_tasks_are_seeded_and_vmap_like_their_single_runs():
    family = CaseFoldedLMFamily(DATA, models=("gru", "transformer"), hidden_sizes=8, n_chars=2048)
    task = family.sample(0)
    x, y = next(task.train_batches(0))
    assert x.shape == (16, 24) and int(x.max()) < 29
    loss = float(task.loss(task.init_params(0), (x, y)))
    assert abs(loss - math.log(29)) < 0.5
    assert torch.equal(family.sample(0).train_data[0], task.train_data[0])
    gru = [family.sample(s) for s in range(12) if "gru" in family.sample(s).name][:2]
    assert len(gru) == 2 and loss_signature(gru[0]) == loss_signature(gru[1]) is not None
    rule = CeloRule.pretrained()
    theta = flatten_meta(rule)
    members = torch.stack([theta, theta + 0.01 * torch.randn_like(theta)])
    jobs = []
    for task in gru:
        params = task.init_params(1)
        batches = [b for _, b in zip(range(4), task.train_batches(1), strict=False)]
        jobs.append(UnrollJob(task, members, params, rule.init(params, num_steps=10), batches))
    with torch.no_grad():
        vmapped = run_jobs(rule, jobs, vectorize=True)
        single = run_jobs(rule, jobs, vectorize=False)
    for a, b in zip(vmapped, single, strict=True):
        torch.testing.assert_close(a.meta_losses, b.meta_losses, rtol=1e-4, atol=1e-5)


def _fingerprint(task) -> tuple:
    """What makes two tasks the same problem: the network, the input shape and the data source."""
    inner = task.task if isinstance(task, ReparamTask) else task
    x = inner.train_data[0]
    parts = inner.name.split(":")
    if parts[0] == "general":
        source = parts[2]  # mnist, omniglot, synthetic, friedman1, shakespeare; digits, markov without data
    elif parts[0].startswith("broad_"):
        source = parts[1].rstrip("0123456789")  # digits, omniglot_eval, mnist_test
    else:
        source = "shakespeare_casefolded"
    return repr(inner.model), tuple(x.shape[1:]), source


@needs_data
def test_no_broad_task_is_a_general_suite_task():
    """The hard rule: meta-training and meta-validation tasks are never general-suite tasks, with the
    suite on its data folder or on its fallback data (digits, Markov text)."""
    general = []
    for name, build in GENERAL_TASKS.items():
        for root in (DATA, None):
            general.append(build(1, root))
    general_models = {repr(t.model) for t in general}
    general_keys = {_fingerprint(t) for t in general}
    general_sources = {key[2] for key in general_keys}
    assert "digits" in general_sources and "mnist" in general_sources
    config = tomllib.loads((ROOT / "configs" / "celo_plus.toml").read_text())
    entries = [e for e in config["families"] if e["name"] in ("broad_image", "shakespeare_lc_lm")]
    entries += [{"name": "broad_image", "source": s} for s in ("digits", "omniglot_eval", "mnist_test")]
    entries += [{"name": "broad_image", "source": "digits", "architecture": "cnn"},
                {"name": "shakespeare_lc_lm", "n_chars": 2048}]
    for entry in entries:
        options = {k: v for k, v in entry.items() if k not in ("name", "estimator")}
        if entry["name"] != "broad_image" or options.get("source", "digits") != "digits":
            options["root"] = DATA
        family = make_family(entry["name"], **options)
        for split in (TRAIN, HELDOUT):
            for index in range(12):
                task = family.task(index, split)
                assert not task.name.startswith("general")
                assert _fingerprint(task) not in general_keys
                # a network the suite also trains only ever runs here on data the suite never uses
                model, _, source = _fingerprint(task)
                if model in general_models:
                    assert source not in general_sources
