"""SGE as two Triton kernels (forward, backward) for CUDA: `impl="triton"`.

The torch-ops fast path launches about 15 small kernels per block and direction; on a GPU at
ResNet sizes those launches, not memory traffic, set the cost. Here one program handles one
(sample, group) row of K channels x P positions in a few passes (re-read from L1/L2, not from
memory), so each direction is one launch per block. Statistics are in float32 whatever the
activation dtype; rows are addressed through strides, so NCHW and channels_last tensors are read
and written where they lie. Correctness is tested on the CPU with Triton's interpreter
(TRITON_INTERPRET=1 set before Triton is imported: tests/models/test_sge_triton.py).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: impl="triton" falls back to "fast"
    triton = None

SGE_EPS = 1e-5
# Elements of one row tile held by a program (fp32 registers): enough for a whole ResNet row at
# 224 px (4 x 3136 at stage 1), bounded for large detection maps (those loop over positions).
TILE_ELEMENTS = 4096


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def applies(x: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors (or on any tensor under the interpreter)."""
    return triton is not None and (x.is_cuda or interpreted()) and x.dim() == 4


if triton is not None:

    @triton.jit
    def _row_statistics(x_ptr, base, K, P, stride_c, stride_p, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
        """Channel means m (BLOCK_K,), then mean and sum of squares of c'_p = sum_k m_k (x_kp - m_k)
        (= c_p - |m|^2: centred terms, accurate in float32)."""
        ks = tl.arange(0, BLOCK_K)[:, None]
        acc = tl.zeros((BLOCK_K, BLOCK_P), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)[None, :]
            acc += tl.load(x_ptr + base + ks * stride_c + ps * stride_p, mask=(ks < K) & (ps < P), other=0.0).to(tl.float32)
        m = tl.sum(acc, axis=1) / P
        total = tl.zeros((BLOCK_P,), tl.float32)
        squares = tl.zeros((BLOCK_P,), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)[None, :]
            mask = (ks < K) & (ps < P)
            x = tl.load(x_ptr + base + ks * stride_c + ps * stride_p, mask=mask, other=0.0).to(tl.float32)
            c = tl.sum(tl.where(mask, m[:, None] * (x - m[:, None]), 0.0), axis=0)
            total += c
            squares += c * c
        return m, tl.sum(total) / P, tl.sum(squares)

    @triton.jit
    def _row_base(row, G, K, stride_b, stride_c):
        """Offset of channel 0 of row (sample, group) = (row // G, row % G)."""
        return (row // G).to(tl.int64) * stride_b + ((row % G) * K).to(tl.int64) * stride_c

    @triton.jit
    def _sge_forward_kernel(x_ptr, y_ptr, w_ptr, b_ptr, G, K, P, stride_b, stride_c, stride_p, eps,
                            BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
        row = tl.program_id(0)
        base = _row_base(row, G, K, stride_b, stride_c)
        m, residual, squares = _row_statistics(x_ptr, base, K, P, stride_c, stride_p, BLOCK_K, BLOCK_P)
        variance = tl.maximum(squares - P * residual * residual, 0.0) / (P - 1)
        gain = tl.load(w_ptr + row % G).to(tl.float32) / (tl.sqrt(variance) + eps)
        offset = tl.load(b_ptr + row % G).to(tl.float32)
        ks = tl.arange(0, BLOCK_K)[:, None]
        for p0 in range(0, P, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)[None, :]
            mask = (ks < K) & (ps < P)
            offsets = base + ks * stride_c + ps * stride_p
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            c = tl.sum(tl.where(mask, m[:, None] * (x - m[:, None]), 0.0), axis=0) - residual
            gate = tl.sigmoid(gain * c + offset)
            tl.store(y_ptr + offsets, (x * gate[None, :]).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_tile(x_ptr, gy_ptr, base, p0, K, P, stride_c, stride_p, m, residual, std_eps, w, b,
                       BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
        """One tile of positions [p0, p0 + BLOCK_P) recomputed from x and dy: (x, dy, d, gate,
        dL/d(w n + b) zeroed past P, element offsets, mask)."""
        ks = tl.arange(0, BLOCK_K)[:, None]
        ps = p0 + tl.arange(0, BLOCK_P)[None, :]
        mask = (ks < K) & (ps < P)
        offsets = base + ks * stride_c + ps * stride_p
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        d = tl.sum(tl.where(mask, m[:, None] * (x - m[:, None]), 0.0), axis=0) - residual
        gate = tl.sigmoid(w * d / std_eps + b)
        grad_affine = tl.sum(gy * x, axis=0) * gate * (1.0 - gate)
        grad_affine = tl.where(p0 + tl.arange(0, BLOCK_P) < P, grad_affine, 0.0)
        return x, gy, d, gate, grad_affine, offsets, mask

    @triton.jit
    def _sge_backward_kernel(x_ptr, gy_ptr, gx_ptr, w_ptr, b_ptr, gw_ptr, gb_ptr, G, K, P, stride_b, stride_c, stride_p,
                             eps, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
        """dx (and per-row partial dgamma, dbeta) for y = x * sigmoid(w n + b), n = d / (s + eps),
        d = c - mean(c), c = m^T x; the same derivation as sge_fast.py's _sge_backward_core."""
        row = tl.program_id(0)
        base = _row_base(row, G, K, stride_b, stride_c)
        m, residual, squares = _row_statistics(x_ptr, base, K, P, stride_c, stride_p, BLOCK_K, BLOCK_P)
        std = tl.sqrt(tl.maximum(squares - P * residual * residual, 0.0) / (P - 1))
        std_eps = std + eps
        w = tl.load(w_ptr + row % G).to(tl.float32)
        b = tl.load(b_ptr + row % G).to(tl.float32)
        # Pass A: dgamma, dbeta and <dL/dn, d>.
        grad_w = tl.zeros((BLOCK_P,), tl.float32)
        grad_b = tl.zeros((BLOCK_P,), tl.float32)
        dot = tl.zeros((BLOCK_P,), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            x, gy, d, gate, grad_affine, offsets, mask = _backward_tile(
                x_ptr, gy_ptr, base, p0, K, P, stride_c, stride_p, m, residual, std_eps, w, b, BLOCK_K, BLOCK_P)
            grad_w += grad_affine * d / std_eps
            grad_b += grad_affine
            dot += grad_affine * w * d
        tl.store(gw_ptr + row, tl.sum(grad_w))
        tl.store(gb_ptr + row, tl.sum(grad_b))
        correction = tl.where(std > 1e-30, tl.sum(dot) / (std_eps * std_eps * std * (P - 1)), 0.0)
        # Pass B: dL/dd = dn / (s + eps) - d * correction; its mean, and sum_p x_kp dL/dd_p.
        grad_sum = tl.zeros((BLOCK_P,), tl.float32)
        x_dot = tl.zeros((BLOCK_K, BLOCK_P), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            x, gy, d, gate, grad_affine, offsets, mask = _backward_tile(
                x_ptr, gy_ptr, base, p0, K, P, stride_c, stride_p, m, residual, std_eps, w, b, BLOCK_K, BLOCK_P)
            grad_d = tl.where(p0 + tl.arange(0, BLOCK_P) < P, grad_affine * w / std_eps - d * correction, 0.0)
            grad_sum += grad_d
            x_dot += x * grad_d[None, :]
        grad_mean = tl.sum(grad_sum) / P
        # Pass C: dx_kp = gy_kp gate_p + m_k dc_p + (1/P) sum_p' x_kp' dc_p', dc = dd - mean(dd).
        grad_pooled = tl.sum(x_dot, axis=1) / P - grad_mean * m
        for p0 in range(0, P, BLOCK_P):
            x, gy, d, gate, grad_affine, offsets, mask = _backward_tile(
                x_ptr, gy_ptr, base, p0, K, P, stride_c, stride_p, m, residual, std_eps, w, b, BLOCK_K, BLOCK_P)
            grad_c = grad_affine * w / std_eps - d * correction - grad_mean
            gx = gy * gate[None, :] + m[:, None] * grad_c[None, :] + grad_pooled[:, None]
            tl.store(gx_ptr + offsets, gx.to(gx_ptr.dtype.element_ty), mask=mask)


def _blocks(channels_per_group: int, positions: int) -> tuple[int, int]:
    block_k = triton.next_power_of_2(channels_per_group)
    block_p = min(triton.next_power_of_2(positions), max(1, TILE_ELEMENTS // block_k))
    return block_k, max(block_p, 2)


@dataclass(frozen=True)
class _Layout:
    """Where element (b, c, p = h * W + w) of an NCHW- or channels_last-contiguous tensor lies:
    b * stride_b + c * stride_c + p * stride_p (from the format, not from .stride(): the strides
    of size-1 dims are arbitrary)."""

    memory_format: torch.memory_format
    stride_b: int
    stride_c: int
    stride_p: int

    @staticmethod
    def of(x: torch.Tensor) -> "_Layout":
        channels, positions = x.shape[1], x.shape[2] * x.shape[3]
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return _Layout(torch.channels_last, channels * positions, 1, channels)
        return _Layout(torch.contiguous_format, channels * positions, positions, 1)


class SGETritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int):
        batch, channels, height, width = x.shape
        layout = _Layout.of(x)
        x = x.contiguous(memory_format=layout.memory_format)  # a no-op unless x is neither layout
        y = torch.empty_like(x, memory_format=layout.memory_format)
        per_group, positions = channels // groups, height * width
        block_k, block_p = _blocks(per_group, positions)
        # Triton launches on the current CUDA device, not on the tensors' (device: cuda:1).
        with torch.cuda.device_of(x):
            _sge_forward_kernel[(batch * groups,)](
                x, y, weight.detach().contiguous(), bias.detach().contiguous(), groups, per_group, positions,
                layout.stride_b, layout.stride_c, layout.stride_p, SGE_EPS, BLOCK_K=block_k, BLOCK_P=block_p)
        ctx.save_for_backward(x, weight, bias)
        ctx.groups, ctx.layout = groups, layout
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias = ctx.saved_tensors
        groups, layout = ctx.groups, ctx.layout
        batch, channels, height, width = x.shape
        grad_y = grad_y.contiguous(memory_format=layout.memory_format).to(x.dtype)  # x's layout: one set of strides
        grad_x = torch.empty_like(x, memory_format=layout.memory_format)
        grad_weight_rows = torch.empty(batch * groups, dtype=torch.float32, device=x.device)
        grad_bias_rows = torch.empty(batch * groups, dtype=torch.float32, device=x.device)
        per_group, positions = channels // groups, height * width
        block_k, block_p = _blocks(per_group, positions)
        with torch.cuda.device_of(x):
            _sge_backward_kernel[(batch * groups,)](
                x, grad_y, grad_x, weight.detach().contiguous(), bias.detach().contiguous(), grad_weight_rows,
                grad_bias_rows, groups, per_group, positions, layout.stride_b, layout.stride_c, layout.stride_p,
                SGE_EPS, BLOCK_K=block_k, BLOCK_P=block_p)
        grad_weight = grad_weight_rows.view(batch, groups).sum(0).view(weight.shape).to(weight.dtype)
        grad_bias = grad_bias_rows.view(batch, groups).sum(0).view(bias.shape).to(bias.dtype)
        return grad_x, grad_weight, grad_bias, None


_warned = False


def sge(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor | None:
    """SGE through the Triton kernels, or None when they do not apply here (the caller then uses
    the fast path; said once). The result has x's layout (NCHW or channels_last)."""
    global _warned
    if not applies(x):
        if not _warned:
            _warned = True
            reason = "Triton is not installed" if triton is None else f"the input is on {x.device.type}, not CUDA"
            warnings.warn(f"SGE impl 'triton': {reason}; using the 'fast' implementation", stacklevel=3)
        return None
    with torch.autocast(x.device.type, enabled=False):  # the kernels handle dtypes themselves
        return SGETritonFunction.apply(x, weight, bias, groups)
