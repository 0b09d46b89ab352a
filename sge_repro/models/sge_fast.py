"""The fast implementations of SGE (the formula: sge.py), behind one dispatch (`sge_forward`).

"reference" is sge.sge_reference; "triton" (opt-in, CUDA) is sge_triton.py, elsewhere "fast".
"fast" on the CPU in float32 runs the C kernels of sge_cpu.c (one pass over memory, fused with the
BatchNorm in front of SGE); elsewhere torch ops with fewer passes over the activation memory (the
pooled dot product as one batched matmul, the mean of c derived analytically) and a hand-written
backward (one fused output pass instead of autograd's chain of elementwise kernels), compiled by
torch.compile on CUDA and reading channels_last blocks where they lie.
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext

import torch
from torch import nn

from sge_repro.models import sge_cpu, sge_triton
from sge_repro.models.sge import SGE_EPS, check_spatial_size, sge_reference

# Devices on which the fast path uses the elementwise formulation instead of batched matvecs.
# There it also reads channels_last tensors in place (the (sample, group, channel, position) view
# of either layout); the batched matvecs need NCHW, whose rows (sample, group) form one batch dim.
ELEMENTWISE_DEVICES = {"cuda"}
# Devices on which the fast path's math runs through torch.compile (set SGE_COMPILE=0 to disable);
# on a compile error it falls back to eager with one warning, or with SGE_REPRO_STRICT_COMPILE=1
# raises instead (the GPU tests set it: a fallback would otherwise pass them on eager kernels).
COMPILE_DEVICES = set() if os.environ.get("SGE_COMPILE", "1") == "0" else {"cuda"}
STRICT_COMPILE_ENV = "SGE_REPRO_STRICT_COMPILE"
# torch.compile arguments of the fast path. dynamic=None (torch's default): the first shapes a
# function sees compile static; a call with other shapes recompiles once with the dims that
# changed symbolic, and that graph serves later sizes (a ResNet's four stages already give each
# function four shapes, detection dozens). With dynamic=False each new size is one more compile
# until dynamo's recompile limit (8), past which the function runs eager.
COMPILE_OPTIONS = {"backend": "inductor", "dynamic": None}
_compiled: dict = {}


class CompileFallbackError(RuntimeError):
    """torch.compile failed for the SGE fast path while SGE_REPRO_STRICT_COMPILE=1 forbids eager."""


def strict_compile() -> bool:
    return os.environ.get(STRICT_COMPILE_ENV, "0") == "1"


def _maybe_compiled(function):
    """`function` itself, or on COMPILE_DEVICES its torch.compile version (built on first use)."""

    def call(x4: torch.Tensor, *args):
        if x4.device.type in COMPILE_DEVICES:
            strict = strict_compile()
            try:
                if function not in _compiled:
                    _compiled[function] = torch.compile(function, **COMPILE_OPTIONS)
                # Past its recompile limit dynamo runs a function eagerly without a word: under
                # strict that is an error too. A private config, as torch has no public switch for
                # it; runtime-only (compile_ignored), so it changes no guard or cached graph.
                with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True) if strict else nullcontext():
                    return _compiled[function](x4, *args)
            except Exception as error:  # noqa: BLE001 - compile is an optimisation, eager is exact
                message = f"SGE: torch.compile failed ({type(error).__name__}: {' '.join(str(error).split())})"
                if strict:
                    raise CompileFallbackError(f"{message}; {STRICT_COMPILE_ENV}=1 forbids the eager fallback") from error
                COMPILE_DEVICES.discard(x4.device.type)
                warnings.warn(f"{message}; using eager", stacklevel=2)
        return function(x4, *args)

    return call


# The fast path's tensors: x4 is (B, G, K, P), a view of an NCHW or (on ELEMENTWISE_DEVICES)
# channels_last activation; pooled (B, G, K); the per-position maps (B, G, P); their statistics
# (B, G, 1); gate (B, G, 1, P).


def _rows(x4: torch.Tensor) -> torch.Tensor:
    """(B*G, K, P): the batch of the batched matvecs, a view of an NCHW x4."""
    return x4.view(-1, x4.shape[2], x4.shape[3])


def _similarity(x4: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """c = m^T x per row: (B, G, K, P), (B, G, K) -> (B, G, P) in pooled's dtype. CPU: one batched
    matvec (one read of x, no temporary). CUDA: cuBLAS runs B*G tiny matvecs slowly, a broadcast
    product summed over the channel dim is a plain reduction (and one fused kernel under torch.compile)."""
    if x4.device.type in ELEMENTWISE_DEVICES:
        return (x4 * pooled.to(x4.dtype).unsqueeze(3)).sum(dim=2, dtype=pooled.dtype)
    batch, groups, channels, positions = x4.shape
    rows = torch.bmm(pooled.to(x4.dtype).view(-1, 1, channels), _rows(x4))
    return rows.view(batch, groups, positions).to(pooled.dtype)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """Per-group statistics (small tensors) in at least float32, also for bf16/fp16 activations."""
    return torch.promote_types(x.dtype, torch.float32)


def _fast_forward(x4: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Returns (y4, pooled, centered, std_eps, normalized, gate)."""
    pooled = x4.mean(dim=3, dtype=_stat_dtype(x4))  # (B, G, K): one read of x
    centered, std_eps, normalized, gate = _sge_stats(x4, pooled, weight, bias)
    return x4 * gate.to(x4.dtype), pooled, centered, std_eps, normalized, gate  # one read of x, one write of y


