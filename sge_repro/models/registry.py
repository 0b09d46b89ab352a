"""Model names -> builders: `create_model(name, ...)` and `list_models()`.

Names are `<attention>_resnet<depth>` (`resnet<depth>` for the plain model), e.g. resnet50,
sge_resnet50, se_resnet101. SK* exists only for Bottleneck depths (50, 101, 152).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sge_repro.atomic import torch_save
from sge_repro.errors import UserError
from sge_repro.models.attention import ATTENTION_NAMES, attention_placement
from sge_repro.models.resnet import DEFAULT_WIDTH, BasicBlock, Bottleneck, ResNet
from sge_repro.models.weight_files import (AUTHORS_COMPUTATION_KEY, infer_model_kwargs, interpret_checkpoint,
                                          load_checkpoint_file, load_into, make_classifier_checkpoint)
from sge_repro.models.sge import DEFAULT_BIAS_INIT, DEFAULT_GROUPS, DEFAULT_NORMALIZE, DEFAULT_WEIGHT_INIT

DEPTHS: dict[int, tuple[type, list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}
# The paper's SGE ablations (params.yaml model.sge_*): create_model kwarg -> the paper's value.
SGE_VARIANT_DEFAULTS = {"sge_weight_init": DEFAULT_WEIGHT_INIT, "sge_bias_init": DEFAULT_BIAS_INIT,
                        "sge_normalize": DEFAULT_NORMALIZE}
ALLOWED_KWARGS = ("width", "sge_impl", *SGE_VARIANT_DEFAULTS, "seed")
_NAME = re.compile(r"^(?:(?P<attention>[a-z]+)_)?resnet(?P<depth>\d+)$")
NAME_HELP = (
    "expected <attention>_resnet<depth> or resnet<depth>, e.g. resnet50, sge_resnet50, se_resnet50, cbam_resnet50, "
    f"bam_resnet50, sk_resnet50, gc_resnet50 (depths {', '.join(map(str, DEPTHS))}; see `sge-repro models`)"
)


@dataclass(frozen=True)
class ModelName:
    """A parsed model name: `sge_resnet50` -> attention "sge", depth 50."""

    name: str
    attention: str  # "none" for the plain ResNet
    depth: int

    @property
    def plain(self) -> str:
        """The plain ResNet of the same depth (the baseline an attention model is compared with)."""
        return f"resnet{self.depth}"

    @property
    def layers(self) -> list[int]:
        return DEPTHS[self.depth][1]


def format_model_name(attention: str, depth: int) -> str:
    """The inverse of parse_model_name: ("sge", 50) -> "sge_resnet50", ("none", 18) -> "resnet18"."""
    return f"resnet{depth}" if attention == "none" else f"{attention}_resnet{depth}"


def _is_buildable(attention: str, depth: int) -> bool:
    # SK* replaces the Bottleneck's 3x3 conv: no BasicBlock version
    return depth in DEPTHS and attention in ATTENTION_NAMES and not (
        attention_placement(attention) == "conv" and DEPTHS[depth][0] is not Bottleneck)


def parse_model_name(name: str) -> ModelName:
    """The one parser of model names `<attention>_resnet<depth>` / `resnet<depth>`; UserError for
    a name create_model cannot build."""
    match = _NAME.match(name) if isinstance(name, str) else None
    if match is not None:
        attention, depth = match["attention"] or "none", int(match["depth"])
        if format_model_name(attention, depth) == name and _is_buildable(attention, depth):
            return ModelName(name, attention, depth)
    raise UserError(f"model: unknown name {name!r}; {NAME_HELP}")


def sge_channels(name: str, width: int) -> list[int]:
    """The channels of the SGE blocks of model `name`, stage by stage (empty without SGE): the
    numbers the SGE groups G must divide."""
    parsed = parse_model_name(name)
    if parsed.attention != "sge":
        return []
    expansion = DEPTHS[parsed.depth][0].expansion
    return [width * 2 ** stage * expansion for stage in range(4)]


def list_models() -> list[str]:
    """Every model name create_model accepts, plain first, then by attention and depth."""
    return [format_model_name(attention, depth) for attention in ATTENTION_NAMES for depth in DEPTHS
            if _is_buildable(attention, depth)]


# Architecture knobs only SGE blocks read: a model without SGE is the same model whatever their value.
SGE_ONLY_KWARGS = ("groups", "sge_impl", *SGE_VARIANT_DEFAULTS)


def kwargs_used_by(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` less those model `name` ignores (SGE_ONLY_KWARGS for a model without SGE): what
    a checkpoint's header or a training recipe is compared on."""
    if parse_model_name(name).attention == "sge":
        return dict(kwargs)
    return {key: value for key, value in kwargs.items() if key not in SGE_ONLY_KWARGS}


