"""What every stage does before it touches the library."""

from __future__ import annotations

import os

import torch

from sge_repro.params import Params


def use_cpu_threads(params: Params) -> None:
    """Fix torch's CPU thread count: CPU runs repeat bit for bit at a fixed count.

    `cpu_threads` is the node's budget: each of the N processes a stage launched on this node
    (LOCAL_WORLD_SIZE) takes cpu_threads // N (at least 1), so 2 processes on 2 cores do not
    run 4 threads."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, params.cpu_threads // max(local_processes, 1)))
