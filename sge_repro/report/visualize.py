"""Pictures of what SGE does, like the paper's figures: per group, the feature map entering the
SGE module, the spatial gate sigmoid(gamma * n + beta) it computes, and the feature map after.

Forward hooks on the model's SpatialGroupEnhance modules capture their input and output; the gate
is recomputed from the input with the module's own parameters by the SGE reference formula
(sge_repro.models.sge.sge_reference_gate; checked against the module's output).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchvision.transforms import functional as F

from sge_repro.atomic import write_bytes
from sge_repro.classification.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize_size
from sge_repro.data.manifest import evenly_spaced
from sge_repro.errors import UserError
from sge_repro.models import create_model
from sge_repro.models.registry import parse_model_name
from sge_repro.models.weight_files import read_classifier_header
from sge_repro.report.activations import MAX_IMAGES, capture_sge, measure, sge_modules, write_stats
from sge_repro.report.figures import png

DEFAULT_GROUPS_SHOWN = 8


def default_layers(names: list[str]) -> list[str]:
    """The last SGE block of each stage (layer1.2, layer2.3, ...)."""
    last_of_stage: dict[str, str] = {}
    for name in names:
        last_of_stage[name.split(".", 1)[0]] = name
    return list(last_of_stage.values())


def load_image(image_path: Path, image_size: int | None) -> tuple[torch.Tensor, "object"]:
    """(normalised 1x3xSxS tensor, the RGB crop shown beside the maps); S = shorter side if None."""
    try:
        with Image.open(image_path) as opened:
            image = opened.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise UserError(f"{image_path}: not a readable image ({error.__class__.__name__})") from error
    if image_size is None:
        image_size = min(image.size)
        crop = F.center_crop(image, [image_size, image_size])
    else:
        crop = F.center_crop(F.resize(image, eval_resize_size(image_size), antialias=True), [image_size, image_size])
    tensor = F.normalize(F.to_tensor(crop), IMAGENET_MEAN, IMAGENET_STD).unsqueeze(0)
    return tensor, crop


def attention_figure(layer: str, maps: dict[str, torch.Tensor], crop, groups_shown: int) -> bytes:
    """PNG: the input crop, then per group (columns) the map before, the gate, the map after."""
    groups = maps["gate"].shape[0]
    shown = list(range(0, groups, max(1, groups // groups_shown)))[:groups_shown]
    channels_per_group = maps["before"].shape[0] // groups

    def group_mean(tensor: torch.Tensor, group: int) -> torch.Tensor:
        return tensor[group * channels_per_group:(group + 1) * channels_per_group].mean(dim=0)

    figure = Figure(figsize=(1.6 * (len(shown) + 1), 5.0))
    axes = figure.subplots(3, len(shown) + 1, squeeze=False)
    for row, label in enumerate(("before", "gate", "after")):
        axes[row][0].axis("off")
        for column, group in enumerate(shown, start=1):
            axis = axes[row][column]
            data = maps["gate"][group] if label == "gate" else group_mean(maps[label], group)
            axis.imshow(data.numpy(), cmap="viridis" if label == "gate" else "magma",
                        vmin=0.0 if label == "gate" else None, vmax=1.0 if label == "gate" else None)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"group {group}", fontsize=8)
            if column == 1:
                axis.set_ylabel(label, fontsize=9)
    axes[0][0].imshow(crop)
    axes[0][0].set_title("input", fontsize=8)
    figure.suptitle(f"SGE at {layer}: feature map (mean over the group's channels), gate, result", fontsize=9)
    return png(figure, dpi=80)


def visualize_sge(
    model: nn.Module,
    image_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    layer: str | None = None,
    image_size: int | None = None,
    groups_shown: int = DEFAULT_GROUPS_SHOWN,
) -> list[Path]:
    """Write `<image>-<layer>.png` per SGE block (`layer`, e.g. "layer3.1"; default: the last block
    of each stage) showing, per group, the feature map before SGE, the gate and the map after.
    `image_size`: eval-style resize + center crop; None keeps the image's shorter side."""
    modules = sge_modules(model)
    if not modules:
        raise UserError("visualize: the model has no SGE modules; expected an sge_* model")
    if layer is not None and layer not in modules:
        raise UserError(f"visualize layer: {layer!r} has no SGE module; expected one of {', '.join(modules)}")
    layers = [layer] if layer is not None else default_layers(list(modules))
    image_path = Path(image_path)
    image, crop = load_image(image_path, image_size)
    captured = capture_sge(model, image, layers)
    written = []
    for name in layers:
        png = attention_figure(name, captured[name], crop, groups_shown)
        written.append(write_bytes(Path(out_dir) / f"{image_path.stem}-{name}.png", png))
    return written


def visualize_sge_checkpoint(
    model_name: str,
    checkpoint: str | os.PathLike,
    image_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    layer: str | None = None,
    image_size: int | None = None,
) -> list[Path]:
    """visualize_sge for a checkpoint file (ours: its recorded num_classes / groups / width are
    used; torchvision or official files: the 1000-class defaults)."""
    return visualize_sge(load_checkpoint(model_name, checkpoint), image_path, out_dir, layer=layer,
                         image_size=image_size)


def load_checkpoint(model_name: str, checkpoint: str | os.PathLike) -> nn.Module:
    """The model of a checkpoint file (ours: its recorded num_classes / groups / width; torchvision
    or official files: the 1000-class defaults)."""
    header = read_classifier_header(checkpoint)
    kwargs = dict(header["model_kwargs"]) if header else {}
    return create_model(model_name, checkpoint=checkpoint, **kwargs)


def visualize_trained_models(
    models: list[str],
    seed: int,
    checkpoint_for: Callable[[str, int], Path],
    val_samples: Sequence[tuple[Path, int]],
    out_dir: str | os.PathLike,
    image_size: int | None = None,
    num_images: int = 2,
) -> list[Path]:
    """The `visualize` stage: attention PNGs of every trained SGE model (one seed) on the first
    val image of the first `num_images` classes of `val_samples` ((path, class index), in dataset
    order), and the activation statistics of its last SGE block over at most MAX_IMAGES evenly
    spaced val images (sge_repro.report.activations), into out_dir/<model>-seed<seed>/."""
    first_of_class: dict[int, Path] = {}
    for path, label in val_samples:
        first_of_class.setdefault(label, Path(path))
    images = [first_of_class[label] for label in sorted(first_of_class)[:num_images]]
    if not images:
        raise UserError("no validation images to visualize; expected at least one indexed val image")
    written: list[Path] = []
    for name in models:
        if parse_model_name(name).attention != "sge":
            continue
        target = Path(out_dir) / f"{name}-seed{seed}"
        model = load_checkpoint(name, checkpoint_for(name, seed))
        for image in images:
            written += visualize_sge(model, image, target, image_size=image_size)
        measured = [load_image(Path(path), image_size)[0] for path, _ in evenly_spaced(list(val_samples), MAX_IMAGES)]
        stats = measure(model, measured, list(sge_modules(model))[-1])
        written.append(write_stats({"model": name, "seed": seed, **stats}, target))
    return written
