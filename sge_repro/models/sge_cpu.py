"""The CPU kernels of sge_cpu.c: SGE (optionally fused with the BatchNorm in front of it) in one
pass over memory, forward and backward, for contiguous float32 NCHW tensors.

The C file is compiled on first use with the system C compiler (about 0.3 s) into a cache
directory keyed by the source, the flags, the compiler and the CPU, and loaded with ctypes. It
links the process's libgomp, which is torch's own, so it shares torch's OpenMP threads (and
torch.set_num_threads). Without a compiler, or with SGE_CPU_KERNEL=0, `available()` is False
and sge_fast.py uses its torch-ops fast path.
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

from sge_repro.paths import user_cache_dir

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
_f64 = ctypes.c_double
_SIGNATURES = {
    "sge_forward_f32": [_ptr] * 7 + [_i64] * 4,
    "sge_backward_f32": [_ptr] * 12 + [_i64] * 4,
    "bn_sge_forward_f32": [_ptr] * 11 + [_i64, _f64, _f64] + [_i64] * 4,
    "bn_sge_backward_f32": [_ptr] * 10 + [_i64] + [_ptr] * 4 + [_i64] * 4,
}


def _cache_dir() -> Path:
    return user_cache_dir() / "kernels"


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


def _backward(x, grad_y, grad_x, weight, bias, zmean, groups):
    """Runs the backward kernel; returns (grad_weight, grad_bias) reduced over the batch."""
    batch, channels, height, width = x.shape
    rows = batch * groups
    grad_weight_rows = torch.empty(rows, dtype=torch.float64)
    grad_bias_rows = torch.empty(rows, dtype=torch.float64)
    library().sge_backward_f32(
        _p(x), _p(grad_y), _p(grad_x), None, None, _p(weight), _p(bias), _p(zmean),
        _p(grad_weight_rows), _p(grad_bias_rows), None, None, batch, groups, channels // groups, height * width)
    return grad_weight_rows.view(batch, groups).sum(0), grad_bias_rows.view(batch, groups).sum(0)


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
        grad_weight, grad_bias = _backward(x, grad_y, grad_x, _f32(weight), _f32(bias), zmean, ctx.groups)
        shape = weight.shape
        return grad_x, grad_weight.view(shape).to(weight.dtype), grad_bias.view(shape).to(bias.dtype), None, None


def sge(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, inplace: bool = False) -> torch.Tensor:
    """SGE of a CPU float32 NCHW tensor (any memory layout; the result is NCHW-contiguous).
    inplace (only without gradients): overwrite x, which must be contiguous and the caller's."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    contiguous = x.contiguous()
    inplace = not grad and (inplace or contiguous.data_ptr() != x.data_ptr())
    return SGEFunction.apply(contiguous, weight, bias, groups, inplace)


def batchnorm_applies(bn: torch.nn.BatchNorm2d) -> bool:
    """The fused kernels read BN parameters and running statistics as float32 (as in a float32 model)."""
    tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()) for t in tensors)


class BatchNormSGEFunction(torch.autograd.Function):
    """y = SGE(BatchNorm(z)) for a contiguous float32 CPU z, each direction one kernel call. The BN
    output is never stored: the forward reads z twice (statistics, then BN+SGE) and writes y; the
    backward reads z and dy, writes dx, then turns it into dz in place. Running statistics are
    updated as nn.BatchNorm2d does (unbiased variance, `momentum`)."""

    @staticmethod
    def forward(ctx, z, bn_weight, bn_bias, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps,
                groups):
        batch, channels, height, width = z.shape
        mean = torch.empty(channels)  # float32, as native_batch_norm saves them
        invstd = torch.empty(channels)
        zmean = torch.empty(batch * channels)  # per-(sample, channel) means of z, for the backward
        y = torch.empty_like(z)
        weight32, bias32 = _f32(weight), _f32(bias)
        library().bn_sge_forward_f32(
            _p(z), _p(y), _p(bn_weight), _p(bn_bias), _p(running_mean),
            _p(running_var), _p(mean), _p(invstd), _p(weight32), _p(bias32), _p(zmean), int(use_batch_stats),
            float(momentum), float(eps), batch, channels, groups, height * width)
        ctx.save_for_backward(z, bn_weight, bn_bias, weight, bias, mean, invstd, zmean)
        ctx.use_batch_stats, ctx.groups = use_batch_stats, groups
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, bn_weight, bn_bias, weight, bias, mean, invstd, zmean = ctx.saved_tensors
        batch, channels, height, width = z.shape
        grad_y = grad_y.contiguous()
        grad_z = torch.empty_like(z)
        grad_weight, grad_bias = torch.empty(ctx.groups), torch.empty(ctx.groups)
        grad_bn_weight = torch.empty(channels) if bn_weight is not None else None
        grad_bn_bias = torch.empty(channels) if bn_bias is not None else None
        weight32, bias32 = _f32(weight), _f32(bias)
        library().bn_sge_backward_f32(
            _p(z), _p(grad_y), _p(grad_z), _p(bn_weight), _p(bn_bias), _p(mean), _p(invstd), _p(zmean),
            _p(weight32), _p(bias32), int(ctx.use_batch_stats), _p(grad_weight), _p(grad_bias), _p(grad_bn_weight),
            _p(grad_bn_bias), batch, channels, ctx.groups, height * width)
        return (grad_z, grad_bn_weight, grad_bn_bias, grad_weight.view(weight.shape).to(weight.dtype),
                grad_bias.view(bias.shape).to(bias.dtype), None, None, None, None, None, None)
