"""COCO-format datasets for detectron2: real COCO 2017 and the embedded set, one code path.

    coco2017:  root/train2017/, root/val2017/, root/annotations/instances_{train,val}2017.json
    embedded:  root/train/,     root/val/,     root/annotations/instances_{train,val}.json

Both are validated (JSON shape, image files, category ids, box sizes) before detectron2 sees
them, so a broken annotation fails in seconds with its file and id, not hours into training.
"""

from __future__ import annotations

from pathlib import Path

# One COCO validator for the whole project: the data stage and detection use the same checks.
from sge_repro.data.coco_json import check_records, load_coco_document, validate_coco_json
from sge_repro.detection.compat import import_detectron2
from sge_repro.errors import UserError

LAYOUTS = ("coco2017", "embedded")
SPLITS = ("train", "val")


def coco_split_paths(root: str | Path, split: str, layout: str = "embedded") -> tuple[Path, Path]:
    """(annotation json, image folder) of `split` under `root` in the given layout."""
    if layout not in LAYOUTS:
        raise UserError(f"dataset layout {layout!r}: expected one of {list(LAYOUTS)}")
    if split not in SPLITS:
        raise UserError(f"dataset split {split!r}: expected one of {list(SPLITS)}")
    root = Path(root)
    suffix = "2017" if layout == "coco2017" else ""
    return root / "annotations" / f"instances_{split}{suffix}.json", root / f"{split}{suffix}"


def register_coco_dataset(name: str, json_file: str | Path, image_root: str | Path, validate: bool = True) -> dict:
    """Validate and register a COCO instances dataset in detectron2's catalogs under `name`.

    Re-registering the same name with the same files is a no-op; with other files it replaces
    the old entry. Returns the counts from validation (empty when validate=False).
    """
    import_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    json_file, image_root = Path(json_file).resolve(), Path(image_root).resolve()
    counts = validate_coco_json(json_file, image_root) if validate else {}
    if name in DatasetCatalog.list():
        metadata = MetadataCatalog.get(name)
        if metadata.get("json_file") == str(json_file) and metadata.get("image_root") == str(image_root):
            return counts
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(image_root))
    return counts


def register_split(name: str, root: str | Path, split: str, layout: str = "embedded", validate: bool = True) -> dict:
    """`register_coco_dataset` for `split` of a dataset folder in one of LAYOUTS."""
    json_file, image_root = coco_split_paths(root, split, layout)
    return register_coco_dataset(name, json_file, image_root, validate=validate)


def dataset_num_classes(json_file: str | Path) -> int:
    """Number of categories in a COCO instances file (the detector's NUM_CLASSES)."""
    return len(check_records(Path(json_file), load_coco_document(Path(json_file)), "categories"))