class _SGEFunction(torch.autograd.Function):
    """SGE with a fused backward (see module docstring). x4 is (B, G, K, P)."""

    @staticmethod
    def forward(ctx, x4, weight, bias):
        with torch.autocast(x4.device.type, enabled=False):  # dtypes are handled explicitly
            y4, pooled, centered, std_eps, normalized, gate = _fast_forward_c(x4, weight, bias)
        ctx.save_for_backward(x4, weight, pooled, centered, std_eps, normalized, gate)
        return y4

    @staticmethod
    def backward(ctx, grad_y4):
        x4, weight, pooled, centered, std_eps, normalized, gate = ctx.saved_tensors
        with torch.autocast(x4.device.type, enabled=False):
            grad_x4, grad_weight, grad_bias = _sge_backward_core_c(
                _gradient_view(grad_y4, x4), x4, weight, pooled, centered, std_eps, normalized, gate)
        return grad_x4, grad_weight, grad_bias


def _gradient_view(grad: torch.Tensor, x4: torch.Tensor) -> torch.Tensor:
    """The output gradient as (B, G, K, P): any layout for the elementwise formulation (a view
    where its strides allow), NCHW for the batched matvecs."""
    if x4.device.type in ELEMENTWISE_DEVICES:
        return grad.reshape(x4.shape)
    return grad.contiguous().view(x4.shape)


def _sge_backward_core(grad_y4, x4, weight, pooled, centered, std_eps, normalized, gate, reuse_x=False):
    """Gradients (dx4, dweight, dbias) of SGE given the forward's intermediates (see _SGEFunction)."""
    batch, groups, channels, positions = x4.shape
    gate3 = gate.squeeze(2)  # (B, G, P)
    # dL/dgate_i = sum_k gy_ki x_ki: vecdot reads both tensors once (einsum here is ~5x slower
    # on CPU: it lowers to tiny batched matmuls).
    grad_y4 = grad_y4.to(x4.dtype)
    grad_gate = torch.linalg.vecdot(grad_y4, x4, dim=2).to(gate.dtype)
    grad_affine = grad_gate * gate3 * (1.0 - gate3)  # (B, G, P)
    grad_weight = (grad_affine * normalized).sum(dim=(0, 2))
    grad_bias = grad_affine.sum(dim=(0, 2))
    grad_norm = grad_affine * weight.view(1, groups, 1)
    # n = d / (s + eps), d = c - mean(c), s = sqrt(sum d^2 / (P - 1)).
    std = std_eps - SGE_EPS
    dot = (grad_norm * centered).sum(dim=2, keepdim=True)
    grad_centered = grad_norm / std_eps - centered * (dot / (std_eps * std_eps * std.clamp_min(1e-30) * (positions - 1)))
    grad_similarity = grad_centered - grad_centered.mean(dim=2, keepdim=True)  # (B, G, P)
    # c = m^T x, m = mean_p x: dx = gy*gate + m (x) gc + (x @ gc) / P (x) 1.
    if x4.device.type in ELEMENTWISE_DEVICES:  # elementwise form (see _similarity); torch.compile fuses it into few kernels
        grad_pooled = (x4 * grad_similarity.to(x4.dtype).unsqueeze(2)).sum(dim=3, dtype=pooled.dtype) / positions
        # Starting from gy * gate gives dx the layout of dy (channels_last stays channels_last);
        # the statistics' terms are summed in their own (float32 or wider) dtype, then added.
        grad_x4 = (grad_y4 * gate.to(x4.dtype)).add_(
            torch.addcmul(grad_pooled.unsqueeze(3), pooled.unsqueeze(3), grad_similarity.unsqueeze(2)))
    else:
        rows = _rows(x4)
        grad_pooled = torch.bmm(rows, grad_similarity.to(x4.dtype).view(-1, positions, 1))
        grad_pooled = grad_pooled.view(batch, groups, channels).to(pooled.dtype) / positions
        left = torch.stack((pooled, grad_pooled), dim=3).to(x4.dtype).view(-1, channels, 2)
        right = torch.stack((grad_similarity, torch.ones_like(grad_similarity)), dim=2).to(x4.dtype).view(-1, 2, positions)
        # x4 is no longer needed: reuse its memory when the caller owns it (a fresh CPU allocation
        # costs page faults comparable to a pass over the tensor).
        grad_rows = torch.mul(_rows(grad_y4), _rows(gate.to(x4.dtype)), out=rows if reuse_x else None)
        grad_rows.baddbmm_(left, right)  # in place: one pass over the output
        grad_x4 = grad_rows.view(x4.shape)
    shape = (1, groups, 1, 1)
    return grad_x4, grad_weight.view(shape).to(weight.dtype), grad_bias.view(shape).to(weight.dtype)


