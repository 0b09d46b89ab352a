"""Module-level targets for the launcher tests (spawned workers import them by name)."""

import atexit
import json
import os
import signal
import time
from pathlib import Path

import torch.distributed as dist

from sge_repro.distributed import all_reduce_sum, join_process_group
from sge_repro.errors import UserError

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def report_and_sum(folder: str, value: float) -> dict:
    """Joins the group as the stages do, all-reduces `value + rank`, writes what it saw."""
    info = join_process_group(cuda=False)
    total = all_reduce_sum([value + info.rank], info, device=None)[0] if info.enabled else value
    seen = {key: os.environ.get(key) for key in ENV_KEYS}
    Path(folder, f"rank{info.rank}.json").write_text(json.dumps({**seen, "total": total, "pid": os.getpid()}))
    return {"rank": info.rank, "total": total, "pid": os.getpid()}


def rank_one_raises(folder: str) -> None:
    join_process_group(cuda=False)
    if dist.get_rank() == 1:
        raise UserError("params.yaml: train_cls.lr: something rank 1 did not like\nand a second line")
    time.sleep(60)


def rank_one_is_killed(folder: str) -> None:
    join_process_group(cuda=False)
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # rank 0 waits for rank 1 forever: the launcher must stop it


def rank_one_crashes(folder: str) -> None:
    join_process_group(cuda=False)
    if dist.get_rank() == 1:
        {}["missing"]
    time.sleep(60)


def sleep_and_record(folder: str) -> None:
    join_process_group(cuda=False)
    Path(folder, f"pid{dist.get_rank()}").write_text(str(os.getpid()))
    time.sleep(120)


def rank_one_raises_and_exits_last(folder: str) -> None:
    """Rank 1 raises; rank 0, in a barrier with it, fails on the closed connection and exits first,
    so torch elastic reports rank 0 (the order the launcher must see through)."""
    join_process_group(cuda=False)
    if dist.get_rank() == 1:
        dist.destroy_process_group()  # closes its connections: rank 0's barrier fails now
        atexit.register(time.sleep, 60)  # stopped by the launcher once rank 0 has exited
        raise ValueError("the data is not there")
    dist.barrier()
