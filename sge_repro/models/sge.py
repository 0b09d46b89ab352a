"""Spatial Group-wise Enhance (Li, Hu, Yang 2019).

For x of shape (B, C, H, W) split into G groups of K = C/G channels, per sample and group:

    m   = mean of x_g over the H*W positions                  (K,)
    c_i = <m, x_g,i>                                           (H*W,)
    n   = (c - mean(c)) / (unbiased_std(c) + 1e-5)
    y_g = x_g * sigmoid(gamma_g * n + beta_g)

gamma (`weight`, init 0) and beta (`bias`, init 1) have shape (1, G, 1, 1), so parameter names
and shapes equal the authors' release files (`layerX.Y.sge.weight`).

Three implementations compute the same function:
- "reference": the formula step by step in eager torch ops (documentation and test oracle);
- "triton" (opt-in, CUDA): one Triton kernel per direction (sge_triton.py); elsewhere "fast";
- "fast": on the CPU in float32, the C kernels of sge_cpu.c (one pass over memory, fused with the
  BatchNorm in front of SGE); elsewhere (CUDA, float64, autocast, or without a C compiler) torch
  ops with fewer passes over the activation memory (the pooled dot product as one batched matmul,
  the mean of c derived analytically) and a hand-written backward that needs one fused output
  pass instead of autograd's chain of elementwise kernels.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from sge_repro.errors import UserError
from sge_repro.models import sge_cpu, sge_triton

SGE_EPS = 1e-5
DEFAULT_GROUPS = 64  # the paper's G; every other default of the SGE groups refers to this one
SGE_IMPLS = ("fast", "reference", "triton")
# Devices on which the fast path uses the elementwise formulation instead of batched matvecs.
ELEMENTWISE_DEVICES = {"cuda"}
# Devices on which the fast path's math runs through torch.compile (set SGE_COMPILE=0 to disable);
# on any compile error it falls back to eager with one warning.
COMPILE_DEVICES = set() if os.environ.get("SGE_COMPILE", "1") == "0" else {"cuda"}
_compiled: dict = {}


def _maybe_compiled(function):
    """`function` itself, or on COMPILE_DEVICES its torch.compile version (built on first use)."""

    def call(x3: torch.Tensor, *args):
        if x3.device.type in COMPILE_DEVICES:
            try:
                if function not in _compiled:
                    _compiled[function] = torch.compile(function, dynamic=False)
                return _compiled[function](x3, *args)
            except Exception as error:  # noqa: BLE001 - compile is an optimisation, eager is exact
                COMPILE_DEVICES.discard(x3.device.type)
                warnings.warn(f"SGE: torch.compile failed ({type(error).__name__}: {error}); using eager", stacklevel=2)
        return function(x3, *args)

    return call


def sge_reference_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """The paper's spatial gate sigmoid(gamma * n + beta), shape (B, G, H, W), one step per line
    (eager, autograd); weight and bias have shape (1, G, 1, 1) like the module's parameters."""
    batch, channels, height, width = x.shape
    xg = x.reshape(batch * groups, channels // groups, height, width)
    pooled = xg.mean(dim=(2, 3), keepdim=True)
    similarity = (xg * pooled).sum(dim=1)  # (B*G, H, W)
    flat = similarity.reshape(batch * groups, height * width)
    centered = flat - flat.mean(dim=1, keepdim=True)
    normalized = centered / (centered.std(dim=1, keepdim=True) + SGE_EPS)
    normalized = normalized.reshape(batch, groups, height, width)
    return torch.sigmoid(normalized * weight + bias)


def sge_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """The formula of the paper, one step per line (eager, autograd)."""
    batch, channels, height, width = x.shape
    gate = sge_reference_gate(x, weight, bias, groups)
    xg = x.reshape(batch * groups, channels // groups, height, width)
    out = xg * gate.reshape(batch * groups, 1, height, width)
    return out.reshape(batch, channels, height, width)


def _similarity(x3: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """c = m^T x per row: (N, K, P), (N, K) -> (N, P) in pooled's dtype. CPU: one batched matvec
    (one read of x, no temporary). CUDA: cuBLAS runs N tiny matvecs slowly, a broadcast product
    summed over the channel dim is a plain reduction (and one fused kernel under torch.compile)."""
    if x3.device.type in ELEMENTWISE_DEVICES:
        return (x3 * pooled.to(x3.dtype).unsqueeze(2)).sum(dim=1, dtype=pooled.dtype)
    return torch.bmm(pooled.to(x3.dtype).unsqueeze(1), x3).squeeze(1).to(pooled.dtype)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """Per-group statistics (small tensors) in at least float32, also for bf16/fp16 activations."""
    return torch.promote_types(x.dtype, torch.float32)


def _fast_forward(x3: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batch: int, groups: int):
    """x3: (B*G, K, P) contiguous. Returns (y3, pooled, centered, std_eps, normalized, gate)."""
    pooled = x3.mean(dim=2, dtype=_stat_dtype(x3))  # (N, K): one read of x
    centered, std_eps, normalized, gate = _sge_stats(x3, pooled, weight, bias, batch, groups)
    return x3 * gate.to(x3.dtype), pooled, centered, std_eps, normalized, gate  # one read of x, one write of y


class _SGEFunction(torch.autograd.Function):
    """SGE with a fused backward (see module docstring). Shapes: x3 is (B*G, K, P)."""

    @staticmethod
    def forward(ctx, x3, weight, bias, batch: int, groups: int):
        with torch.autocast(x3.device.type, enabled=False):  # dtypes are handled explicitly
            y3, pooled, centered, std_eps, normalized, gate = _fast_forward_c(x3, weight, bias, batch, groups)
        ctx.save_for_backward(x3, weight, pooled, centered, std_eps, normalized, gate)
        ctx.batch, ctx.groups = batch, groups
        return y3

    @staticmethod
    def backward(ctx, grad_y3):
        x3, weight, pooled, centered, std_eps, normalized, gate = ctx.saved_tensors
        grad_y3 = grad_y3.contiguous()
        with torch.autocast(x3.device.type, enabled=False):
            grad_x3, grad_weight, grad_bias = _sge_backward_core_c(
                grad_y3, x3, weight, pooled, centered, std_eps, normalized, gate, ctx.batch, ctx.groups)
        return grad_x3, grad_weight, grad_bias, None, None


def _sge_backward_core(grad_y3, x3, weight, pooled, centered, std_eps, normalized, gate, batch, groups, reuse_x=False):
    """Gradients (dx3, dweight, dbias) of SGE given the forward's intermediates (see _SGEFunction)."""
    n_rows, _, positions = x3.shape
    gate2 = gate.view(n_rows, positions)
    # dL/dgate_i = sum_k gy_ki x_ki: vecdot reads both tensors once (einsum here is ~5x slower
    # on CPU: it lowers to tiny batched matmuls).
    grad_y3 = grad_y3.to(x3.dtype)
    grad_gate = torch.linalg.vecdot(grad_y3, x3, dim=1).to(gate.dtype)
    grad_affine = grad_gate * gate2 * (1.0 - gate2)  # (N, P)
    grad_affine_bg = grad_affine.view(batch, groups, positions)
    grad_weight = (grad_affine_bg * normalized.view(batch, groups, positions)).sum(dim=(0, 2))
    grad_bias = grad_affine_bg.sum(dim=(0, 2))
    grad_norm = (grad_affine_bg * weight.view(1, groups, 1)).view(n_rows, positions)
    # n = d / (s + eps), d = c - mean(c), s = sqrt(sum d^2 / (P - 1)).
    std = std_eps - SGE_EPS
    dot = (grad_norm * centered).sum(dim=1, keepdim=True)
    grad_centered = grad_norm / std_eps - centered * (dot / (std_eps * std_eps * std.clamp_min(1e-30) * (positions - 1)))
    grad_similarity = grad_centered - grad_centered.mean(dim=1, keepdim=True)  # (N, P)
    # c = m^T x, m = mean_p x: dx = gy*gate + m (x) gc + (x @ gc) / P (x) 1.
    if x3.device.type in ELEMENTWISE_DEVICES:  # elementwise form (see _similarity); torch.compile fuses it into few kernels
        grad_pooled = (x3 * grad_similarity.to(x3.dtype).unsqueeze(1)).sum(dim=2, dtype=pooled.dtype) / positions
        grad_x3 = torch.addcmul(grad_pooled.unsqueeze(2), pooled.unsqueeze(2), grad_similarity.unsqueeze(1))
        grad_x3 = grad_x3.to(x3.dtype).addcmul_(grad_y3, gate.to(x3.dtype))
    else:
        grad_pooled = torch.bmm(x3, grad_similarity.to(x3.dtype).unsqueeze(2)).squeeze(2).to(pooled.dtype) / positions
        left = torch.stack((pooled, grad_pooled), dim=2).to(x3.dtype)  # (N, K, 2)
        right = torch.stack((grad_similarity, torch.ones_like(grad_similarity)), dim=1).to(x3.dtype)  # (N, 2, P)
        # x3 is no longer needed: reuse its memory when the caller owns it (a fresh CPU allocation
        # costs page faults comparable to a pass over the tensor).
        grad_x3 = torch.mul(grad_y3, gate.to(x3.dtype), out=x3 if reuse_x else None)
        grad_x3.baddbmm_(left, right)  # in place: one pass over the output
    shape = (1, groups, 1, 1)
    return grad_x3, grad_weight.view(shape).to(weight.dtype), grad_bias.view(shape).to(weight.dtype)


def _sge_stats(x3: torch.Tensor, pooled: torch.Tensor, weight, bias, batch: int, groups: int):
    """(centered, std_eps, normalized, gate) from x3 and its pooled vector."""
    positions = x3.shape[2]
    # c = m^T x as a batched matvec: one read of x, no (N, K, P) temporary.
    # mean_p(c) = <m, mean_p(x)> = |m|^2: no extra reduction needed.
    similarity = _similarity(x3, pooled)
    centered = similarity - (pooled * pooled).sum(dim=1, keepdim=True)
    std_eps = centered.square().sum(dim=1, keepdim=True).div_(positions - 1).sqrt_().add_(SGE_EPS)
    normalized = centered / std_eps
    affine = normalized.view(batch, groups, positions) * weight.view(1, groups, 1) + bias.view(1, groups, 1)
    gate = torch.sigmoid(affine).view(batch * groups, 1, positions)
    return centered, std_eps, normalized, gate


def _sge_gate(x3: torch.Tensor, weight, bias, batch: int, groups: int) -> torch.Tensor:
    """(gate (N, 1, P), pooled (N, K)) only, in few passes over the small (N, P) maps:
    centre, norm, then sigmoid(w / (std + eps) * centered + b) in place (torch.std's
    Welford kernel is ~6x slower on CPU than this two-pass form)."""
    n_rows, _, positions = x3.shape
    pooled = x3.mean(dim=2, dtype=_stat_dtype(x3))
    centered = _similarity(x3, pooled).sub_((pooled * pooled).sum(dim=1, keepdim=True))  # mean_p(c) = |m|^2
    std_eps = torch.linalg.vector_norm(centered, dim=1, keepdim=True).div_((positions - 1) ** 0.5).add_(SGE_EPS)
    scale = weight.view(1, groups, 1).to(std_eps.dtype) / std_eps.view(batch, groups, 1)  # (B, G, 1)
    # In place on the small maps: on CPU each fresh block allocation costs page faults.
    gate = centered.view(batch, groups, positions).mul_(scale).add_(bias.view(1, groups, 1).to(std_eps.dtype)).sigmoid_()
    return gate.view(n_rows, 1, positions), pooled


def _gated_forward(x3: torch.Tensor, weight, bias, batch: int, groups: int, inplace: bool = False) -> torch.Tensor:
    """y3 = x3 * gate; with inplace, written into x3 (no new block-sized allocation)."""
    gate = _sge_gate(x3, weight, bias, batch, groups)[0].to(x3.dtype)
    return x3.mul_(gate) if inplace else x3 * gate


_fast_forward_c = _maybe_compiled(lambda *args: _fast_forward(*args))
_gated_forward_c = _maybe_compiled(lambda *args: _gated_forward(*args))
_sge_gate_c = _maybe_compiled(lambda *args: _sge_gate(*args))
_sge_stats_c = _maybe_compiled(lambda *args: _sge_stats(*args))
_sge_backward_core_c = _maybe_compiled(lambda *args: _sge_backward_core(*args))


def _bn_forward_args(bn: nn.BatchNorm2d) -> tuple[bool, float]:
    """(use batch statistics, momentum) exactly as nn.BatchNorm2d.forward decides them."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or bn.running_mean is None
    return use_batch_stats, momentum


class _BatchNormSGEFunction(torch.autograd.Function):
    """BatchNorm followed by SGE, saving only the BN input (which BN alone would save anyway):
    the backward recomputes the BN output and the SGE statistics, so SGE adds no block-sized
    tensor to the activation memory of a training step."""

    @staticmethod
    def forward(ctx, z, bn_weight, bn_bias, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps, groups):
        # Updates running_mean / running_var in place when use_batch_stats, as nn.BatchNorm2d does.
        x, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            z, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, momentum, eps)
        batch, channels, height, width = x.shape
        x3 = x.view(batch * groups, channels // groups, height * width)
        gate, pooled = _sge_gate_c(x3, weight, bias, batch, groups)
        x3.mul_(gate.to(x3.dtype))  # x is ours and unsaved: y is written into it
        y = x  # the base tensor, not a view of it: callers may add to it in place (the residual sum)
        ctx.save_for_backward(z, bn_weight, bn_bias, weight, bias, running_mean, running_var, save_mean, save_invstd, pooled)
        ctx.use_batch_stats, ctx.eps, ctx.groups = use_batch_stats, eps, groups
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, bn_weight, bn_bias, weight, bias, running_mean, running_var, save_mean, save_invstd, pooled = ctx.saved_tensors
        groups = ctx.groups
        batch, channels, height, width = z.shape
        # Recompute the BN output: x = z * scale + shift with the statistics the forward used.
        if ctx.use_batch_stats:
            mean, invstd = save_mean, save_invstd
        else:
            mean, invstd = running_mean, torch.rsqrt(running_var + ctx.eps)
        scale = bn_weight * invstd
        shift = bn_bias - mean * scale
        x = torch.addcmul(shift.view(1, -1, 1, 1), z, scale.view(1, -1, 1, 1))
        x3 = x.view(batch * groups, channels // groups, height * width)
        centered, std_eps, normalized, gate = _sge_stats_c(x3, pooled, weight, bias, batch, groups)
        grad_y3 = grad_y.contiguous().view_as(x3)
        grad_x3, grad_weight, grad_bias = _sge_backward_core_c(
            grad_y3, x3, weight, pooled, centered, std_eps, normalized, gate, batch, groups, x3.device.type == "cpu")
        del x, x3
        grad_z, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad_x3.view(batch, channels, height, width), z, bn_weight, running_mean, running_var,
            save_mean, save_invstd, ctx.use_batch_stats, ctx.eps, [True, True, True])
        return grad_z, grad_bn_weight, grad_bn_bias, grad_weight, grad_bias, None, None, None, None, None, None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def check_spatial_size(x: torch.Tensor) -> None:
    """SGE normalises over the H*W positions with the unbiased std: one position gives 0/0 = NaN
    (in the authors' code too). Say so instead of training on NaN."""
    if x.shape[-1] * x.shape[-2] < 2:
        raise UserError(
            f"SGE input of {x.shape[-2]}x{x.shape[-1]} positions: the spatial std needs at least 2; "
            "expected larger input images (a ResNet's last stage is 1/32 of the input: use >= 64 px)"
        )


def batchnorm_sge(z: torch.Tensor, bn: nn.Module, sge: "SpatialGroupEnhance") -> torch.Tensor:
    """sge(bn(z)). With the fast impl, a plain BatchNorm2d, a contiguous NCHW float32/64 input and
    gradients needed, one fused Function that saves only z; otherwise the two modules in turn
    (so forward hooks, FrozenBatchNorm, SyncBatchNorm, channels_last all keep working)."""
    check_spatial_size(z)
    if (
        sge.impl == "fast"
        and type(bn) is nn.BatchNorm2d
        and z.is_contiguous()
        and not torch.is_autocast_enabled(z.device.type)
        and not (_has_hooks(bn) or _has_hooks(sge))
        and sge_cpu.applies(z)
        and sge_cpu.batchnorm_applies(bn)
    ):
        if z.shape[1] != sge.channels:
            raise ValueError(f"SGE expected {sge.channels} input channels, got {z.shape[1]}")
        use_batch_stats, momentum = _bn_forward_args(bn)
        return sge_cpu.BatchNormSGEFunction.apply(
            z, bn.weight, bn.bias, sge.weight, sge.bias, bn.running_mean, bn.running_var, use_batch_stats, momentum,
            bn.eps, sge.groups)
    fusable = (
        sge.impl == "fast"
        and type(bn) is nn.BatchNorm2d
        and bn.affine
        and bn.track_running_stats
        and torch.is_grad_enabled()
        and z.dtype in (torch.float32, torch.float64)
        and z.is_contiguous()
        and z.shape[2] * z.shape[3] > 1
        and not torch.is_autocast_enabled(z.device.type)
        and not (_has_hooks(bn) or _has_hooks(sge))
    )
    if not fusable:
        if sge.impl == "fast" and not torch.is_grad_enabled() and not (_has_hooks(bn) or _has_hooks(sge)):
            out = bn(z)
            if out.shape[1] != sge.channels:
                raise ValueError(f"SGE expected {sge.channels} input channels, got {out.shape[1]}")
            return sge_fast(out, sge.weight, sge.bias, sge.groups, inplace=out is not z)  # BN's output is ours
        return sge(bn(z))
    use_batch_stats, momentum = _bn_forward_args(bn)
    return _BatchNormSGEFunction.apply(
        z, bn.weight, bn.bias, sge.weight, sge.bias, bn.running_mean, bn.running_var, use_batch_stats, momentum, bn.eps,
        sge.groups)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def sge_fast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, inplace: bool = False) -> torch.Tensor:
    """SGE with fewer memory passes. inplace: without gradients, overwrite a contiguous x with the
    result (saves one block-sized allocation; the caller must not need x afterwards)."""
    if sge_cpu.applies(x) and not torch.is_autocast_enabled("cpu"):
        y = sge_cpu.sge(x, weight, bias, groups, inplace)
        # Keep the caller's memory format (channels_last models stay channels_last).
        return y.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else y
    batch, channels, height, width = x.shape
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x3 = x.contiguous().view(batch * groups, channels // groups, height * width)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        y3 = _SGEFunction.apply(x3, weight, bias, batch, groups)
    else:
        # A copy made by .contiguous() above is ours to overwrite too.
        inplace = (inplace or x3.data_ptr() != x.data_ptr()) and x.device.type not in COMPILE_DEVICES
        with torch.autocast(x.device.type, enabled=False):  # dtypes are handled explicitly
            y3 = _gated_forward_c(x3, weight, bias, batch, groups, inplace)
    y = y3.view(batch, channels, height, width)
    # Keep the caller's memory format (channels_last models stay channels_last).
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


class SpatialGroupEnhance(nn.Module):
    """SGE module; `channels` is only used to validate the grouping early."""

    def __init__(self, channels: int, groups: int = DEFAULT_GROUPS, impl: str = "fast"):
        super().__init__()
        if groups < 1 or channels % groups != 0:
            raise UserError(
                f"SGE groups: channels={channels} is not divisible by groups={groups}; "
                f"expected a groups value that divides {channels}"
            )
        if impl not in SGE_IMPLS:
            raise UserError(f"SGE impl: got {impl!r}, expected one of {', '.join(SGE_IMPLS)}")
        self.channels = channels
        self.groups = groups
        self.impl = impl
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"SGE expected {self.channels} input channels, got {x.shape[1]}")
        check_spatial_size(x)
        if self.impl == "reference":
            return sge_reference(x, self.weight, self.bias, self.groups)
        if self.impl == "triton":
            out = sge_triton.sge(x, self.weight, self.bias, self.groups)
            if out is not None:
                return out
        return sge_fast(x, self.weight, self.bias, self.groups)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, impl={self.impl!r}"
