"""Targets the SLURM tests launch (module level, importable by the jobs through PYTHONPATH)."""

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sge_repro.distributed import join_process_group


def all_reduce_ranks(value: float, marker_dir: str | None = None, gate: str | None = None) -> dict:
    """Every rank contributes value * (rank + 1) to a gloo all_reduce; each returns what it saw.

    With `marker_dir`, each rank first writes <marker_dir>/started-<rank>; with `gate`, it then
    waits for that file to exist (the test decides when the job may finish)."""
    info = join_process_group(cuda=False)
    if marker_dir is not None:
        Path(marker_dir, f"started-{info.rank}").write_text(os.environ.get("SLURM_JOB_ID", ""))
    if gate is not None:
        while not Path(gate).exists():
            time.sleep(0.5)
    tensor = torch.tensor([value * (info.rank + 1)], dtype=torch.float64)
    if info.enabled:
        dist.all_reduce(tensor)
    print(f"rank {info.rank} of {info.world_size} reduced {tensor.item()}", flush=True)
    return {"rank": info.rank, "world_size": info.world_size, "sum": tensor.item(),
            "env": {key: os.environ[key] for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                     "MASTER_ADDR", "MASTER_PORT")}}


def fail_on_rank(rank: int, message: str) -> None:
    info = join_process_group(cuda=False)
    if info.rank == rank:
        raise ValueError(message)
    dist.barrier()  # the other rank waits here until the failed one's job is ended


def train_one_thread(*args, **kwargs) -> dict:
    """train_classifier with one torch thread per process (as the in-process reference)."""
    from sge_repro.classification.train import train_classifier

    torch.set_num_threads(1)
    return train_classifier(*args, **kwargs)
