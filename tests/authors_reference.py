"""An independent re-implementation of the authors' ImageNet models, for tests only.

Written from reading implus/PytorchInsight, classification/models/imagenet/resnet_{old,se,sge,
cbam,bam,sk}.py: the same attribute names (so `state_dict()` has the key layout of their release
files) and the same sequence of ops in forward (so the logits are those of their models). Their
Bottleneck ResNets only; `width` (64 in their code) lets tests build smaller copies, every
channel count scales with it as in theirs.

`release_file(model, path)` saves what their training script saved: a DataParallel model's
state dict (`module.` prefix) inside {"epoch", "state_dict", "acc", "best_acc", "optimizer"}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYERS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


class SELayer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channels, channels // 16), nn.ReLU(inplace=True),
                                nn.Linear(channels // 16, channels), nn.Sigmoid())

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)


class SpatialGroupEnhance(nn.Module):
    def __init__(self, groups: int = 64):
        super().__init__()
        self.groups = groups
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.view(b * self.groups, -1, h, w)
        t = (x * self.avg_pool(x)).sum(dim=1, keepdim=True).view(b * self.groups, -1)
        t = t - t.mean(dim=1, keepdim=True)
        t = t / (t.std(dim=1, keepdim=True) + 1e-5)
        t = t.view(b, self.groups, h, w) * self.weight + self.bias
        return (x * torch.sigmoid(t.view(b * self.groups, 1, h, w))).view(b, c, h, w)


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class CBAMChannelGate(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(Flatten(), nn.Linear(channels, channels // 16), nn.ReLU(),
                                 nn.Linear(channels // 16, channels))

    def forward(self, x):
        raw = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(raw).unsqueeze(2).unsqueeze(3).expand_as(x)


class BasicConv(nn.Module):  # conv + BN, no ReLU, as their SpatialGate uses it
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        return self.bn(self.conv(x))


class CBAMSpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = BasicConv()

    def forward(self, x):
        compressed = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)
        return x * torch.sigmoid(self.spatial(compressed))


class CBAM(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.ChannelGate = CBAMChannelGate(channels)
        self.SpatialGate = CBAMSpatialGate()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


class BAMChannelGate(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        hidden = channels // 16
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("flatten", Flatten())
        self.gate_c.add_module("gate_c_fc_0", nn.Linear(channels, hidden))
        self.gate_c.add_module("gate_c_bn_1", nn.BatchNorm1d(hidden))
        self.gate_c.add_module("gate_c_relu_1", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(hidden, channels))

    def forward(self, x):
        pooled = F.avg_pool2d(x, x.size(2), stride=x.size(2))
        return self.gate_c(pooled).unsqueeze(2).unsqueeze(3).expand_as(x)


class BAMSpatialGate(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        hidden = channels // 16
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", nn.Conv2d(channels, hidden, kernel_size=1))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(hidden))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(2):
            self.gate_s.add_module(f"gate_s_conv_di_{i}", nn.Conv2d(hidden, hidden, 3, padding=4, dilation=4))
            self.gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(hidden))
            self.gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        self.gate_s.add_module("gate_s_conv_final", nn.Conv2d(hidden, 1, kernel_size=1))

    def forward(self, x):
        return self.gate_s(x).expand_as(x)


class BAM(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channel_att = BAMChannelGate(channels)
        self.spatial_att = BAMSpatialGate(channels)

    def forward(self, x):
        return (1 + torch.sigmoid(self.channel_att(x) * self.spatial_att(x))) * x


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, attention="none"):
        super().__init__()
        self.attention = attention
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if attention == "sk":
            self.conv2g = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False, groups=32)
            self.bn2g = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        if attention == "se":
            self.se = SELayer(planes * 4)
        elif attention == "sge":
            self.sge = SpatialGroupEnhance(64)
        elif attention == "cbam":
            self.cbam = CBAM(planes * 4)
        elif attention == "sk":
            self.avg_pool = nn.AdaptiveAvgPool2d(1)
            self.conv_fc1 = nn.Conv2d(planes, planes // 16, 1, bias=False)
            self.bn_fc1 = nn.BatchNorm2d(planes // 16)
            self.conv_fc2 = nn.Conv2d(planes // 16, 2 * planes, 1, bias=False)
            self.D = planes

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        if self.attention == "sk":
            d1 = self.relu(self.bn2(self.conv2(out)))
            d2 = self.relu(self.bn2g(self.conv2g(out)))
            d = self.avg_pool(d1) + self.avg_pool(d2)
            d = self.conv_fc2(F.relu(self.bn_fc1(self.conv_fc1(d))))
            d = F.softmax(torch.unsqueeze(d, 1).view(-1, 2, self.D, 1, 1), 1)
            out = d1 * d[:, 0, :, :, :].squeeze(1) + d2 * d[:, 1, :, :, :].squeeze(1)
        else:
            out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.attention in ("se", "sge", "cbam"):
            out = getattr(self, self.attention)(out)
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class AuthorsResNet(nn.Module):
    def __init__(self, attention: str = "none", depth: int = 50, width: int = 64, num_classes: int = 1000):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers = LAYERS[depth]
        self.layer1 = self._make_layer(width, layers[0], 1, attention)
        self.layer2 = self._make_layer(width * 2, layers[1], 2, attention)
        self.layer3 = self._make_layer(width * 4, layers[2], 2, attention)
        self.layer4 = self._make_layer(width * 8, layers[3], 2, attention)
        if attention == "bam":
            self.bam1, self.bam2, self.bam3 = BAM(width * 4), BAM(width * 8), BAM(width * 16)
        else:
            self.bam1 = self.bam2 = self.bam3 = None
        self.avgpool = nn.AvgPool2d(7) if attention == "bam" else nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 32, num_classes)

    def _make_layer(self, planes, blocks, stride, attention):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, attention)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, attention=attention) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            x = layer(x)
            bam = getattr(self, f"bam{index}", None) if index < 4 else None
            if bam is not None:
                x = bam(x)
        x = self.avgpool(x)
        return self.fc(x.view(x.size(0), -1))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every float tensor random (BN running variances positive), so that any weight loaded under
    the wrong name changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.dim() > 1 and not name.endswith(("sge.weight", "sge.bias")):
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


def release_file(model: nn.Module, path, best_acc: float = 77.0) -> None:
    """Save `model` as the authors' training script did (DataParallel keys, epoch/acc/optimizer)."""
    wrapped = nn.DataParallel(model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 100, "state_dict": wrapped.state_dict(), "acc": best_acc, "best_acc": best_acc,
                "optimizer": optimizer.state_dict()}, path)
