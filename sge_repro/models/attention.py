"""The attention modules (the paper's SGE and its baselines) and a factory taking a name or a
callable (as timm's create_attn): `create_attention("se", 256)`, `create_attention(MyGate, 256)`.

A module's `placement` class attribute says where it sits, as in the authors' PytorchInsight code:
"block" (sge, se, cbam, gc: on the residual branch after the block's last BN, before the identity
addition, stored as `block.<name>`), "stage" (bam, after layer1..3: `model.bam1..3`) or "conv"
(sk: a second grouped 3x3 branch beside conv2, `block.sk`); a callable without one is a block
attention (`block.attn`). Where the authors' modules compute something else than ours (BAM's
product of gates, their pooling ops' float order), `use_authors_computation()` switches a module
to their exact ops without touching its parameters; loading their release files does it.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from sge_repro.errors import UserError
from sge_repro.models.sge import (DEFAULT_BIAS_INIT, DEFAULT_GROUPS, DEFAULT_NORMALIZE, DEFAULT_WEIGHT_INIT, SGE_IMPLS,
                                  check_spatial_size)
from sge_repro.models.sge_fast import sge_forward

DEFAULT_REDUCTION = 16  # hidden = channels / 16 in SE, CBAM, GC, BAM and SK's squeeze
SK_CONV_GROUPS = 32  # the authors' SK* grouped 3x3 branch
AttentionSpec = Union[str, Callable[..., nn.Module], None]


class SpatialGroupEnhance(nn.Module):
    """SGE, the paper's module (its formula: sge.py). `channels` is only used to validate the
    grouping early. weight_init / bias_init: the initial gamma / beta of every group; normalize:
    the spatial normalisation of the similarity (the paper's module: 0, 1, True). `impl` picks
    the implementation (sge_fast.sge_forward)."""

    def __init__(self, channels: int, groups: int = DEFAULT_GROUPS, impl: str = "fast",
                 weight_init: float = DEFAULT_WEIGHT_INIT, bias_init: float = DEFAULT_BIAS_INIT,
                 normalize: bool = DEFAULT_NORMALIZE):
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
        self.normalize = bool(normalize)
        self.weight = nn.Parameter(torch.full((1, groups, 1, 1), float(weight_init)))
        self.bias = nn.Parameter(torch.full((1, groups, 1, 1), float(bias_init)))

    @property
    def computed_impl(self) -> str:
        """The implementation that runs: `impl`, except that the fast, C and Triton kernels compute
        only the paper's normalised gate, so the ablation without normalisation (a study, not a
        hot path) runs the reference formula under every impl."""
        return self.impl if self.normalize else "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"SGE expected {self.channels} input channels, got {x.shape[1]}")
        if self.normalize:
            check_spatial_size(x)
        return sge_forward(x, self.weight, self.bias, self.groups, self.impl, self.normalize)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, groups={self.groups}, impl={self.impl!r}"
                + ("" if self.normalize else ", normalize=False"))


def _reduced(channels: int, reduction: int) -> int:
    return max(1, channels // reduction)


class SqueezeExcite(nn.Module):
    """SE (Hu et al.): channel gate from the pooled vector through a bottleneck MLP (reduction 16)."""

    def __init__(self, channels: int, reduction: int = DEFAULT_REDUCTION):
        super().__init__()
        hidden = _reduced(channels, reduction)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        scale = self.fc(self.avg_pool(x).view(batch, channels)).view(batch, channels, 1, 1)
        return x * scale


class CBAM(nn.Module):
    """CBAM (Woo et al.): channel gate (shared MLP on avg- and max-pooled vectors), then a spatial
    gate (7x7 conv + BN over the channel-wise max and mean maps)."""

    def __init__(self, channels: int, reduction: int = DEFAULT_REDUCTION, spatial_kernel: int = 7):
        super().__init__()
        hidden = _reduced(channels, reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial_conv = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, bias=False)
        self.spatial_bn = nn.BatchNorm2d(1)
        self.authors_computation = False

    def use_authors_computation(self) -> None:
        """Their pooling ops (adaptive avg / max pooling) and their spatial BN momentum (0.01)."""
        self.authors_computation = True
        self.spatial_bn.momentum = 0.01

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        if self.authors_computation:
            pooled_avg = F.adaptive_avg_pool2d(x, 1).flatten(1)
            pooled_max = F.adaptive_max_pool2d(x, 1).flatten(1)
        else:
            pooled_avg = x.mean(dim=(2, 3))
            pooled_max = x.amax(dim=(2, 3))
        channel_gate = torch.sigmoid(self.mlp(pooled_avg) + self.mlp(pooled_max))
        x = x * channel_gate.view(batch, channels, 1, 1)
        compressed = torch.cat((x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)), dim=1)
        spatial_gate = torch.sigmoid(self.spatial_bn(self.spatial_conv(compressed)))
        return x * spatial_gate


class GlobalContext(nn.Module):
    """GC block (Cao et al.): softmax-attention pooling to one context vector, a bottleneck
    transform with LayerNorm, added to every position ("channel add" fusion)."""

    def __init__(self, channels: int, reduction: int = DEFAULT_REDUCTION):
        super().__init__()
        hidden = _reduced(channels, reduction)
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )

    def init_weights(self) -> None:
        # GCNet starts as identity: zero the last transform conv.
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        attention = self.conv_mask(x).view(batch, 1, height * width).softmax(dim=2)  # (B, 1, P)
        context = torch.bmm(x.reshape(batch, channels, height * width), attention.transpose(1, 2))
        return x + self.transform(context.view(batch, channels, 1, 1))


class BottleneckAttention(nn.Module):
    """BAM (Park et al.), between stages: y = x * (1 + sigmoid(channel_gate + spatial_gate)).
    Channel gate: MLP with BN on the pooled vector; spatial gate: 1x1 reduce, two dilated 3x3
    convs (dilation 4), 1x1 to one map, each hidden conv followed by BN + ReLU.

    The authors' computation (their PytorchInsight resnet_bam.py, as the BAM authors' own code)
    differs from the BAM paper's sum: y = x * (1 + sigmoid(channel_gate * spatial_gate)), and the
    channel gate pools with an H x H window of stride H (the global mean on square maps)."""

    placement = "stage"

    def __init__(self, channels: int, reduction: int = DEFAULT_REDUCTION, dilation: int = 4):
        super().__init__()
        hidden = _reduced(channels, reduction)
        self.channel_gate = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )
        layers: list[nn.Module] = [nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        for _ in range(2):
            layers += [
                nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(hidden, 1, 1))
        self.spatial_gate = nn.Sequential(*layers)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.authors_computation = False

    def use_authors_computation(self) -> None:
        """The product of the two gates and the H x H pooling window of the authors' code."""
        self.authors_computation = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        if self.authors_computation:
            height = x.shape[2]
            channel = self.channel_gate(F.avg_pool2d(x, height, stride=height)).view(batch, channels, 1, 1)
            return x * (1.0 + torch.sigmoid(channel * self.spatial_gate(x)))
        channel = self.channel_gate(self.avg_pool(x)).view(batch, channels, 1, 1)
        spatial = self.spatial_gate(x)
        return x * (1.0 + torch.sigmoid(channel + spatial))


