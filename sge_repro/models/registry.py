"""Model names -> builders: `create_model(name, ...)` and `list_models()`.

Names are `<attention>_resnet<depth>` (`resnet<depth>` for the plain model), e.g. resnet50,
sge_resnet50, se_resnet101. SK* exists only for Bottleneck depths (50, 101, 152).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from sge_repro.errors import UserError
from sge_repro.models.resnet import BasicBlock, Bottleneck, ResNet

DEPTHS: dict[int, tuple[type, list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}
ATTENTIONS = ("none", "sge", "se", "cbam", "bam", "sk", "gc")
ALLOWED_KWARGS = ("width", "sge_impl", "seed")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    depth: int
    attention: str


def _model_name(attention: str, depth: int) -> str:
    return f"resnet{depth}" if attention == "none" else f"{attention}_resnet{depth}"


def _build_specs() -> dict[str, ModelSpec]:
    specs = {}
    for attention in ATTENTIONS:
        for depth, (block, _) in DEPTHS.items():
            if attention == "sk" and block is not Bottleneck:
                continue
            name = _model_name(attention, depth)
            specs[name] = ModelSpec(name, depth, attention)
    return specs


MODEL_SPECS = _build_specs()


def list_models() -> list[str]:
    """Every model name create_model accepts, plain first, then by attention and depth."""
    return list(MODEL_SPECS)


def model_spec(name: str) -> ModelSpec:
    try:
        return MODEL_SPECS[name]
    except KeyError:
        examples = ", ".join(["resnet50", "sge_resnet50", "se_resnet50", "cbam_resnet50", "bam_resnet50", "sk_resnet50", "gc_resnet50"])
        raise UserError(
            f"model: unknown name {name!r}; expected <attention>_resnet<depth> or resnet<depth>, e.g. {examples} "
            f"(depths {', '.join(map(str, DEPTHS))}; see `sge-repro models`)"
        ) from None


def build_model(
    name: str,
    num_classes: int = 1000,
    groups: int = 64,
    width: int = 64,
    sge_impl: str = "fast",
    seed: int | None = None,
) -> ResNet:
    """A freshly initialised model (no checkpoint). `seed` makes the init independent of the
    global RNG state."""
    spec = model_spec(name)
    if num_classes < 1:
        raise UserError(f"model {name}: num_classes={num_classes}, expected a positive integer")
    if width < 1:
        raise UserError(f"model {name}: width={width}, expected a positive integer")
    block, layers = DEPTHS[spec.depth]

    def build() -> ResNet:
        return ResNet(block, layers, num_classes=num_classes, attention=spec.attention, groups=groups,
                      width=width, sge_impl=sge_impl)

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def create_model(
    name: str,
    num_classes: int = 1000,
    groups: int = 64,
    checkpoint: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """Build model `name`; with `checkpoint` (ours, a torchvision state dict, or an official release
    file) load its weights strictly. kwargs: width (int, default 64), sge_impl ("fast" |
    "reference"), seed (int: init independent of the global RNG)."""
    unknown = sorted(set(kwargs) - set(ALLOWED_KWARGS))
    if unknown:
        raise UserError(f"create_model({name!r}): unknown argument(s) {', '.join(unknown)}; allowed: {', '.join(ALLOWED_KWARGS)}")
    model = build_model(name, num_classes=num_classes, groups=groups, **kwargs)
    if checkpoint is not None:
        from sge_repro.models.checkpoints import load_into

        load_into(
            model,
            checkpoint,
            expected_model=name,
            expected_kwargs={"num_classes": num_classes, "groups": groups, "width": kwargs.get("width", 64)},
        )
    return model