def _sge_stats(x4: torch.Tensor, pooled: torch.Tensor, weight, bias):
    """(centered, std_eps, normalized, gate) from x4 and its pooled vector."""
    groups, positions = x4.shape[1], x4.shape[3]
    # c = m^T x as a batched matvec: one read of x, no (B, G, K, P) temporary.
    # mean_p(c) = <m, mean_p(x)> = |m|^2: no extra reduction needed.
    similarity = _similarity(x4, pooled)
    centered = similarity - (pooled * pooled).sum(dim=2, keepdim=True)
    std_eps = centered.square().sum(dim=2, keepdim=True).div_(positions - 1).sqrt_().add_(SGE_EPS)
    normalized = centered / std_eps
    affine = normalized * weight.view(1, groups, 1) + bias.view(1, groups, 1)
    gate = torch.sigmoid(affine).unsqueeze(2)
    return centered, std_eps, normalized, gate


def _sge_gate(x4: torch.Tensor, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate (B, G, 1, P), pooled (B, G, K)) only, in few passes over the small (B, G, P) maps:
    centre, norm, then sigmoid(w / (std + eps) * centered + b) in place (torch.std's
    Welford kernel is ~6x slower on CPU than this two-pass form)."""
    groups, positions = x4.shape[1], x4.shape[3]
    pooled = x4.mean(dim=3, dtype=_stat_dtype(x4))
    centered = _similarity(x4, pooled).sub_((pooled * pooled).sum(dim=2, keepdim=True))  # mean_p(c) = |m|^2
    std_eps = torch.linalg.vector_norm(centered, dim=2, keepdim=True).div_((positions - 1) ** 0.5).add_(SGE_EPS)
    scale = weight.view(1, groups, 1).to(std_eps.dtype) / std_eps  # (B, G, 1)
    # In place on the small maps: on CPU each fresh block allocation costs page faults.
    gate = centered.mul_(scale).add_(bias.view(1, groups, 1).to(std_eps.dtype)).sigmoid_()
    return gate.unsqueeze(2), pooled


def _gated_forward(x4: torch.Tensor, weight, bias, inplace: bool = False) -> torch.Tensor:
    """y4 = x4 * gate; with inplace, written into x4 (no new block-sized allocation)."""
    gate = _sge_gate(x4, weight, bias)[0].to(x4.dtype)
    return x4.mul_(gate) if inplace else x4 * gate


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
        if not _is_channels_last(x):
            x = x.contiguous()  # (native_batch_norm keeps z's layout: a no-op)
        x4 = _group_view(x, groups)
        gate, pooled = _sge_gate_c(x4, weight, bias)
        x4.mul_(gate.to(x4.dtype))  # x is ours and unsaved: y is written into it
        y = x  # the base tensor, not a view of it: callers may add to it in place (the residual sum)
        ctx.save_for_backward(z, bn_weight, bn_bias, weight, bias, running_mean, running_var, save_mean, save_invstd, pooled)
        ctx.use_batch_stats, ctx.eps, ctx.groups = use_batch_stats, eps, groups
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, bn_weight, bn_bias, weight, bias, running_mean, running_var, save_mean, save_invstd, pooled = ctx.saved_tensors
        # Recompute the BN output: x = z * scale + shift with the statistics the forward used.
        if ctx.use_batch_stats:
            mean, invstd = save_mean, save_invstd
        else:
            mean, invstd = running_mean, torch.rsqrt(running_var + ctx.eps)
        scale = bn_weight * invstd
        shift = bn_bias - mean * scale
        x = torch.addcmul(shift.view(1, -1, 1, 1), z, scale.view(1, -1, 1, 1))  # z's layout
        x4 = _group_view(x, ctx.groups)
        centered, std_eps, normalized, gate = _sge_stats_c(x4, pooled, weight, bias)
        grad_x4, grad_weight, grad_bias = _sge_backward_core_c(
            _gradient_view(grad_y, x4), x4, weight, pooled, centered, std_eps, normalized, gate, x4.device.type == "cpu")
        del x, x4
        grad_z, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad_x4.reshape(z.shape), z, bn_weight, running_mean, running_var,
            save_mean, save_invstd, ctx.use_batch_stats, ctx.eps, [True, True, True])
        return grad_z, grad_bn_weight, grad_bn_bias, grad_weight, grad_bias, None, None, None, None, None, None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def batchnorm_sge(z: torch.Tensor, bn: nn.Module, sge: nn.Module) -> torch.Tensor:
    """sge(bn(z)) for a SpatialGroupEnhance `sge`, by the path `_batchnorm_sge_path` picks."""
    if sge.normalize:
        check_spatial_size(z)
    path = _batchnorm_sge_path(z, bn, sge)
    if path is None:
        return sge(bn(z))
    if path == "inference":
        out = bn(z)
        if out.shape[1] != sge.channels:
            raise ValueError(f"SGE expected {sge.channels} input channels, got {out.shape[1]}")
        return sge_fast(out, sge.weight, sge.bias, sge.groups, inplace=out is not z)  # BN's output is ours
    if z.shape[1] != sge.channels:
        raise ValueError(f"SGE expected {sge.channels} input channels, got {z.shape[1]}")
    use_batch_stats, momentum = _bn_forward_args(bn)
    function = sge_cpu.BatchNormSGEFunction if path == "c" else _BatchNormSGEFunction
    return function.apply(z, bn.weight, bn.bias, sge.weight, sge.bias, bn.running_mean, bn.running_var,
                          use_batch_stats, momentum, bn.eps, sge.groups)


def _batchnorm_sge_path(z: torch.Tensor, bn: nn.Module, sge: nn.Module) -> str | None:
    """How sge(bn(z)) is computed, the one dispatch of the fused block:
    - "c": the C kernels' fused BatchNorm + SGE (CPU, float32, NCHW, a plain BatchNorm2d);
    - "inference": without gradients, BN then the fast SGE written into BN's output;
    - "torch": with gradients, one autograd Function that saves only z (float32 / 64, NCHW or
      channels_last on ELEMENTWISE_DEVICES, an affine BatchNorm2d tracking its statistics);
    - None: the two modules in turn, so that forward hooks, FrozenBatchNorm, SyncBatchNorm,
      autocast and other layouts all keep working."""
    if sge.computed_impl != "fast" or _has_hooks(bn) or _has_hooks(sge):
        return None
    plain_bn = type(bn) is nn.BatchNorm2d and not torch.is_autocast_enabled(z.device.type)
    if plain_bn and z.is_contiguous() and sge_cpu.applies(z) and sge_cpu.batchnorm_applies(bn):
        return "c"
    if not torch.is_grad_enabled():
        return "inference"
    if (plain_bn and bn.affine and bn.track_running_stats and z.dtype in (torch.float32, torch.float64)
            and (z.is_contiguous() or (_is_channels_last(z) and z.device.type in ELEMENTWISE_DEVICES))
            and z.shape[2] * z.shape[3] > 1):
        return "torch"
    return None


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _group_view(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, G, K, P), a view of an NCHW or a channels_last x."""
    batch, channels, height, width = x.shape
    return x.view(batch, groups, channels // groups, height * width)


def sge_fast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, inplace: bool = False) -> torch.Tensor:
    """SGE with fewer memory passes. inplace: without gradients, overwrite a contiguous x with the
    result (saves one block-sized allocation; the caller must not need x afterwards). The result
    keeps the caller's memory format (channels_last models stay channels_last)."""
    channels_last = _is_channels_last(x)
    if sge_cpu.applies(x) and not torch.is_autocast_enabled("cpu"):
        y = sge_cpu.sge(x, weight, bias, groups, inplace)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y
    # The elementwise formulation reads channels_last in place; the batched matvecs need NCHW.
    source = x if channels_last and x.device.type in ELEMENTWISE_DEVICES else x.contiguous()
    x4 = _group_view(source, groups)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        y4 = _SGEFunction.apply(x4, weight, bias)
    else:
        # A copy made by .contiguous() above is ours to overwrite too.
        inplace = (inplace or source.data_ptr() != x.data_ptr()) and x.device.type not in COMPILE_DEVICES
        with torch.autocast(x.device.type, enabled=False):  # dtypes are handled explicitly
            y4 = _gated_forward_c(x4, weight, bias, inplace)
    y = y4.reshape(x.shape)  # a view: y4 has x4's layout
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def sge_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, impl: str,
                normalize: bool = True) -> torch.Tensor:
    """SGE by the implementation `impl` names. The fast, C and Triton kernels compute only the
    paper's normalised gate: without normalisation (an ablation, not a hot path) every impl runs
    the reference formula. Triton falls back to the fast path where it does not run."""
    if impl == "reference" or not normalize:
        return sge_reference(x, weight, bias, groups, normalize)
    if impl == "triton":
        out = sge_triton.sge(x, weight, bias, groups)
        if out is not None:
            return out
    return sge_fast(x, weight, bias, groups)

