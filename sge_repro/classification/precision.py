"""Mixed precision and memory layout: the autocast of a forward pass, what a device can run.

`amp` is "fp32" (no autocast), "bf16" (autocast; CPU or CUDA; fp32's range, no loss scaling) or "fp16"
(autocast plus a GradScaler; CUDA only). `channels_last` stores weights and inputs NHWC.
"""

from __future__ import annotations

import contextlib

import torch

from sge_repro.errors import UserError


def check_amp_on_device(amp: str, device: torch.device) -> None:
    """fp16 needs loss scaling, which runs on CUDA only; bf16 and fp32 run anywhere."""
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"amp='fp16' on device {device}: fp16 autocast with loss scaling needs CUDA; "
                        "expected amp='bf16' or amp='fp32' on CPU")


def autocast(amp: str, device: torch.device):
    """The forward-pass autocast context for `amp` (a no-op context for fp32)."""
    if amp == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16 overflows without loss scaling; bf16 and fp32 need none (a disabled scaler is a no-op)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
