"""One ResNet for every model in the zoo; the block attention is chosen by name.

Parameter names of the shared parts equal torchvision's ResNet (conv1, bn1, layer1..layer4,
fc; downsample.0 / downsample.1; the stride sits in the 3x3 conv), so torchvision state dicts
load into the plain model and the authors' release files load into the SGE model.
"""

from __future__ import annotations

import torch
from torch import nn

from sge_repro.models.attention import AttentionSpec, attention_placement, create_attention, get_attention
from sge_repro.models.sge import DEFAULT_GROUPS
from sge_repro.models.sge_fast import batchnorm_sge

DEFAULT_WIDTH = 64  # channels of the stem and layer1 in the paper's ResNets


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _attach_block_attention(block: nn.Module, attention: AttentionSpec, placement: str, channels: int,
                            groups: int, sge_impl: str, sge_options: dict | None) -> None:
    """Sets block.attention_name and, for an attention after the block's last BN, the module
    itself under that name (state-dict keys like `layer1.0.sge.weight`, as the releases; a
    callable attention is stored as `attn`). sge_options: SpatialGroupEnhance's weight_init /
    bias_init / normalize (None: the paper's)."""
    if placement != "block":
        block.attention_name = None
        return
    block.attention_name = attention if isinstance(attention, str) else "attn"
    kwargs = {"groups": groups, "impl": sge_impl, **(sge_options or {})} if attention == "sge" else {}
    setattr(block, block.attention_name, create_attention(attention, channels, **kwargs))


def _last_bn_and_attention(block: nn.Module, conv_out: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """bn, then the block attention (if any): the part SGE's placement is about."""
    if block.attention_name == "sge":
        return batchnorm_sge(conv_out, bn, block.sge)  # may fuse BN + SGE to save activation memory
    out = bn(conv_out)
    return getattr(block, block.attention_name)(out) if block.attention_name else out


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        attention: AttentionSpec = "none",
        groups: int = DEFAULT_GROUPS,
        sge_impl: str = "fast",
        sge_options: dict | None = None,
    ):
        super().__init__()
        placement = attention_placement(attention)
        if placement == "conv":
            raise ValueError(f"attention {attention!r} needs a Bottleneck block")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        _attach_block_attention(self, attention, placement, planes, groups, sge_impl, sge_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = _last_bn_and_attention(self, self.conv2(out), self.bn2)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity  # in place, as torchvision: a fresh tensor per block costs ~5 % of ResNet50's time
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        attention: AttentionSpec = "none",
        groups: int = DEFAULT_GROUPS,
        sge_impl: str = "fast",
        sge_options: dict | None = None,
    ):
        super().__init__()
        placement = attention_placement(attention)
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        _attach_block_attention(self, attention, placement, planes * self.expansion, groups, sge_impl,
                                sge_options)
        self.sk = get_attention(attention)(planes, planes, stride) if placement == "conv" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        dense = self.relu(self.bn2(self.conv2(out)))
        out = self.sk(out, dense) if self.sk is not None else dense
        out = _last_bn_and_attention(self, self.conv3(out), self.bn3)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity  # in place, as torchvision: a fresh tensor per block costs ~5 % of ResNet50's time
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet-{18,34,50,101,152} with an optional attention.

    attention: "none" | "sge" | "se" | "cbam" | "gc" (in every block, after its last BN) |
    "bam" (after layer1..layer3, as `bam1..bam3`) | "sk" (Bottleneck only, `block.sk`) | a
    callable (channels) -> nn.Module, placed as a block attention (see models/attention.py).
    groups: SGE groups. sge_options: the SGE modules' weight_init / bias_init / normalize (the
    paper's ablations; None: the paper's module). width: channels of the stem and layer1 (64 = the paper's models; small
    widths give the tiny CPU models, every stage scales with it).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        attention: AttentionSpec = "none",
        groups: int = DEFAULT_GROUPS,
        width: int = DEFAULT_WIDTH,
        sge_impl: str = "fast",
        sge_options: dict | None = None,
    ):
        super().__init__()
        placement = attention_placement(attention)
        self.attention = attention
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        block_kwargs = {"attention": attention, "groups": groups, "sge_impl": sge_impl, "sge_options": sge_options}
        self.layer1 = self._make_layer(block, width, layers[0], 1, block_kwargs)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2, block_kwargs)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2, block_kwargs)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2, block_kwargs)
        if placement == "stage":
            for index in (1, 2, 3):
                channels = width * 2 ** (index - 1) * block.expansion
                setattr(self, f"bam{index}", create_attention(attention, channels))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        self.authors_computation = False  # see use_authors_computation
        self._init_weights()

    def _make_layer(self, block, planes: int, blocks: int, stride: int, block_kwargs: dict) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, **block_kwargs)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **block_kwargs) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # torchvision's ResNet init (no zero-init of the last BN), then module-specific inits.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
        for module in self.modules():
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights()

    def use_authors_computation(self) -> None:
        """Compute exactly as the authors' PytorchInsight model of the same name (their release
        files are loaded this way; parameters and keys stay ours). Only the attention modules and
        BAM's head differ: their BAM-ResNet pools the 7x7 last map with a fixed 7x7 window."""
        self.authors_computation = True
        for module in self.modules():
            if module is not self and hasattr(module, "use_authors_computation"):
                module.use_authors_computation()
        if attention_placement(self.attention) == "stage":
            self.avgpool = nn.AvgPool2d(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            x = layer(x)
            between = getattr(self, f"bam{index}", None)  # BAM sits between stages
            if between is not None:
                x = between(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
