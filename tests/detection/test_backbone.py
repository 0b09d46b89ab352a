import pytest
import torch

from sge_repro.detection.backbone import ResNetBackbone, add_sge_config
from sge_repro.detection.compat import import_detectron2
from sge_repro.errors import UserError
from sge_repro.models import create_model
from sge_repro.models.attention import SpatialGroupEnhance

import_detectron2()
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_backbone  # noqa: E402


def count_bottom_up_parameters(backbone: torch.nn.Module) -> int:
    """Parameters of the bottom-up network (the paper's backbone #P: ResNet without fc)."""
    bottom_up = getattr(backbone, "bottom_up", backbone)
    # FrozenBatchNorm2d keeps weight / bias as buffers; count them as the paper does (BN affine)
    total = sum(parameter.numel() for parameter in bottom_up.parameters())
    for module in bottom_up.modules():
        if isinstance(module, FrozenBatchNorm2d):
            total += module.weight.numel() + module.bias.numel()
    return total


@pytest.mark.parametrize("arch", ["resnet50", "sge_resnet50"])
def test_backbone_parameters_match_the_paper(arch):
    # the paper's table: 23.51M for ResNet50 and SGE-ResNet50 without fc (SGE adds 2,048)
    backbone = ResNetBackbone(create_model(arch), norm="BN", freeze_at=0)
    count = count_bottom_up_parameters(backbone)
    assert round(count / 1e6, 2) == 23.51
    # FrozenBN keeps the same tensors as buffers; the count must not change
    frozen = ResNetBackbone(create_model(arch), norm="FrozenBN", freeze_at=2)
    assert count_bottom_up_parameters(frozen) == count


def _cfg(backbone_name, fpn_in, arch="sge_resnet18"):
    cfg = add_sge_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = backbone_name
    cfg.MODEL.SGE_BACKBONE.ARCH = arch
    cfg.MODEL.SGE_BACKBONE.WIDTH = 8
    cfg.MODEL.SGE_BACKBONE.GROUPS = 4
    cfg.MODEL.FPN.IN_FEATURES = fpn_in
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    return cfg


def test_rcnn_fpn_gives_p2_to_p6():
    backbone = build_backbone(_cfg("build_sge_resnet_fpn_backbone", ["res2", "res3", "res4", "res5"]))
    features = backbone(torch.zeros(1, 3, 64, 96))
    assert {k: v.stride for k, v in backbone.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert features["p2"].shape == (1, 16, 16, 24)
    assert features["p6"].shape == (1, 16, 1, 2)


def test_retinanet_fpn_gives_p3_to_p7_from_res5():
    backbone = build_backbone(_cfg("build_sge_retinanet_resnet_fpn_backbone", ["res3", "res4", "res5"]))
    assert {k: v.stride for k, v in backbone.output_shape().items()} == {
        "p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    # P6 is computed from C5 (the bottom-up res5 width), not from P5
    assert backbone.top_block.p6.in_channels == backbone.bottom_up.output_shape()["res5"].channels == 64
    features = backbone(torch.zeros(1, 3, 128, 128))
    assert features["p7"].shape == (1, 16, 1, 1)


def test_sge_sits_in_every_block_and_stem_res2_are_frozen():
    backbone = build_backbone(_cfg("build_sge_resnet_fpn_backbone", ["res2", "res3", "res4", "res5"])).bottom_up
    blocks = [block for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for block in layer]
    assert len(blocks) == 8 and all(isinstance(block.sge, SpatialGroupEnhance) for block in blocks)
    frozen = [backbone.conv1, backbone.layer1]
    assert all(not p.requires_grad for module in frozen for p in module.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert isinstance(backbone.bn1, FrozenBatchNorm2d)


@pytest.mark.parametrize("arch", ["sge_resnet18", "resnet18"])
def test_sge_ablation_keys_build_every_sge_module_of_the_backbone(arch):
    cfg = _cfg("build_sge_resnet_fpn_backbone", ["res2", "res3", "res4", "res5"], arch=arch)
    assert (cfg.MODEL.SGE_BACKBONE.SGE_WEIGHT_INIT, cfg.MODEL.SGE_BACKBONE.SGE_BIAS_INIT,
            cfg.MODEL.SGE_BACKBONE.SGE_NORMALIZE) == (0.0, 1.0, True)  # the paper's module by default
    cfg.MODEL.SGE_BACKBONE.SGE_WEIGHT_INIT, cfg.MODEL.SGE_BACKBONE.SGE_BIAS_INIT = 0.25, 2.0
    cfg.MODEL.SGE_BACKBONE.SGE_NORMALIZE = False
    backbone = build_backbone(cfg).bottom_up
    modules = [m for m in backbone.modules() if isinstance(m, SpatialGroupEnhance)]
    assert len(modules) == (8 if arch.startswith("sge") else 0)
    assert all(torch.all(m.weight == 0.25) and torch.all(m.bias == 2.0) and not m.normalize for m in modules)


def test_plain_bn_is_kept_outside_frozen_stages():
    cfg = _cfg("build_sge_resnet_backbone", ["res2", "res3", "res4", "res5"])
    cfg.MODEL.SGE_BACKBONE.NORM = "BN"
    backbone = build_backbone(cfg)
    assert isinstance(backbone.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(backbone.layer2[0].bn1, torch.nn.BatchNorm2d)


def test_bad_backbone_settings_are_user_errors():
    cfg = _cfg("build_sge_resnet_fpn_backbone", ["res2", "res3", "res4", "res5"])
    cfg.MODEL.SGE_BACKBONE.NORM = "GroupNorm"
    with pytest.raises(UserError, match="NORM"):
        build_backbone(cfg)
    cfg = _cfg("build_sge_resnet_fpn_backbone", ["res2", "res3", "res4", "res5"], arch="sge_resnet19")
    with pytest.raises(UserError, match="sge_resnet19"):
        build_backbone(cfg)
