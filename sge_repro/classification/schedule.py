"""The learning-rate schedule: linear warmup, then step decay or cosine, per optimizer step."""

from __future__ import annotations

import math

import torch

from sge_repro.params_sections import TrainClsParams

STEP_GAMMA = 0.1  # "step" multiplies the lr by this at each milestone epoch (the ResNet recipe)


def lr_factor(iteration: int, steps_per_epoch: int, params: TrainClsParams) -> float:
    """Multiplier of the base lr at optimizer step `iteration` (0-based), per-step resolution.

    Linear warmup from 1/steps to 1 over `warmup_epochs`, then "step" (x STEP_GAMMA at each
    milestone epoch) or "cosine" (to 0 at the end of training).
    """
    warmup_steps = int(round(params.warmup_epochs * steps_per_epoch))
    if iteration < warmup_steps:
        return (iteration + 1) / warmup_steps
    if params.lr_schedule == "step":
        epoch = iteration // steps_per_epoch
        return STEP_GAMMA ** sum(1 for milestone in params.milestones if epoch >= milestone)
    total = params.epochs * steps_per_epoch
    progress = (iteration - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                 params: TrainClsParams) -> torch.optim.lr_scheduler.LambdaLR:
    """Steps once per optimizer step; its state (the step count) lives in the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda iteration: lr_factor(iteration, steps_per_epoch, params))
