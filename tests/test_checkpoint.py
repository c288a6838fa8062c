"""Checkpoint files: atomic writes, validated safe reads, clear errors."""

from collections import OrderedDict, defaultdict, namedtuple
import multiprocessing
import os
import pickle
import signal
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metaoptimizer
from metaoptimizer import checkpoint
from metaoptimizer.checkpoint import CheckpointError, atomic_save, load_checkpoint, save_checkpoint
from metaoptimizer.config import MetaOptimizerConfig, OptimizerState
from metaoptimizer.optim import LearnedOptimizer
from metaoptimizer.rules import hand

PAYLOAD = {
    "weights": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2, dtype=torch.float64)},
    "step": 7,
    "history": [1.5, 2.5],
    "pair": (torch.ones(1), None),
    "dtype": torch.bfloat16,
    "misc": OrderedDict(size=torch.Size([2, 3]), tags={"a", "b"}, raw=b"\x00", device=torch.device("cpu"), z=1j),
    "param": torch.nn.Parameter(torch.ones(2)),
}


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "run" / "ckpt.pt"
    save_checkpoint(path, kind="meta_train", payload=PAYLOAD, config=MetaOptimizerConfig().to_dict())
    return path


def test_round_trip_with_header(saved):
    loaded = load_checkpoint(saved, expected_kind="meta_train")
    assert loaded["format"] == "metaoptimizer" and loaded["kind"] == "meta_train"
    assert loaded["version"] == metaoptimizer.__version__
    assert MetaOptimizerConfig.from_dict(loaded["config"]) == MetaOptimizerConfig()
    assert_same({key: loaded[key] for key in PAYLOAD}, PAYLOAD)
    assert load_checkpoint(saved)["kind"] == "meta_train"


def test_config_may_be_none_and_map_location_is_used(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, kind="rule", payload={"w": torch.ones(2)})
    loaded = load_checkpoint(path, map_location="meta")
    assert loaded["config"] is None and loaded["w"].device.type == "meta"


def test_optimizer_state_survives_a_checkpoint(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = LearnedOptimizer(params, hand.Adam(lr=0.1))
    for _ in range(3):
        opt.zero_grad()
        (params[0] ** 2).sum().backward()
        opt.step()
    save_checkpoint(tmp_path / "o.pt", kind="optimizer", payload={"optimizer": opt.state_dict()})
    fresh = LearnedOptimizer([torch.nn.Parameter(params[0].detach().clone())], hand.Adam(lr=0.1))
    fresh.load_state_dict(load_checkpoint(tmp_path / "o.pt", "optimizer")["optimizer"])
    assert int(fresh.state[fresh.param_groups[0]["params"][0]]["step"]) == 3


# --- read errors -------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file at .*absent.pt"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(saved)


class Foreign:
    pass


@pytest.mark.parametrize(
    "write",
    [
        lambda path: torch.save({"weights": torch.ones(2)}, path),
        lambda path: torch.save(torch.ones(2), path),
        lambda path: torch.save({"format": "other", "kind": "x"}, path),
    ],
    ids=["dict", "tensor", "other-format"],
)
def test_foreign_torch_file(tmp_path, write):
    write(tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="torch file but not a metaoptimizer checkpoint"):
        load_checkpoint(tmp_path / "f.pt")


@pytest.mark.parametrize(
    "write",
    [
        lambda path: torch.save({"format": "metaoptimizer", "obj": Foreign()}, path),
        lambda path: path.write_bytes(pickle.dumps(Foreign(), protocol=2)),
    ],
    ids=["torch-save", "plain-pickle"],
)
def test_file_refused_by_weights_only(tmp_path, write):
    write(tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="objects that safe loading .*weights_only=True.* refuses"):
        load_checkpoint(tmp_path / "f.pt")


def test_wrong_kind(saved):
    with pytest.raises(CheckpointError, match="holds a 'meta_train' checkpoint, expected a 'rule' checkpoint"):
        load_checkpoint(saved, expected_kind="rule")


def write_header(path, **header):
    torch.save({"format": "metaoptimizer", "kind": "rule", "version": metaoptimizer.__version__, **header}, path)


@pytest.mark.parametrize("version", ["0.2.0", "1.0", "12.3.4"])
def test_newer_incompatible_version(tmp_path, version):
    write_header(tmp_path / "n.pt", version=version)
    with pytest.raises(CheckpointError, match=rf"metaoptimizer {version}.*newer.*upgrade"):
        load_checkpoint(tmp_path / "n.pt")


@pytest.mark.parametrize("version", ["0.0.3", "0.1.99", "0.1.0rc1"])
def test_older_or_patch_versions_load(tmp_path, version):
    write_header(tmp_path / "o.pt", version=version)
    assert load_checkpoint(tmp_path / "o.pt")["version"] == version


@pytest.mark.parametrize(
    ("header", "message"),
    [({"version": "banana"}, "unreadable version"), ({"kind": 3}, "damaged header"), ({"version": None}, "damaged")],
)
def test_damaged_header(tmp_path, header, message):
    write_header(tmp_path / "d.pt", **header)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "d.pt")


