"""detectron2 backbones built from our classification ResNet (same blocks, same SGE code).

The bottom-up network keeps torchvision's attribute names (conv1, bn1, layer1..layer4), so a
classification state dict maps onto `backbone.bottom_up.<torchvision name>` by a prefix alone.
Config keys live under `cfg.MODEL.SGE_BACKBONE` (`add_sge_config`); freezing uses detectron2's
own `cfg.MODEL.BACKBONE.FREEZE_AT`. BatchNorm (`MODEL.SGE_BACKBONE.NORM`): "FrozenBN"
(detectron2's: statistics and affine fixed), "FrozenStatsBN" (mmdetection's `norm_eval=True` with
`frozen=False`, the authors' setting: statistics fixed, the BN in eval mode even under
model.train(), its weight and bias trained), "BN" (batch statistics, updated), "SyncBN".
"""

from __future__ import annotations

import torch
from torch import nn

from sge_repro.detection.compat import import_detectron2
from sge_repro.errors import UserError
from sge_repro.models import DEFAULT_GROUPS, DEFAULT_WIDTH, create_model
from sge_repro.models.registry import SGE_VARIANT_DEFAULTS

import_detectron2()
from detectron2.config import CfgNode  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, Backbone  # noqa: E402
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7  # noqa: E402

STAGE_NAMES = ("res2", "res3", "res4", "res5")
STAGE_STRIDES = {"stem": 4, "res2": 4, "res3": 8, "res4": 16, "res5": 32}
NORMS = ("FrozenBN", "FrozenStatsBN", "BN", "SyncBN")


def add_sge_config(cfg: CfgNode) -> CfgNode:
    """Add the `MODEL.SGE_BACKBONE` node (idempotent) and return cfg."""
    if "SGE_BACKBONE" in cfg.MODEL:
        return cfg
    cfg.MODEL.SGE_BACKBONE = CfgNode()
    node = cfg.MODEL.SGE_BACKBONE
    # ARCH, WIDTH and GROUPS are replaced by the converted weights' header (detection/config.py)
    node.ARCH = "sge_resnet50"  # any name sge_repro.models.create_model knows
    node.WIDTH = DEFAULT_WIDTH  # base width of the ResNet
    node.GROUPS = DEFAULT_GROUPS  # SGE groups (ignored by models without SGE)
    node.SGE_IMPL = "fast"  # "fast", "reference" or "triton" (params.yaml model.sge_impl)
    # the paper's SGE ablations (params.yaml model.sge_weight_init / sge_bias_init / sge_normalize;
    # SGE_NORMALIZE must be the converted weights'): SGE_WEIGHT_INIT, SGE_BIAS_INIT, SGE_NORMALIZE
    for key, value in SGE_VARIANT_DEFAULTS.items():
        node[key.upper()] = value
    node.NORM = "FrozenBN"  # FrozenBN (detectron2), FrozenStatsBN (the authors' mmdetection), BN, SyncBN
    node.OUT_FEATURES = list(STAGE_NAMES)  # for the bottom-up-only backbone
    # the converted file records its pixel convention; a mismatch with the config is an error
    node.CHECK_PIXEL_CONVENTION = True
    return cfg


