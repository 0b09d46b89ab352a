"""Starting a training stage's processes: in this process, on this node (`local.py`), or as a SLURM
job (`slurm.py`).

`target` is a module-level function of `sge_repro.stages` and `args` are picklable. One process on
one node runs `target(*args)` right here. Otherwise every worker runs it with the env:// variables
set and joins the group through `sge_repro.distributed.join_process_group`; rank 0 writes the
stage's files and its return value is returned. A worker failure raises `LaunchError` (exit 2)
naming the stage, the rank (or SLURM job) and the worker's own error. `state_dir`
(paths.launch_state_dir) holds the launcher's own files, outside the DVC outputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

from sge_repro.launch.errors import LaunchError
from sge_repro.params_sections import LaunchParams

T = TypeVar("T")

__all__ = ["LaunchError", "launch", "resolve_nproc_per_node", "runs_in_process"]


def resolve_nproc_per_node(settings: LaunchParams) -> int:
    """`nproc_per_node` as a number: `auto` is every visible CUDA GPU here, 1 without CUDA."""
    if settings.nproc_per_node != "auto":
        return settings.nproc_per_node
    import torch

    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def inside_launched_world() -> bool:
    """Whether this process is already one rank of a world someone else started (torchrun, srun
    with the env:// variables): then a stage runs as that rank, in this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def runs_in_process(settings: LaunchParams) -> bool:
    """True when `launch` would call the target here, in this process (no pickling, no workers)."""
    if inside_launched_world():
        return True
    return settings.launcher == "local" and settings.nodes == 1 and resolve_nproc_per_node(settings) == 1


def launch(target: Callable[..., T], args: tuple, settings: LaunchParams, *, name: str,
           state_dir: Path) -> T | None:
    """Run `target(*args)` on the processes `settings` asks for; rank 0's return value."""
    if runs_in_process(settings):
        return target(*args)
    if settings.launcher == "slurm":
        from sge_repro.launch.slurm import run
    else:
        from sge_repro.launch.local import run
    return run(target, args, settings, name=name, state_dir=Path(state_dir))

