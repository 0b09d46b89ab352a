"""The CPU kernels of sge_cpu.c: SGE (optionally fused with the BatchNorm in front of it) in one
pass over memory, forward and backward, for contiguous float32 NCHW tensors.

The C file is compiled on first use with the system C compiler (about 0.3 s) into a cache
directory keyed by the source, the flags, the compiler and the CPU, and loaded with ctypes. It
links the process's libgomp, which is torch's own, so it shares torch's OpenMP threads (and
torch.set_num_threads). Without a compiler, or with SGE_CPU_KERNEL=0, `available()` is False
and sge.py uses its torch-ops fast path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("sge_cpu.c")
# Compile without linking, then link without -ffast-math: gcc < 13 would otherwise link
# crtfastmath.o, which turns on flush-to-zero for the whole process. -ffast-math itself lets the
# simd loops call glibc's vector exp (libmvec).
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11")
LINK_FLAGS = ("-shared", "-fopenmp")
LIBRARIES = ("-lmvec", "-lm")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failed = False

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "sge_forward_f32": [_ptr] * 7 + [_i64] * 4,
    "sge_backward_f32": [_ptr] * 12 + [_i64] * 4,
    "channel_moments_f32": [_ptr] * 3 + [_i64] * 3,
    "channel_affine2_f32": [_ptr] * 6 + [_i64] * 3,
}


def _cache_dir() -> Path:
    root = os.environ.get("SGE_REPRO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sge-repro")
    return Path(root) / "kernels"


def _cpu_identity() -> str:
    """The CPU model and feature flags (-march=native code must not run on another CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _compiler_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout


def _build(compiler: str) -> Path:
    key = hashlib.sha256("\0".join([
        SOURCE.read_text(), *COMPILE_FLAGS, *LINK_FLAGS, *LIBRARIES, _compiler_version(compiler), platform.machine(),
        _cpu_identity(),
    ]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"sge_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        obj, lib = Path(scratch) / "sge_cpu.o", Path(scratch) / "sge_cpu.so"
        for command in ([compiler, *COMPILE_FLAGS, "-c", str(SOURCE), "-o", str(obj)],
                        [compiler, *LINK_FLAGS, str(obj), "-o", str(lib), *LIBRARIES]):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()[-500:]}")
        os.replace(lib, target)  # atomic: concurrent processes load a complete file or build their own
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled, no compiler, or the build failed: warned once)."""
    global _library, _failed
    if _library is not None or _failed:
        return _library
    with _lock:
        if _library is not None or _failed:
            return _library
        if os.environ.get("SGE_CPU_KERNEL", "1") == "0":
            _failed = True
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        try:
            if compiler is None:
                raise RuntimeError("no C compiler (cc/gcc) on PATH")
            loaded = ctypes.CDLL(str(_build(compiler)))
            for name, argtypes in _SIGNATURES.items():
                function = getattr(loaded, name)
                function.argtypes, function.restype = argtypes, None
            _library = loaded
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            _failed = True
            warnings.warn(f"SGE CPU kernel unavailable ({error}); using the torch-ops fast path", stacklevel=2)
    return _library


def available() -> bool:
    return library() is not None


def applies(x: torch.Tensor) -> bool:
    """Whether the kernels take this activation: CPU, float32, NCHW with >= 2 positions."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.shape[2] * x.shape[3] > 1 and available())


def _p(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.data_ptr()


def _f32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).to(torch.float32).contiguous()


def _forward(z, y, scale, shift, weight, bias, zmean, groups):
    batch, channels, height, width = z.shape
    library().sge_forward_f32(_p(z), _p(y), _p(scale), _p(shift), _p(weight), _p(bias), _p(zmean),
                              batch, groups, channels // groups, height * width)


def _backward(z, grad_y, grad_x, scale, shift, weight, bias, zmean, groups, channel_stats: bool):
    """Runs the backward kernel; returns (grad_weight, grad_bias, channel_sums, channel_dots) with
    the per-row partial sums reduced over the batch (channel_* are None without channel_stats)."""
    batch, channels, height, width = z.shape
    rows = batch * groups
    grad_weight_rows = torch.empty(rows, dtype=torch.float64)
    grad_bias_rows = torch.empty(rows, dtype=torch.float64)
    sums = torch.empty(batch * channels, dtype=torch.float64) if channel_stats else None
    dots = torch.empty(batch * channels, dtype=torch.float64) if channel_stats else None
    library().sge_backward_f32(
        _p(z), _p(grad_y), _p(grad_x), _p(scale), _p(shift), _p(weight), _p(bias), _p(zmean),
        _p(grad_weight_rows), _p(grad_bias_rows), _p(sums), _p(dots), batch, groups, channels // groups, height * width)
    grad_weight = grad_weight_rows.view(batch, groups).sum(0)
    grad_bias = grad_bias_rows.view(batch, groups).sum(0)
    if channel_stats:  # per (sample, channel): the caller combines them with the channel means
        return grad_weight, grad_bias, sums.view(batch, channels), dots.view(batch, channels)
    return grad_weight, grad_bias, None, None


class SGEFunction(torch.autograd.Function):
    """y = SGE(x) for a contiguous float32 CPU x."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, inplace: bool):
        batch, channels = x.shape[:2]
        weight32, bias32 = _f32(weight), _f32(bias)
        zmean = torch.empty(batch * channels, dtype=torch.float32)  # per-channel means of z, for the backward
        y = x if inplace else torch.empty_like(x)
        _forward(x, y, None, None, weight32, bias32, zmean, groups)
        if not inplace:
            ctx.save_for_backward(x, weight, bias, zmean)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, zmean = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = torch.empty_like(x)
        grad_weight, grad_bias, _, _ = _backward(
            x, grad_y, grad_x, None, None, _f32(weight), _f32(bias), zmean, ctx.groups, channel_stats=False)
        shape = weight.shape
        return grad_x, grad_weight.view(shape).to(weight.dtype), grad_bias.view(shape).to(bias.dtype), None, None


def sge(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, inplace: bool = False) -> torch.Tensor:
    """SGE of a CPU float32 NCHW tensor (any memory layout; the result is NCHW-contiguous).
    inplace (only without gradients): overwrite x, which must be contiguous and the caller's."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    contiguous = x.contiguous()
    inplace = not grad and (inplace or contiguous.data_ptr() != x.data_ptr())
    return SGEFunction.apply(contiguous, weight, bias, groups, inplace)


def _bn_affine(bn_weight, bn_bias, mean32, invstd32) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm as x = z * scale + shift (float32 per channel) from its statistics."""
    invstd = invstd32.double()
    scale = invstd if bn_weight is None else bn_weight.detach().double() * invstd
    shift = -mean32.double() * scale
    if bn_bias is not None:
        shift += bn_bias.detach().double()
    return scale.float(), shift.float()


class BatchNormSGEFunction(torch.autograd.Function):
    """y = SGE(BatchNorm(z)) for a contiguous float32 CPU z. The BN output is never stored: the
    forward reads z twice (statistics, then BN+SGE) and writes y; the backward reads z and dy,
    writes dx, then turns it into dz in place. Running statistics are updated as nn.BatchNorm2d
    does (unbiased variance)."""

    @staticmethod
    def forward(ctx, z, bn_weight, bn_bias, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps,
                groups):
        batch, channels, height, width = z.shape
        count = batch * height * width
        if use_batch_stats:
            sums = torch.empty(channels, dtype=torch.float64)
            squares = torch.empty(channels, dtype=torch.float64)
            library().channel_moments_f32(_p(z), _p(sums), _p(squares), batch, channels, height * width)
            mean = sums / count
            var = (squares / count - mean * mean).clamp_min_(0.0)
            if running_mean is not None:
                unbiased = var * (count / max(count - 1, 1))
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        else:
            mean, var = running_mean.double(), running_var.double()
        # Saved in float32 as native_batch_norm saves them; scale / shift derive from the rounded
        # values, so the backward recomputes exactly the forward's.
        mean32, invstd32 = mean.float(), torch.rsqrt(var + eps).float()
        scale32, shift32 = _bn_affine(bn_weight, bn_bias, mean32, invstd32)
        zmean = torch.empty(batch * channels, dtype=torch.float32)  # per-channel means of z, for the backward
        y = torch.empty_like(z)
        _forward(z, y, scale32, shift32, _f32(weight), _f32(bias), zmean, groups)
        ctx.save_for_backward(z, bn_weight, bn_bias, weight, bias, mean32, invstd32, zmean)
        ctx.use_batch_stats, ctx.groups, ctx.count = use_batch_stats, groups, count
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, bn_weight, bn_bias, weight, bias, mean32, invstd32, zmean = ctx.saved_tensors
        scale32, shift32 = _bn_affine(bn_weight, bn_bias, mean32, invstd32)
        mean, invstd = mean32.double(), invstd32.double()
        gamma = bn_weight.detach().double() if bn_weight is not None else torch.ones_like(mean)
        grad_y = grad_y.contiguous()
        grad = torch.empty_like(z)  # dL/dx, then dL/dz in place
        grad_weight, grad_bias, sums, dots = _backward(
            z, grad_y, grad, scale32, shift32, _f32(weight), _f32(bias), zmean, ctx.groups, channel_stats=True)
        # BatchNorm backward from per-(sample, channel) sums of dx and dx (z - zbar), zbar the
        # sample's channel mean: with xhat = (z - mean) * invstd,
        # sum dx*xhat = invstd sum_b [sum dx (z - zbar_b) + (zbar_b - mean) sum dx].
        zmean_bc = zmean.double().view(sums.shape)
        dot_xhat = invstd * (dots + sums * (zmean_bc - mean)).sum(0)
        sums = sums.sum(0)
        a = gamma * invstd
        if ctx.use_batch_stats:
            # dz = a (dx - sum dx / M - xhat sum dx*xhat / M)
            b = -a * invstd * dot_xhat / ctx.count
            d = -a * sums / ctx.count - b * mean
        else:
            b, d = torch.zeros_like(a), torch.zeros_like(a)
        batch, channels, height, width = z.shape
        a32, b32, d32 = a.float(), b.float(), d.float()  # named: ctypes gets raw pointers, keep them alive
        library().channel_affine2_f32(_p(grad), _p(z), _p(grad), _p(a32), _p(b32), _p(d32),
                                      batch, channels, height * width)
        shape = weight.shape
        return (grad, dot_xhat.float() if bn_weight is not None else None, sums.float() if bn_bias is not None else None,
                grad_weight.view(shape).to(weight.dtype), grad_bias.view(shape).to(bias.dtype),
                None, None, None, None, None, None)
