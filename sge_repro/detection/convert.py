"""Classification checkpoints -> detectron2 weights, and strict loading of those into detectors.

Accepted inputs (read by `sge_repro.models.weight_files`): our "sge-repro/classifier/v1" files,
torchvision state dicts, and the authors' release files (`module.`-prefixed `state_dict`). The
weights are first loaded strictly into our classification model (so a wrong architecture fails
here, not as a silent partial load later), then fc is dropped and every name gets the prefix
`backbone.bottom_up.` that the registered backbones (sge_repro.detection.backbone) expect.

Conventions recorded in the output (torchvision's, which our classifiers share): RGB input,
stride in the 3x3 conv, ImageNet mean/std in 0-255 pixel units.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sge_repro.atomic import torch_save
from sge_repro.errors import UserError, preview
from sge_repro.models import DEFAULT_GROUPS, DEFAULT_WIDTH, create_model
from sge_repro.models.registry import DEPTHS, format_model_name
from sge_repro.models.resnet import Bottleneck
from sge_repro.models.weight_files import (
    infer_model_kwargs, interpret_checkpoint, load_checkpoint_file, load_state_dict_strict,
)

DETECTRON2_WEIGHTS_FORMAT = "sge-repro/detectron2-weights/v1"
BACKBONE_PREFIX = "backbone.bottom_up."
# torchvision's ImageNet normalisation in 0-255 units, RGB order (detectron2 PIXEL_MEAN / PIXEL_STD)
IMAGENET_PIXEL_MEAN = [123.675, 116.28, 103.53]
IMAGENET_PIXEL_STD = [58.395, 57.12, 57.375]
INPUT_FORMAT = "RGB"


def _infer_model(state_dict: dict[str, torch.Tensor], path: Path) -> tuple[str, dict]:
    """(name, kwargs) of a plain / SGE ResNet from its keys; other attentions need model_name."""
    blocks = {}
    for key in state_dict:
        match = re.match(r"layer(\d)\.(\d+)\.", key)
        if match:
            stage, index = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), index + 1)
    layout = [blocks.get(stage, 0) for stage in (1, 2, 3, 4)]
    bottleneck = any(".conv3." in key for key in state_dict)
    depths = {(block is Bottleneck, tuple(layers)): depth for depth, (block, layers) in DEPTHS.items()}
    depth = depths.get((bottleneck, tuple(layout)))
    block_keys = {key.split(".")[2] for key in state_dict if key.startswith("layer1.0.")}
    attention_keys = block_keys - {"conv1", "conv2", "conv3", "bn1", "bn2", "bn3", "downsample"}
    if depth is None or attention_keys - {"sge"}:
        raise UserError(
            f"checkpoint {path}: cannot infer the architecture (blocks per stage {layout}, "
            f"extra block modules {sorted(attention_keys)}); pass model_name"
        )
    kwargs = {"width": int(state_dict["conv1.weight"].shape[0])}
    if "sge" in attention_keys:
        kwargs["groups"] = int(state_dict["layer1.0.sge.weight"].numel())
        return format_model_name("sge", depth), kwargs
    return format_model_name("none", depth), kwargs


def read_classifier(checkpoint_path: str | os.PathLike, model_name: str | None = None,
                    model_kwargs: dict | None = None) -> tuple[nn.Module, dict]:
    """Our classification model with the checkpoint's weights loaded strictly, plus a description."""
    path = Path(checkpoint_path)
    state_dict, detected, header = interpret_checkpoint(load_checkpoint_file(path), path)
    if header is not None:
        name = header["model"]
        if model_name is not None and model_name != name:
            raise UserError(f"checkpoint {path}: holds model {name!r}, expected {model_name!r}")
        kwargs = {key: header["model_kwargs"][key] for key in ("groups", "width", "sge_normalize")
                  if key in header["model_kwargs"]}
    elif model_name is None:
        name, kwargs = _infer_model(state_dict, path)
    else:
        name, kwargs = model_name, infer_model_kwargs(state_dict)
        kwargs.pop("num_classes", None)
    kwargs.update(model_kwargs or {})
    num_classes = int(state_dict["fc.weight"].shape[0]) if "fc.weight" in state_dict else 1000
    model = create_model(name, num_classes=num_classes, **kwargs)
    load_state_dict_strict(model, state_dict, path, detected,
                           authors_computation=bool(header and header["authors_computation"]))
    kwargs = {"groups": int(kwargs.get("groups", DEFAULT_GROUPS)), "width": int(kwargs.get("width", DEFAULT_WIDTH)),
              # recorded only when off, as in the classifier's header: detection builds the same SGE
              **({"sge_normalize": False} if kwargs.get("sge_normalize") is False else {})}
    return model, {"model": name, "model_kwargs": kwargs, "source_format": detected, "num_classes": num_classes,
                   "authors_layout": bool(model.authors_computation)}


