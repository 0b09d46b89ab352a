"""The one model-name parser and the attention factory (name or callable), defaults defined once."""

import inspect

import pytest
import torch
from torch import nn

from sge_repro.errors import UserError
from sge_repro.models import DEFAULT_GROUPS, DEFAULT_WIDTH, create_attention, create_model, list_models, parse_model_name
from sge_repro.models.attention import CBAM, SpatialGroupEnhance, SqueezeExcite, attention_placement
from sge_repro.models.registry import format_model_name
from sge_repro.models.resnet import ResNet


def test_parse_model_name_splits_attention_and_depth():
    parsed = parse_model_name("sge_resnet101")
    assert (parsed.attention, parsed.depth, parsed.plain, parsed.layers) == ("sge", 101, "resnet101", [3, 4, 23, 3])
    assert parse_model_name("resnet18").attention == "none"
    assert all(format_model_name(parse_model_name(n).attention, parse_model_name(n).depth) == n for n in list_models())


@pytest.mark.parametrize("name", ["sk_resnet18", "none_resnet50", "resnet050", "sge_resnet", "xyz_resnet50", "SGE_resnet50", ""])
def test_parse_model_name_rejects_in_one_line(name):
    with pytest.raises(UserError, match=r"unknown name .*expected <attention>_resnet<depth>") as error:
        parse_model_name(name)
    assert "\n" not in str(error.value)


def test_the_contract_defaults_are_the_papers():
    assert (DEFAULT_GROUPS, DEFAULT_WIDTH) == (64, 64)
    assert inspect.signature(create_model).parameters["groups"].default == 64
    model = create_model("sge_resnet50")
    assert {m.groups for m in model.modules() if isinstance(m, SpatialGroupEnhance)} == {64}
    assert model.conv1.out_channels == 64


def test_create_attention_takes_a_name_or_a_callable():
    assert isinstance(create_attention("se", 32), SqueezeExcite)
    assert create_attention("none", 32) is None
    sge = create_attention("sge", 32, groups=4)
    assert isinstance(sge, SpatialGroupEnhance) and sge.groups == 4
    assert isinstance(create_attention(CBAM, 32), CBAM)
    assert attention_placement("bam") == "stage" and attention_placement("sk") == "conv"
    with pytest.raises(UserError, match="unknown name 'nope'"):
        create_attention("nope", 32)
    with pytest.raises(UserError, match="replaces a conv"):
        create_attention("sk", 32)


def test_resnet_accepts_a_callable_block_attention():
    from sge_repro.models.resnet import BasicBlock

    class Halve(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.channels = channels

        def forward(self, x):
            return x * 0.5

    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3, attention=Halve, width=8)
    assert isinstance(model.layer2[0].attn, Halve) and model.layer2[0].attn.channels == 16
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


VARIANT = {"sge_weight_init": 0.5, "sge_bias_init": -1.0, "sge_normalize": False}


def test_sge_variant_knobs_set_every_sge_block_at_construction():
    model = create_model("sge_resnet18", num_classes=3, groups=4, width=8, seed=0, **VARIANT)
    modules = [module for module in model.modules() if isinstance(module, SpatialGroupEnhance)]
    assert len(modules) == 8
    assert all(torch.all(m.weight == 0.5) and torch.all(m.bias == -1.0) and m.normalize is False for m in modules)
    # everything else is the model the same seed builds without the knobs
    default = create_model("sge_resnet18", num_classes=3, groups=4, width=8, seed=0).state_dict()
    assert all(torch.equal(value, default[key]) for key, value in model.state_dict().items() if ".sge." not in key)


def test_the_paper_values_given_explicitly_build_the_same_model():
    implicit = create_model("sge_resnet18", num_classes=3, groups=4, width=8, seed=0)
    explicit = create_model("sge_resnet18", num_classes=3, groups=4, width=8, seed=0,
                            sge_weight_init=0.0, sge_bias_init=1.0, sge_normalize=True)
    assert all(torch.equal(value, implicit.state_dict()[key]) for key, value in explicit.state_dict().items())
    assert repr(explicit) == repr(implicit)


@pytest.mark.parametrize("name", ["resnet18", "se_resnet18", "cbam_resnet18"])
def test_models_without_sge_ignore_the_sge_variant_knobs(name):
    plain = create_model(name, num_classes=3, width=8, seed=0)
    with_knobs = create_model(name, num_classes=3, width=8, seed=0, **VARIANT)
    assert repr(with_knobs) == repr(plain)
    assert all(torch.equal(value, plain.state_dict()[key]) for key, value in with_knobs.state_dict().items())


def test_recorded_kwargs_keep_the_variant_knobs_only_where_they_change_an_sge_model():
    from sge_repro.models.registry import recorded_kwargs

    base = {"width": 8, "groups": 4, "sge_impl": "fast"}
    paper = {**base, "sge_weight_init": 0.0, "sge_bias_init": 1, "sge_normalize": True}
    assert recorded_kwargs("sge_resnet18", paper) == base
    assert recorded_kwargs("sge_resnet18", {**base, **VARIANT}) == {**base, **VARIANT}
    assert recorded_kwargs("resnet18", {**base, **VARIANT}) == base
