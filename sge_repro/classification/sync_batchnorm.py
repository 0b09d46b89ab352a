"""BatchNorm whose training statistics span every rank, on any device and backend (gloo too).

torch's nn.SyncBatchNorm only runs on CUDA (and similar accelerators). GlobalBatchNorm2d does
the same job with two differentiable all-reduces per layer, so a CPU / gloo run with N ranks
computes what one process computes on the whole global batch: the forward (statistics over
all ranks' samples), the backward (gradients flow back through the all-reduces) and the running
statistics. It is slower than the fused CUDA kernels; on CUDA, convert_sync_batchnorm uses
torch's own class.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: every rank's output feeds every rank's loss, so the
    gradient of each input is the sum of all ranks' output gradients (one more all-reduce).
    (torch.distributed.nn.functional.all_reduce does the same but is deprecated.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        summed = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        return summed

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of `tensor` over the ranks of `group`, with gradients flowing back to every rank."""
    return _AllReduceSum.apply(tensor, group)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d with batch statistics over the samples of every rank in `process_group`.

    Training with more than one rank: mean and (biased) variance over all ranks' N*H*W values per
    channel, computed in two passes (sum, then sum of squared deviations from the global mean)
    for the accuracy of a single-process BatchNorm; running_mean / running_var /
    num_batches_tracked update exactly as nn.BatchNorm2d's do (unbiased variance, `momentum`,
    or the cumulative average when momentum is None). Every rank must call it the same number of
    times (it is a collective). Eval mode, one rank or no process group: plain nn.BatchNorm2d.
    Same parameters and buffers as nn.BatchNorm2d, so state dicts are interchangeable.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size(self.process_group) <= 1:
            return super().forward(input)
        self._check_input_dim(input)

        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)

        # Statistics in fp32 at least (bf16 / fp16 inputs under autocast), output in the input dtype.
        stats_dtype = torch.promote_types(input.dtype, torch.float32)
        x = input.to(stats_dtype)
        reduce_dims = (0, 2, 3)
        local_count = x.numel() // x.shape[1]
        local_sum_and_count = torch.cat([x.sum(reduce_dims), x.new_full((1,), float(local_count))])
        global_sum_and_count = all_reduce_sum(local_sum_and_count, self.process_group)
        count = global_sum_and_count[-1]
        mean = global_sum_and_count[:-1] / count
        centered = x - mean.view(1, -1, 1, 1)
        squared_deviations = all_reduce_sum(centered.square().sum(reduce_dims), self.process_group)
        var = squared_deviations / count  # biased, as BatchNorm normalises with
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight.to(stats_dtype)
        output = centered * scale.view(1, -1, 1, 1)
        if self.affine:
            output = output + self.bias.to(stats_dtype).view(1, -1, 1, 1)

        if self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                unbiased_var = var.detach() * (count / (count - 1.0).clamp(min=1.0))
                self.running_mean.mul_(1.0 - momentum).add_(mean.detach().to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1.0 - momentum).add_(unbiased_var.to(self.running_var.dtype), alpha=momentum)
        return output.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str, process_group=None) -> nn.Module:
    """The model with BatchNorm statistics shared across ranks: torch's nn.SyncBatchNorm on CUDA,
    GlobalBatchNorm2d elsewhere (CPU / gloo). Parameters and buffers (state_dict keys and
    values) are kept, so checkpoints load either way. Returns the (possibly new) root module."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _swap_batchnorm2d(module, process_group)


def _swap_batchnorm2d(module: nn.Module, process_group) -> nn.Module:
    # Exactly nn.BatchNorm2d: leave subclasses (frozen, already synced) alone.
    if type(module) is nn.BatchNorm2d:
        replacement = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                        module.track_running_stats, process_group)
        if module.affine:
            replacement.weight, replacement.bias = module.weight, module.bias
        replacement.running_mean = module.running_mean
        replacement.running_var = module.running_var
        replacement.num_batches_tracked = module.num_batches_tracked
        replacement.training = module.training
        if hasattr(module, "qconfig"):
            replacement.qconfig = module.qconfig
        return replacement
    for name, child in module.named_children():
        converted = _swap_batchnorm2d(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