def convert_classifier_to_detectron2(
    checkpoint_path: str | os.PathLike,
    output_path: str | os.PathLike,
    model_name: str | None = None,
    model_kwargs: dict | None = None,
    backbone_source: str = "file",
) -> dict:
    """Write detectron2 weights for the bottom-up backbone; returns a summary dict.

    model_name is needed only for foreign files whose architecture cannot be inferred (e.g. an
    SE-ResNet from torchvision-style names); for our own files it is read from the header.
    backbone_source ("trained" | "file" | "torchvision": where the ImageNet weights came from) is
    recorded in the output's header for the report.
    """
    checkpoint_path, output_path = Path(checkpoint_path), Path(output_path)
    model, description = read_classifier(checkpoint_path, model_name, model_kwargs)
    backbone_state = {
        BACKBONE_PREFIX + key: value.detach().cpu().clone()
        for key, value in model.state_dict().items()
        # fc is the classifier head; BN step counters mean nothing to a detector
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked")
    }
    metadata = {
        "format": DETECTRON2_WEIGHTS_FORMAT,
        **description,
        "source": str(checkpoint_path),
        "backbone_source": backbone_source,
        "prefix": BACKBONE_PREFIX,
        "input_format": INPUT_FORMAT,
        "pixel_mean": IMAGENET_PIXEL_MEAN,
        "pixel_std": IMAGENET_PIXEL_STD,
    }
    torch_save(
        {"model": backbone_state, "__author__": "sge-repro", "matching_heuristics": False, "sge_repro": metadata},
        output_path,
    )
    return {
        **metadata,
        "output": str(output_path),
        "num_tensors": len(backbone_state),
        "num_parameters": int(sum(v.numel() for k, v in backbone_state.items() if "running_" not in k)),
    }


def read_weights_metadata(weights_path: str | os.PathLike) -> dict | None:
    """The `sge_repro` header of a converted file (or of a training checkpoint); None if absent."""
    loaded = load_checkpoint_file(weights_path)
    metadata = loaded.get("sge_repro") if isinstance(loaded, dict) else None
    return dict(metadata) if isinstance(metadata, dict) else None


def check_detector_weights(model: nn.Module, weights_path: str | os.PathLike, require_all: bool = False,
                           pixel_mean: list | None = None, pixel_std: list | None = None) -> dict[str, Any]:
    """Raise UserError unless the file provides EVERY backbone tensor of `model` with the right shape.

    require_all: every tensor of the model (a trained detector for evaluation), not only the
    backbone's. pixel_mean / pixel_std: the config's, compared with the file's recorded
    convention. Returns {"loaded": n, "missing_heads": [...]} for the log.
    """
    path = Path(weights_path)
    loaded = load_checkpoint_file(path)
    if not isinstance(loaded, dict):
        raise UserError(f"weights {path}: expected a dict with 'model', got {type(loaded).__name__}")
    state = loaded.get("model", loaded)
    if not isinstance(state, dict):
        raise UserError(f"weights {path}: 'model' is {type(state).__name__}, expected a state dict")
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    required = [k for k in expected if require_all or k.startswith(BACKBONE_PREFIX)]
    missing = [k for k in required if k not in state]
    if missing:
        scope = "model" if require_all else "backbone"
        raise UserError(
            f"weights {path}: {len(missing)} {scope} tensors missing (first: {preview(missing)}); "
            "convert the classification checkpoint for this backbone (sge-repro convert)"
        )
    extra_backbone = [k for k in state if k.startswith(BACKBONE_PREFIX) and k not in expected
                      and not k.endswith("num_batches_tracked")]
    if extra_backbone:
        raise UserError(
            f"weights {path}: {len(extra_backbone)} backbone tensors the model lacks "
            f"(first: {preview(extra_backbone)}); wrong MODEL.SGE_BACKBONE.ARCH for these weights?"
        )
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise UserError(f"weights {path}: shape mismatch (first: {preview(wrong)})")
    metadata = loaded.get("sge_repro") if isinstance(loaded.get("sge_repro"), dict) else {}
    for key, configured in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
        recorded = metadata.get(key)
        if recorded is not None and configured is not None and not torch.allclose(
            torch.tensor(recorded, dtype=torch.float64), torch.tensor(list(configured), dtype=torch.float64)
        ):
            raise UserError(
                f"weights {path}: trained with {key}={recorded} but MODEL.{key.upper()}={list(configured)}"
            )
    return {"loaded": len(required), "missing_heads": [k for k in expected if k not in state]}
