"""The paper's activation analysis: at the network's last SGE block, does SGE widen the spread of
each group's activation map across positions, keeping strong positions and damping weak ones?

Per image and group, m is the group's mean activation map (mean over its channels) before SGE and
after it (after = before * gate). Measured: the variance of m across positions, before and after;
the fraction of weak positions (m below WEAK_FRACTION of the map's max before SGE); the mean gate
over weak and over strong positions. Each is averaged over the images, per group.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.figure import Figure
from torch import nn

from sge_repro.atomic import write_json
from sge_repro.models.attention import SpatialGroupEnhance
from sge_repro.models.sge import sge_reference_gate
from sge_repro.report.figures import png

STATS_FILE = "activation_stats.json"
WEAK_FRACTION = 0.1  # a position is weak when its activation is below 10% of the map's max
# At most this many val images, evenly spaced over the split: the statistics are means over
# images, 64 pins them down well enough for a verdict while keeping the stage's CPU time small.
MAX_IMAGES = 64


def sge_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{block name (e.g. "layer3.1"): its SGE module}, in forward order."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, SpatialGroupEnhance):
            found[name.rsplit(".", 1)[0] if "." in name else name] = module
    return found


def capture_sge(model: nn.Module, image: torch.Tensor, layers: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Run `model` on `image` and return {layer: {"before", "gate", "after"}} for the given SGE blocks."""
    modules = sge_modules(model)
    captured: dict[str, dict[str, torch.Tensor]] = {}
    handles = []

    def hook(name: str, module: nn.Module):
        def record(_module, inputs, output):
            before = inputs[0].detach().float()
            gate = sge_reference_gate(before, module.weight.detach().float(), module.bias.detach().float(),
                                      module.groups, module.normalize)
            # a copy: the block adds the identity to this output in place right after the hook
            captured[name] = {"before": before[0], "gate": gate[0], "after": output.detach().float()[0].clone()}

        return record

    try:
        for name in layers:
            handles.append(modules[name].register_forward_hook(hook(name, modules[name])))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(image)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _group_maps(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """(C, H, W) -> (G, H*W): each group's mean over its channels."""
    channels = tensor.shape[0]
    return tensor.reshape(groups, channels // groups, -1).mean(dim=1)


def image_stats(maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-group statistics of one image's capture ({"before", "gate", "after"} of capture_sge);
    a gate mean is NaN where the image has no weak (or no strong) position in that group."""
    groups = maps["gate"].shape[0]
    before, after = _group_maps(maps["before"], groups), _group_maps(maps["after"], groups)
    gate = maps["gate"].reshape(groups, -1)
    weak = before < WEAK_FRACTION * before.max(dim=1, keepdim=True).values
    strong = ~weak

    def mean_over(mask: torch.Tensor) -> torch.Tensor:
        count = mask.sum(dim=1)
        return torch.where(count > 0, (gate * mask).sum(dim=1) / count.clamp(min=1), torch.nan)

    return {
        "variance_before": before.var(dim=1, unbiased=False),
        "variance_after": after.var(dim=1, unbiased=False),
        "weak_fraction": weak.float().mean(dim=1),
        "weak_gate": mean_over(weak),
        "strong_gate": mean_over(strong),
    }


def measure(model: nn.Module, images: Sequence[torch.Tensor], layer: str) -> dict:
    """The statistics of SGE block `layer` of `model` over `images` (1x3xHxW each): per group, the
    mean over images (gate means over the images where the group has such positions)."""
    per_image = [image_stats(capture_sge(model, image, [layer])[layer]) for image in images]
    keys = per_image[0].keys()
    stacked = {key: torch.nanmean(torch.stack([stats[key] for stats in per_image]).double(), dim=0) for key in keys}
    groups = len(stacked["variance_before"])
    return {
        "layer": layer,
        "images": len(images),
        "weak_threshold": WEAK_FRACTION,
        "groups": [{key: _finite(stacked[key][g]) for key in keys} for g in range(groups)],
    }


def _finite(value: torch.Tensor) -> float | None:
    number = float(value)
    return round(number, 8) if math.isfinite(number) else None


def write_stats(stats: dict, out_dir: str | os.PathLike) -> Path:
    return write_json(Path(out_dir) / STATS_FILE, stats)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summarize(groups: list[dict]) -> dict:
    """Model-level numbers of a stats file's per-group list, and the verdict on the paper's claim:
    "held" when the variance grew in most groups and weak positions got a lower mean gate than
    strong ones; "undetermined" when the maps have no spread (one position) or no weak/strong split."""
    before = [g["variance_before"] for g in groups]
    after = [g["variance_after"] for g in groups]
    increased = sum(1 for b, a in zip(before, after) if a > b) / len(groups)
    mean_before, mean_after = _mean(before), _mean(after)
    weak_gate, strong_gate = _mean([g["weak_gate"] for g in groups]), _mean([g["strong_gate"] for g in groups])
    if not mean_before or weak_gate is None or strong_gate is None:
        verdict = "undetermined"
    else:
        verdict = "held" if increased > 0.5 and weak_gate < strong_gate else "not held"
    return {
        "variance_before": mean_before,
        "variance_after": mean_after,
        "variance_ratio": mean_after / mean_before if mean_before else None,
        "groups_increased": increased,
        "weak_fraction": _mean([g["weak_fraction"] for g in groups]),
        "weak_gate": weak_gate,
        "strong_gate": strong_gate,
        "verdict": verdict,
    }


def variance_figure(rows) -> bytes | None:
    """PNG: per model (one panel), each group's variance across positions before vs after SGE."""
    if not rows:
        return None
    figure = Figure(figsize=(8, 2.2 * len(rows) + 0.6), layout="constrained")
    axes = figure.subplots(len(rows), 1, squeeze=False)
    for axis, row in zip(axes[:, 0], rows):
        positions = range(len(row.group_variance_before))
        axis.bar([p - 0.2 for p in positions], row.group_variance_before, width=0.4, label="before SGE")
        axis.bar([p + 0.2 for p in positions], row.group_variance_after, width=0.4, label="after SGE")
        axis.set_title(f"{row.model} seed {row.seed}, {row.layer}: {row.verdict}", fontsize=9)
        axis.set_ylabel("variance", fontsize=8)
        axis.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("group", fontsize=8)
    axes[0, 0].legend(fontsize=8)
    return png(figure, dpi=80)


ACTIVATION_HEADERS = ("Model", "Layer", "Images", "Variance before", "Variance after", "Ratio",
                      "Groups increased", "Weak positions", "Gate weak / strong", "Verdict")
ACTIVATION_LEAD = (
    "The paper's claim: over the val images, SGE's top layer spreads each group's activations more across "
    "positions (strong kept, weak pushed toward zero). Per SGE model, at its last SGE block: the variance across "
    "positions of each group's mean activation map before and after SGE (mean over groups of means over "
    "images), their ratio, the fraction of groups whose variance grew, the share of weak positions (below "
    "{threshold:g} x the map's max before SGE) and the mean gate over weak vs strong positions. "
    "\"held\": the variance grew in most groups and weak positions got the lower gate."
)


def _cell(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def activation_table(rows) -> list[list[str]]:
    return [[f"{r.model} seed {r.seed}", r.layer, str(r.images), _cell(r.variance_before), _cell(r.variance_after),
             _cell(r.variance_ratio, 3), f"{100 * r.groups_increased:.0f}%",
             "-" if r.weak_fraction is None else f"{100 * r.weak_fraction:.0f}%",
             f"{_cell(r.weak_gate, 3)} / {_cell(r.strong_gate, 3)}", r.verdict] for r in rows]


def activation_line(row) -> str:
    """One console line: the ratio, the gates and the verdict."""
    return (f"SGE activations {row.model} seed {row.seed}: variance x{_cell(row.variance_ratio, 3)}, "
            f"gate weak/strong {_cell(row.weak_gate, 2)}/{_cell(row.strong_gate, 2)}: {row.verdict}")
