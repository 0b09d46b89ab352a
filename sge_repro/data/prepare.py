"""The `data` stage: produce data/cls and data/det from the `data` section of params.yaml.

Embedded profile: both sets are generated from data.seed. Paper profile: data/cls becomes the
ImageNet ImageFolder tree (unpacked from the official archives, or linked from an existing
tree), and data/det records the validated COCO 2017 root that the detection stages read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from sge_repro import atomic
from sge_repro.errors import UserError
from sge_repro.paths import ProjectPaths

Progress = Callable[[str, int, int | None], None]


def prepare_data(data, paths: ProjectPaths, progress: Progress | None = None) -> dict[str, Any]:
    """Generate (synthetic) or prepare (real) both datasets; write data/manifest.json last."""
    datasets = {
        "classification": _classification(data, paths, progress),
        "detection": _detection(data, paths),
    }
    manifest = {
        "classification_source": data.classification.source,
        "detection_source": data.detection.source,
        "datasets": datasets,
    }
    atomic.write_json(paths.data_manifest, manifest)
    return manifest


def _required_path(value: str | None, key: str) -> Path:
    if not value:
        raise UserError(f"params.yaml: {key}: required for this source (a path on this machine)")
    path = Path(value).expanduser()
    if not path.exists():
        raise UserError(f"params.yaml: {key}: {path} does not exist")
    return path


def _classification(data, paths: ProjectPaths, progress: Progress | None) -> dict[str, Any]:
    cls = data.classification
    if cls.source == "synthetic":
        from sge_repro.data.synthetic import generate_classification_set

        return generate_classification_set(
            paths.cls_data, num_classes=cls.num_classes, image_size=cls.image_size,
            train_per_class=cls.train_per_class, val_per_class=cls.val_per_class, seed=data.seed,
            progress=(lambda split, done, total: progress(f"classification {split}", done, total)) if progress else None,
        )
    from sge_repro.data.imagenet_archives import prepare_imagenet

    source = _required_path(cls.source_path, "data.classification.source_path")
    return prepare_imagenet(
        source, paths.cls_data, subset_classes=cls.subset_classes,
        progress=(lambda done, total: progress("imagenet", done, total)) if progress else None,
    )


def _detection(data, paths: ProjectPaths) -> dict[str, Any]:
    det = data.detection
    if det.source == "synthetic":
        from sge_repro.data.synthetic import generate_detection_set

        return generate_detection_set(
            paths.det_data, num_train=det.num_train, num_val=det.num_val, image_size=det.image_size,
            num_categories=det.num_categories, seed=data.seed + 1,
        )
    from sge_repro.data.coco_json import validate_coco_json

    root = _required_path(det.source_path, "data.detection.source_path")
    stats = {}
    for split in ("train2017", "val2017"):
        json_path = root / "annotations" / f"instances_{split}.json"
        if not json_path.is_file():
            raise UserError(f"{json_path}: missing (expected the COCO 2017 layout; `sge-repro data fetch coco` makes it)")
        stats[split] = validate_coco_json(json_path, root / split, check_files=True)
    # data/det records which COCO root was validated: the detection stages read it from params.
    record = {"source": "coco", "root": str(root.resolve()), "splits": stats}
    atomic.write_json(paths.det_data / "coco_root.json", record)
    return {split: {k: v for k, v in s.items() if isinstance(v, int)} for split, s in stats.items()}
