"""The `data` stage: produce data/cls and data/det from the `data` section of params.yaml."""

from __future__ import annotations

from typing import Any

from sge_repro import atomic
from sge_repro.errors import UserError
from sge_repro.paths import ProjectPaths


def prepare_data(data, paths: ProjectPaths) -> dict[str, Any]:
    """Generate (synthetic) or prepare (real) both datasets; write data/manifest.json last."""
    from sge_repro.data import synthetic

    datasets: dict[str, Any] = {}
    cls = data.classification
    if cls.source == "synthetic":
        datasets["classification"] = synthetic.generate_classification_set(
            paths.cls_data, num_classes=cls.num_classes, image_size=cls.image_size,
            train_per_class=cls.train_per_class, val_per_class=cls.val_per_class, seed=data.seed,
        )
    else:
        raise UserError(
            "params.yaml: data.classification.source: 'imagenet' preparation is not available yet "
            "(see issue 4); use 'synthetic'"
        )
    det = data.detection
    if det.source == "synthetic":
        datasets["detection"] = synthetic.generate_detection_set(
            paths.det_data, num_train=det.num_train, num_val=det.num_val, image_size=det.image_size,
            num_categories=det.num_categories, seed=data.seed + 1,
        )
    else:
        raise UserError(
            "params.yaml: data.detection.source: 'coco' preparation is not available yet "
            "(see issue 5); use 'synthetic'"
        )
    manifest = {"classification_source": cls.source, "detection_source": det.source, "datasets": datasets}
    atomic.write_json(paths.data_manifest, manifest)
    return manifest