class ResNetBackbone(Backbone):
    """Stem + res2..res5 of a torchvision-style ResNet as a detectron2 Backbone.

    `resnet` is any module with conv1, bn1, relu, maxpool, layer1..layer4 (ours or
    torchvision's); its avgpool and fc are not kept.
    """

    def __init__(self, resnet: nn.Module, out_features=STAGE_NAMES, freeze_at: int = 0, norm: str = "FrozenBN"):
        super().__init__()
        # FrozenStatsBN: every BatchNorm stays in eval mode (running statistics used, never updated)
        self.norm_statistics_frozen = norm == "FrozenStatsBN"
        if norm not in NORMS:
            raise UserError(f"MODEL.SGE_BACKBONE.NORM: {norm!r}, expected one of {list(NORMS)}")
        unknown = [name for name in out_features if name not in STAGE_NAMES]
        if unknown or not out_features:
            raise UserError(f"backbone out_features: {list(out_features)}, expected a subset of {list(STAGE_NAMES)}")
        if not 0 <= freeze_at <= 5:
            raise UserError(f"MODEL.BACKBONE.FREEZE_AT: {freeze_at}, expected 0..5")
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self._out_features = list(out_features)
        channels = self._stage_channels()
        self._out_feature_channels = {name: channels[name] for name in self._out_features}
        self._out_feature_strides = {name: STAGE_STRIDES[name] for name in self._out_features}
        if norm == "FrozenBN":
            FrozenBatchNorm2d.convert_frozen_batchnorm(self)  # converts the children in place
        elif norm == "SyncBN":
            nn.SyncBatchNorm.convert_sync_batchnorm(self)
        self.freeze(freeze_at)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ResNetBackbone":
        """nn.Module.train, except that under FrozenStatsBN every BatchNorm stays in eval mode (as
        mmdetection's ResNet.train with norm_eval=True): the running statistics are used and never
        updated, while the BN weight and bias keep requires_grad and train."""
        super().train(mode)
        if self.norm_statistics_frozen:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    @torch.no_grad()
    def _stage_channels(self) -> dict:
        # a tiny forward finds each stage's width whatever the block / attention type
        was_training = self.training
        self.eval()
        x = torch.zeros(1, self.conv1.in_channels, 64, 64, device=self.conv1.weight.device)
        channels = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name, layer in zip(STAGE_NAMES, (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            channels[name] = x.shape[1]
        self.train(was_training)
        return channels

    def freeze(self, freeze_at: int) -> "ResNetBackbone":
        """Freeze the first `freeze_at` stages (1 the stem, 2 res2, ...): no gradients, BatchNorm frozen as well."""
        for names in (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))[:freeze_at]:
            for name in names:
                getattr(self, name).requires_grad_(False)
                setattr(self, name, FrozenBatchNorm2d.convert_frozen_batchnorm(getattr(self, name)))
        return self

    def forward(self, x: torch.Tensor) -> dict:
        if x.dim() != 4:
            raise ValueError(f"ResNetBackbone takes (N, C, H, W) inputs, got shape {tuple(x.shape)}")
        outputs = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        last = self._out_features
        for name, layer in zip(STAGE_NAMES, (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            if name in last:
                outputs[name] = x
            if len(outputs) == len(last):
                break
        return outputs

    def output_shape(self) -> dict:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


def build_resnet_bottom_up(cfg: CfgNode, out_features) -> ResNetBackbone:
    """The bottom-up network of `cfg.MODEL.SGE_BACKBONE`: our ResNet, randomly initialised (the
    weights come from cfg.MODEL.WEIGHTS), without avgpool and fc."""
    node = cfg.MODEL.SGE_BACKBONE
    try:
        resnet = create_model(node.ARCH, num_classes=1000, groups=node.GROUPS, width=node.WIDTH, sge_impl=node.SGE_IMPL,
                              **{key: node[key.upper()] for key in SGE_VARIANT_DEFAULTS})
    except UserError as error:
        raise UserError(f"MODEL.SGE_BACKBONE: {error}") from None
    return ResNetBackbone(resnet, out_features=out_features, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT, norm=node.NORM)


@BACKBONE_REGISTRY.register()
def build_sge_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    return build_resnet_bottom_up(cfg, cfg.MODEL.SGE_BACKBONE.OUT_FEATURES)


@BACKBONE_REGISTRY.register()
def build_sge_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """FPN over res2..res5 plus a max-pooled P6: P2-P6."""
    in_features = cfg.MODEL.FPN.IN_FEATURES
    return FPN(
        bottom_up=build_resnet_bottom_up(cfg, in_features),
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_sge_retinanet_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """FPN over res3..res5 plus P6 / P7 computed from res5: P3-P7."""
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    # P6/P7 read res5 itself, so the bottom-up network must return it
    bottom_up = build_resnet_bottom_up(cfg, sorted(set(in_features) | {"res5"}))
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(bottom_up.output_shape()["res5"].channels, out_channels, in_feature="res5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
