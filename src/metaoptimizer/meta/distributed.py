"""Multi-process meta-training on ``torch.distributed`` (gloo on CPU, nccl on GPU).

Every process builds the same :class:`~metaoptimizer.meta.trainer.MetaTrainer` (same rule
initialisation, same seed) with a :class:`TorchDistributed` communicator. Process ``rank`` runs the
slots ``rank, rank + world_size, ...`` of the meta-batch; after each truncation the per-slot
meta-gradient rows are all-reduced explicitly (DDP cannot be used: it does not support
``torch.autograd.grad`` with ``create_graph=True``). Each process writes its rows into a
zero-filled ``(slots, D)`` buffer, so the sum over processes is exact and every process averages
the very same rows in the same order as a single process would: the result does not depend on
the number of processes. Launch with ``torchrun`` (see ``docs/distributed.md``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = ("gloo", "nccl")


class Communicator(Protocol):
    """What the meta-trainer needs from a process group."""

    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum of ``tensor`` over all processes (a new tensor)."""
        ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order."""
        ...

    def barrier(self) -> None: ...


@dataclass(frozen=True)
class SingleProcess:
    """The trivial communicator of a run in one process."""

    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor.clone()

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        return None


class TorchDistributed:
    """A communicator over an initialised ``torch.distributed`` process group.

    Tensors are moved to ``device`` for the collective and back: the CPU for gloo, the process's
    current GPU for nccl.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call init_distributed() (under torchrun) or "
                "torch.distributed.init_process_group() first"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if device is None:
            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = torch.device(device)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        buffer = tensor.to(self.device, copy=True)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        return buffer.to(tensor.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def launched_by_torchrun() -> bool:
    """True when the environment carries torchrun's rendezvous variables."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def init_distributed(backend: str | None = None) -> TorchDistributed:
    """Join the process group that ``torchrun`` describes in the environment (``env://``).

    ``backend`` defaults to nccl when CUDA is available (each process then uses GPU
    ``LOCAL_RANK``) and gloo otherwise.
    """
    if not launched_by_torchrun():
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        raise RuntimeError(f"not launched by torchrun: the environment lacks {missing}; launch with torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; accepted values: {BACKENDS}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return TorchDistributed()


def communicator_from_environment(backend: str | None = None) -> Communicator:
    """:func:`init_distributed` under torchrun, :class:`SingleProcess` otherwise."""
    return init_distributed(backend) if launched_by_torchrun() else SingleProcess()


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