def test_a_truncated_large_checkpoint_says_truncated(tmp_path):
    """torch.load reports some truncations of a zip file as an OSError (``[Errno 22] Invalid argument``)."""
    path = tmp_path / "large.pt"
    save_checkpoint(path, kind="test", payload={"weights": torch.randn(4096)})
    data = path.read_bytes()
    for keep in (0.3, 0.6):
        path.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint(path)


def test_unreadable_file_is_reported(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("permission denied")

    monkeypatch.setattr("metaoptimizer.checkpoint.open", refuse, raising=False)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*permission denied"):
        load_checkpoint(saved)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_random_bytes_only_raise_checkpoint_error(tmp_path, data):
    path = tmp_path / "random.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 10**6), byte=st.integers(0, 255), cut=st.booleans())
def test_damaged_checkpoint_loads_or_raises_checkpoint_error(tmp_path, position, byte, cut):
    path = tmp_path / "damaged.pt"
    save_checkpoint(path, kind="rule", payload=PAYLOAD)
    data = bytearray(path.read_bytes())
    position %= len(data)
    if cut:
        del data[position:]
    else:
        data[position] = byte
    path.write_bytes(bytes(data))
    try:
        load_checkpoint(path)
    except CheckpointError:
        pass


# --- write validation ---------------------------------------------------------------------------

Pair = namedtuple("Pair", "a b")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kind": ""}, ValueError, "kind must be a non-empty string"),
        ({"kind": None}, ValueError, "kind must be a non-empty string"),
        ({"payload": [1]}, TypeError, "payload must be a dict"),
        ({"config": MetaOptimizerConfig()}, TypeError, "config must be a dict or None"),
        ({"payload": {"version": 2}}, ValueError, r"payload keys \['version'\] are reserved"),
        ({"payload": {"state": OptimizerState()}}, TypeError, r"checkpoint\['state'\] is a OptimizerState.*to_dict"),
        ({"payload": {"nested": [{"f": print}]}}, TypeError, r"checkpoint\['nested'\]\[0\]\['f'\] is a builtin"),
        ({"payload": {"keys": {print: 3}}}, TypeError, r"a key of checkpoint\['keys'\] is a builtin"),
        ({"payload": {"pair": Pair(1, 2)}}, TypeError, r"checkpoint\['pair'\] is a Pair"),
        ({"payload": {"counts": defaultdict(int)}}, TypeError, r"checkpoint\['counts'\] is a defaultdict"),
    ],
)
def test_bad_save_arguments_write_nothing(tmp_path, kwargs, error, message):
    arguments = {"kind": "rule", "payload": {}, "config": None, **kwargs}
    with pytest.raises(error, match=message):
        save_checkpoint(tmp_path / "x.pt", **arguments)
    assert not (tmp_path / "x.pt").exists()


# --- atomic writes ------------------------------------------------------------------------------


def test_atomic_save_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "x.pt"
    atomic_save({"v": 1}, path)
    atomic_save({"v": 2}, str(path))
    assert torch.load(path, weights_only=True) == {"v": 2}
    assert os.listdir(path.parent) == ["x.pt"]


def test_failed_replace_keeps_previous_checkpoint(saved, monkeypatch):
    before = saved.read_bytes()

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(saved, kind="meta_train", payload={"step": 8})
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


def test_interrupt_during_serialisation_keeps_previous_checkpoint(saved, monkeypatch):
    before = saved.read_bytes()

    def partial_then_interrupt(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", partial_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(saved, kind="meta_train", payload={"step": 8})
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


def _write_then_stall(path, written):
    """Child process: write a new checkpoint but stall (forever) before it is renamed into place."""

    def stall(fd):
        written.set()
        time.sleep(600)

    checkpoint.os.fsync = stall
    save_checkpoint(path, kind="meta_train", payload={"w": torch.zeros(100_000)})


@pytest.mark.skipif(sys.platform != "linux", reason="uses fork and SIGKILL")
def test_sigkill_during_write_keeps_previous_checkpoint(saved):
    """A process killed after writing the temp file but before the rename leaves the old file."""
    context = multiprocessing.get_context("fork")
    written = context.Event()
    child = context.Process(target=_write_then_stall, args=(saved, written))
    child.start()
    try:
        assert written.wait(timeout=60)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    assert_same(load_checkpoint(saved, "meta_train")["weights"], PAYLOAD["weights"])
    leftovers = [name for name in os.listdir(saved.parent) if name != saved.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.pt.") and leftovers[0].endswith(".tmp")
