"""Joining the process group that sge_repro.launch (or torchrun) started, through env://, and the
few collectives the classifier and detector training loops need.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sge_repro.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def join_process_group(cuda: bool) -> DistInfo:
    """Join the env:// process group when launched with WORLD_SIZE > 1 (sge_repro.launch, torchrun).

    With `cuda` the group uses NCCL and this process's current CUDA device becomes LOCAL_RANK
    before anything touches CUDA (so no rank but rank 0 opens a context on GPU 0, and NCCL binds
    each rank to its own GPU); otherwise gloo. A single process (WORLD_SIZE unset or 1) joins nothing.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://",
                                device_id=torch.device("cuda", local_rank) if cuda else None)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def leave_process_group() -> None:
    """Destroy the process group this process joined, once its work has returned.

    Left to the interpreter's finalization, gloo's worker threads are torn down in no particular
    order and the process may abort after its result was written ("terminate called without an
    active exception", SIGABRT; pytorch/pytorch#190489). Not after a failure: a peer may be gone,
    and the process exits non-zero anyway."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, dist_info: DistInfo) -> torch.device:
    """The torch device of this rank for a params.yaml `device` ("cuda" means cuda:LOCAL_RANK)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={device!r}: CUDA is not available here; expected 'cpu'")
        if dist_info.enabled:
            if device != "cuda":  # N ranks on one named GPU: each would also open a context on it
                raise UserError(f"device={device!r}: with {dist_info.world_size} processes each uses "
                                "cuda:LOCAL_RANK; expected 'cuda'")
            return torch.device("cuda", dist_info.local_rank)
    elif device != "cpu":
        raise UserError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:<index>'")
    return torch.device(device)


def all_reduce_sum(values: list[float], dist_info: DistInfo, device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (float64); the values unchanged in a single process."""
    if not dist_info.enabled:
        return values
    return sum_over_ranks(torch.tensor(values, dtype=torch.float64, device=device), dist_info)


def sum_over_ranks(values: torch.Tensor, dist_info: DistInfo) -> list[float]:
    """A 1-d tensor of per-rank sums, summed over the ranks and read by the host: one
    synchronisation whether there are peers or not."""
    if dist_info.enabled:
        values = values.clone()
        dist.all_reduce(values)
    return values.tolist()


def broadcast_buffers(model: nn.Module, dist_info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BN running statistics: without sync_bn each rank updated
    them on its own shard), so sharded validation evaluates exactly the model rank 0 saves."""
    if not dist_info.enabled:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def min_over_ranks(value: torch.Tensor, dist_info: DistInfo) -> int:
    """The smallest of a 0-d integer tensor over the ranks (a host synchronisation)."""
    if dist_info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