class SelectiveKernelBranch(nn.Module):
    """The authors' SK*: a 3x3 grouped-conv branch (32 groups) beside the block's dense 3x3 conv,
    fused by a squeeze (planes/16, BN, ReLU) and a softmax over the two branches per channel."""

    placement = "conv"

    def __init__(self, in_planes: int, planes: int, stride: int = 1, conv_groups: int = SK_CONV_GROUPS,
                 reduction: int = DEFAULT_REDUCTION):
        super().__init__()
        if planes % conv_groups != 0 or in_planes % conv_groups != 0:
            raise UserError(
                f"SK attention: block channels={planes} (input {in_planes}) are not divisible by the "
                f"SK conv groups={conv_groups}; use a width that is a multiple of {conv_groups}"
            )
        hidden = _reduced(planes, reduction)
        self.planes = planes
        self.conv = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, groups=conv_groups, bias=False)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.squeeze = nn.Conv2d(planes, hidden, 1, bias=False)
        self.squeeze_bn = nn.BatchNorm2d(hidden)
        self.select = nn.Conv2d(hidden, 2 * planes, 1, bias=False)
        self.authors_computation = False

    def use_authors_computation(self) -> None:
        """The authors pool each branch, then add the two pooled vectors (the same sum, another float order)."""
        self.authors_computation = True

    def forward(self, block_input: torch.Tensor, dense_branch: torch.Tensor) -> torch.Tensor:
        grouped_branch = self.relu(self.bn(self.conv(block_input)))
        if self.authors_computation:
            summary = F.adaptive_avg_pool2d(dense_branch, 1) + F.adaptive_avg_pool2d(grouped_branch, 1)
        else:
            summary = (dense_branch + grouped_branch).mean(dim=(2, 3), keepdim=True)
        squeezed = self.relu(self.squeeze_bn(self.squeeze(summary)))
        batch = summary.shape[0]
        weights = self.select(squeezed).view(batch, 2, self.planes, 1, 1).softmax(dim=1)
        return dense_branch * weights[:, 0] + grouped_branch * weights[:, 1]


# name -> module class, in the order `sge-repro models` lists them.
ATTENTIONS: dict[str, Callable[..., nn.Module]] = {
    "sge": SpatialGroupEnhance,
    "se": SqueezeExcite,
    "cbam": CBAM,
    "bam": BottleneckAttention,
    "sk": SelectiveKernelBranch,
    "gc": GlobalContext,
}
ATTENTION_NAMES = ("none", *ATTENTIONS)


def get_attention(attention: AttentionSpec) -> Callable[..., nn.Module] | None:
    """The module class (or callable) for a name or callable; None for "none" / None."""
    if attention is None or attention == "none":
        return None
    if callable(attention):
        return attention
    try:
        return ATTENTIONS[attention]
    except (KeyError, TypeError):
        raise UserError(f"attention: unknown name {attention!r}, expected one of {', '.join(ATTENTION_NAMES)} "
                        "or a callable returning an nn.Module") from None


def attention_placement(attention: AttentionSpec) -> str:
    """'none' | 'block' | 'stage' | 'conv' for an attention name or callable."""
    factory = get_attention(attention)
    return "none" if factory is None else getattr(factory, "placement", "block")


def create_attention(attention: AttentionSpec, channels: int, **kwargs) -> nn.Module | None:
    """A block or stage attention for `channels` channels (kwargs go to its constructor); None for
    'none'. SK replaces a conv: its block builds it (it needs the block's input and stride)."""
    factory = get_attention(attention)
    if factory is None:
        return None
    if attention_placement(factory) == "conv":
        raise UserError(f"attention {attention!r} replaces a conv; build it with SelectiveKernelBranch inside a block")
    return factory(channels, **kwargs)