def recorded_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` as a training recipe or a checkpoint header records them: the SGE variant knobs
    (SGE_VARIANT_DEFAULTS) only for a model with SGE and only away from the paper's value. So the
    paper's SGE models and every model without SGE keep the recipe, fingerprint and header they
    had before the knobs existed, and a file without them is the paper's module."""
    uses_sge = parse_model_name(name).attention == "sge"
    return {key: value for key, value in kwargs.items()
            if key not in SGE_VARIANT_DEFAULTS or (uses_sge and value != SGE_VARIANT_DEFAULTS[key])}


def create_model(
    name: str,
    num_classes: int = 1000,
    groups: int = DEFAULT_GROUPS,
    checkpoint: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """Build model `name`; with `checkpoint` (ours, a torchvision state dict, or an official release
    file) load its weights strictly. kwargs: width (int, default DEFAULT_WIDTH = 64), sge_impl ("fast" |
    "reference" | "triton"), sge_weight_init / sge_bias_init (float) / sge_normalize (bool): the SGE
    ablations' initial gamma / beta and spatial normalisation (ignored by a model without SGE), seed
    (int: the init independent of the global RNG state)."""
    unknown = sorted(set(kwargs) - set(ALLOWED_KWARGS))
    if unknown:
        raise UserError(f"create_model({name!r}): unknown argument(s) {', '.join(unknown)}; allowed: {', '.join(ALLOWED_KWARGS)}")
    options = {"width": DEFAULT_WIDTH, "sge_impl": "fast", **SGE_VARIANT_DEFAULTS, "seed": None, **kwargs}
    parsed = parse_model_name(name)
    if num_classes < 1:
        raise UserError(f"model {name}: num_classes={num_classes}, expected a positive integer")
    if options["width"] < 1:
        raise UserError(f"model {name}: width={options['width']}, expected a positive integer")
    with torch.random.fork_rng(devices=[], enabled=options["seed"] is not None):
        if options["seed"] is not None:
            torch.manual_seed(options["seed"])
        model = ResNet(DEPTHS[parsed.depth][0], parsed.layers, num_classes=num_classes, attention=parsed.attention,
                       groups=groups, width=options["width"], sge_impl=options["sge_impl"], sge_options={
                           "weight_init": options["sge_weight_init"], "bias_init": options["sge_bias_init"],
                           "normalize": options["sge_normalize"]})
    if checkpoint is not None:
        load_into(
            model,
            checkpoint,
            expected_model=name,
            expected_kwargs=kwargs_used_by(name, {"num_classes": num_classes, "groups": groups,
                                                  "width": kwargs.get("width", DEFAULT_WIDTH),
                                                  "sge_normalize": kwargs.get("sge_normalize", DEFAULT_NORMALIZE)}),
        )
    return model


def import_classifier(model_name: str, source: str | os.PathLike, destination: str | os.PathLike, **extra: Any) -> dict:
    """A given checkpoint file (ours, a torchvision state dict, the authors' release) as one of ours:
    loaded strictly into `model_name` (width, groups and classes read from the file), written in our
    format to `destination` (atomically), with `extra` keys. Returns its header."""
    source = Path(source)
    state_dict, detected, header = interpret_checkpoint(load_checkpoint_file(source), source)
    kwargs = dict(header["model_kwargs"]) if header else infer_model_kwargs(state_dict)
    del state_dict
    model = create_model(model_name, checkpoint=source, **kwargs)
    kwargs = {"num_classes": model.fc.out_features, **kwargs}
    checkpoint = make_classifier_checkpoint(model_name, kwargs, model, **extra)
    checkpoint[AUTHORS_COMPUTATION_KEY] = bool(model.authors_computation)
    torch_save(checkpoint, destination)
    return {"model": model_name, "model_kwargs": checkpoint["model_kwargs"], "source_format": detected,
            AUTHORS_COMPUTATION_KEY: checkpoint[AUTHORS_COMPUTATION_KEY]}
