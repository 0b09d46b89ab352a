"""Fixture metrics with known values, written the way the pipeline stages write them."""

from __future__ import annotations

from pathlib import Path

import pytest

from sge_repro.atomic import write_json, write_text
from sge_repro.paths import ProjectPaths

VAL_FILES = [f"val/class{i % 2}/{i:03d}.jpg" for i in range(10)]

# Per-image top-1 correctness on the 10 embedded val images: top-1 = 10 x (number of ones).
EMBEDDED_CORRECT = {
    ("resnet18", 0): [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # 60
    ("resnet18", 1): [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # 70
    ("sge_resnet18", 0): [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],  # 80
    ("sge_resnet18", 1): [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],  # 80
}

HISTORY_HEADER = "epoch\tlr\ttrain_loss\ttrain_acc\tval_loss\tval_top1\tval_top5\timages_per_s\textra\n"


def write_cls(root: Path, model: str, seed: int, dataset: str, top1: float, top5: float,
              correct: list[int] | None = None) -> None:
    paths = ProjectPaths(root)
    write_json(paths.cls_metrics(model, seed), {
        "model": model, "dataset": dataset, "seed": seed, "top1": top1, "top5": top5,
        "loss": 1.25, "num_images": len(correct) if correct else 50000,
    })
    if correct is not None:
        write_json(paths.cls_predictions(model, seed), {"correct": correct, "files": VAL_FILES})
    write_json(paths.cls_train_metrics(model, seed), {"best_epoch": 3, "best_val_top1": top1})
    rows = "".join(
        f"{epoch}\t0.1\t{2.0 - 0.3 * epoch}\t{20 * epoch}\t{2.1 - 0.3 * epoch}\t{top1 * epoch / 3}\t{top5}\t50.0\tx\n"
        for epoch in (1, 2, 3)
    )
    write_text(paths.cls_history(model, seed), HISTORY_HEADER + rows)


def write_det(root: Path, detector: str, backbone: str, seed: int, dataset: str, ap: float,
              segm_ap: float | None = None, engine: str | None = None, protocol: str | None = None,
              weights: str | None = None) -> None:
    """A detection metrics file; engine / protocol / weights (backbone_weights) as eval det records
    them, left out when None (files written before it did)."""
    bbox = {"AP": ap, "AP50": ap + 20, "AP75": ap + 2, "APs": ap - 15, "APm": ap, "APl": ap + 10}
    record = {"detector": detector, "backbone": backbone, "dataset": dataset, "seed": seed, "bbox": bbox,
              "flags": {"frozen_bn": True}}
    for key, value in (("engine", engine), ("protocol", protocol), ("backbone_weights", weights)):
        if value is not None:
            record[key] = value
    if segm_ap is not None:
        record["segm"] = {"AP": segm_ap, "AP50": 50.0, "AP75": 30.0, "APs": None, "APm": 30.0, "APl": 40.0}
    write_json(ProjectPaths(root).det_metrics(detector, backbone, seed), record)


# what eval det records for the paper profile's runs
CONTROLLED = {"engine": "detectron2", "protocol": "controlled", "weights": "trained"}


def populate(root: Path) -> Path:
    for (model, seed), correct in EMBEDDED_CORRECT.items():
        write_cls(root, model, seed, "embedded", top1=10.0 * sum(correct), top5=100.0, correct=correct)
    # ImageNet runs without per-image predictions: the gain falls back to seeds (single run here).
    write_cls(root, "resnet50", 0, "imagenet", top1=76.5, top5=93.0)
    write_cls(root, "sge_resnet50", 0, "imagenet", top1=77.0, top5=93.5)
    # An attention model whose plain baseline was never run.
    write_cls(root, "se_resnet101", 0, "imagenet", top1=78.5, top5=94.0)
    for seed, (plain, sge) in enumerate([(37.4, 38.0), (37.6, 38.2)]):
        write_det(root, "faster_rcnn", "resnet50", seed, "coco", plain, **CONTROLLED)
        write_det(root, "faster_rcnn", "sge_resnet50", seed, "coco", sge, **CONTROLLED)
    write_det(root, "mask_rcnn", "resnet18", 0, "embedded", 20.0, segm_ap=18.0)
    write_det(root, "mask_rcnn", "sge_resnet18", 0, "embedded", 19.5, segm_ap=18.5)
    return root


def fixture_complexity(name: str) -> dict:
    """Stand-in #params / GFLOPs of the models as trained (known values for the golden JSON)."""
    from sge_repro.errors import UserError

    if name == "se_resnet101":
        raise UserError("model 'se_resnet101': not in this profile's model list")
    return {"name": name, "params_m": {"resnet18": 0.7, "sge_resnet18": 0.7001}.get(name, 25.56), "gflops": 0.05}


@pytest.fixture
def results_root(tmp_path: Path) -> Path:
    return populate(tmp_path)
