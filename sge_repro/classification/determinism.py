"""Seeds and deterministic kernels: every random source of a run derives from the params' seed.

Every epoch reseeds the sampler, the augmentation and the global RNG from (seed, epoch), so a run
resumed from an epoch checkpoint computes exactly what an uninterrupted run computes (bit for bit
on CPU at a fixed thread count).
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch




def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: torch already seeds each worker from the loader's generator;
    align numpy and random with it."""
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


@contextlib.contextmanager
def deterministic_mode(device: torch.device, enabled: bool = True):
    """train_cls.deterministic, restored on exit.

    On: deterministic algorithms (warn only) and no cudnn autotuning: CPU reruns and resumes
    repeat bit for bit; on CUDA too, at some cost in speed. Off (the paper profile): torch's
    default kernels and cudnn.benchmark = True (cudnn times its algorithms for each input shape
    and keeps the fastest; reruns then differ in float rounding)."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    if enabled and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled and device.type == "cuda"
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.backends.cudnn.benchmark = previous_benchmark
