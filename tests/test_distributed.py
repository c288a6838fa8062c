"""Two processes on loopback (gloo, FileStore) give exactly the single-process result."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metaoptimizer.meta import distributed
from metaoptimizer.meta.distributed import (
    SingleProcess,
    TorchDistributed,
    communicator_from_environment,
    init_distributed,
    launched_by_torchrun,
)
from metaoptimizer.meta.estimators import PES, TruncatedBPTT
from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.meta._vectorized import flatten_meta
from metaoptimizer.rules.lstm import LSTMRule
from metaoptimizer.tasks.quadratic import QuadraticFamily

STEPS = 3
ESTIMATORS = {
    "tbptt": lambda: TruncatedBPTT(),
    "pes": lambda: PES(sigma=0.05, num_pairs=2, vectorize=False),
    "pes_vmap": lambda: PES(sigma=0.05, num_pairs=2, vectorize=True),
}


def _train(name, communicator=None):
    """A short meta-training run; returns (results, meta-parameters, full trainer state)."""
    torch.manual_seed(0)
    trainer = MetaTrainer(
        LSTMRule(hidden_size=4), QuadraticFamily(dim=3), unroll_steps=2, run_steps=4, tasks_per_step=4,
        meta_lr=0.01, min_run_steps=2, estimator=ESTIMATORS[name](), communicator=communicator,
    )
    results = trainer.train(STEPS)
    return results, flatten_meta(trainer.rule), trainer.state_dict()


def _worker(rank, world_size, store_path, out_dir):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        communicator = TorchDistributed()
        for name in ESTIMATORS:
            results, theta, state = _train(name, communicator)
            if rank == 0:
                torch.save({"results": results, "theta": theta, "state": state}, os.path.join(out_dir, f"{name}.pt"))
        communicator.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_process_results():
    return {name: _train(name) for name in ESTIMATORS}


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory, one_process_results):
    # Forked after the single-process runs, the workers inherit torch's lazily imported modules.
    out = tmp_path_factory.mktemp("distributed")
    mp.start_processes(_worker, args=(2, str(out / "store"), str(out)), nprocs=2, join=True, start_method="fork")
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in ESTIMATORS}


@pytest.mark.parametrize("name", ["tbptt", "pes"])
def test_two_processes_equal_one_process_bit_for_bit(one_process_results, two_process_results, name):
    results, theta, state = one_process_results[name]
    other = two_process_results[name]
    assert other["results"] == results  # losses, gradient norms, counters: identical floats
    assert torch.equal(other["theta"], theta)
    assert [run["slot"] for run in other["state"]["runs"]] == [0, 1, 2, 3]
    for a, b in zip(state["runs"], other["state"]["runs"], strict=True):
        assert a.keys() == b.keys() and a["task_index"] == b["task_index"]
        assert "params" not in a or torch.equal(a["params"]["theta"], b["params"]["theta"])  # absent: not started
        assert torch.equal(a["generator"], b["generator"])


def test_two_processes_match_one_process_when_vmapped(one_process_results, two_process_results):
    """vmap batches 2 tasks per process instead of 4: equal up to float round-off."""
    results, theta, _ = one_process_results["pes_vmap"]
    other = two_process_results["pes_vmap"]
    assert [r.meta_loss for r in other["results"]] == pytest.approx([r.meta_loss for r in results], rel=1e-5)
    torch.testing.assert_close(other["theta"], theta, rtol=1e-4, atol=1e-6)


def test_a_single_process_state_loads_into_any_process_count(one_process_results, two_process_results):
    """The gathered state is process-count independent: a 1-process trainer resumes a 2-process run."""
    _, theta, _ = one_process_results["tbptt"]
    trainer = MetaTrainer(LSTMRule(hidden_size=4), QuadraticFamily(dim=3), unroll_steps=2, run_steps=4,
                          tasks_per_step=4, meta_lr=0.01, min_run_steps=2)
    trainer.load_state_dict(two_process_results["tbptt"]["state"])
    assert torch.equal(flatten_meta(trainer.rule), theta)
    assert len(trainer.runs) == 4


def test_environment_helpers(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_torchrun()
    assert isinstance(communicator_from_environment(), SingleProcess)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_distributed()
    with pytest.raises(RuntimeError, match="not initialised"):
        TorchDistributed()
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.setenv(name, "0")
    assert launched_by_torchrun()
    with pytest.raises(ValueError, match="accepted values"):
        init_distributed(backend="mpi")
    distributed.shutdown()  # nothing joined: a no-op


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_distributed_from_torchrun_environment(monkeypatch):
    """A one-process group joined as torchrun would: env:// rendezvous on loopback, gloo."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    communicator = communicator_from_environment(backend="gloo")
    try:
        assert isinstance(communicator, TorchDistributed)
        assert (communicator.rank, communicator.world_size, communicator.device) == (0, 1, torch.device("cpu"))
        t = torch.arange(3.0)
        total = communicator.all_reduce_sum(t)
        assert torch.equal(total, t) and total is not t
        assert communicator.all_gather_object([1, "a"]) == [[1, "a"]]
        communicator.barrier()
        trainer = MetaTrainer(LSTMRule(hidden_size=2), QuadraticFamily(dim=2), unroll_steps=2, run_steps=4,
                              communicator=communicator)
        assert not trainer.step().skipped
    finally:
        distributed.shutdown()
    assert not dist.is_initialized()


def test_single_process_communicator():
    one = SingleProcess()
    t = torch.ones(3)
    total = one.all_reduce_sum(t)
    assert torch.equal(total, t) and total is not t
    assert one.all_gather_object({"a": 1}) == [{"a": 1}]
    assert one.barrier() is None
