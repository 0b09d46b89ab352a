"""What every stage does before it touches the library."""

from __future__ import annotations

from sge_repro.params import Params


def use_cpu_threads(params: Params) -> None:
    """Fix torch's CPU thread count: CPU runs repeat bit for bit at a fixed count."""
    import torch

    torch.set_num_threads(params.cpu_threads)
