"""COCO-format datasets for detectron2: real COCO 2017 and the embedded set, one code path.

    coco2017:  root/train2017/, root/val2017/, root/annotations/instances_{train,val}2017.json
    embedded:  root/train/,     root/val/,     root/annotations/instances_{train,val}.json

Both are validated (JSON shape, image files, category ids, box sizes) before detectron2 sees
them, so a broken annotation fails in seconds with its file and id, not hours into training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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


def _load_json(json_file: Path) -> dict:
    if not json_file.is_file():
        raise UserError(f"{json_file}: annotation file not found")
    try:
        with open(json_file, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{json_file}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise UserError(f"{json_file}: expected a COCO object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{json_file}: key {key!r} missing or not a list (COCO instances format)")
    return data


def validate_coco_annotations(json_file: str | Path, image_root: str | Path, check_files: bool = True) -> dict:
    """Check a COCO instances file against its images; return counts. UserError on the first fault."""
    json_file, image_root = Path(json_file), Path(image_root)
    data = _load_json(json_file)
    if not image_root.is_dir():
        raise UserError(f"{image_root}: image folder not found (annotations {json_file})")

    category_ids = set()
    for category in data["categories"]:
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise UserError(f"{json_file}: category {category!r} needs 'id' and 'name'")
        category_ids.add(category["id"])
    if not category_ids:
        raise UserError(f"{json_file}: no categories")

    image_ids = set()
    for image in data["images"]:
        if not isinstance(image, dict) or not {"id", "file_name", "height", "width"} <= image.keys():
            raise UserError(f"{json_file}: image {image!r} needs id, file_name, height, width")
        if image["id"] in image_ids:
            raise UserError(f"{json_file}: image id {image['id']} appears twice")
        image_ids.add(image["id"])
        if check_files and not (image_root / image["file_name"]).is_file():
            raise UserError(
                f"{json_file}: image id {image['id']}: file {image_root / image['file_name']} not found"
            )

    for annotation in data["annotations"]:
        annotation_id = annotation.get("id", "?") if isinstance(annotation, dict) else "?"
        where = f"{json_file}: annotation id {annotation_id}"
        if not isinstance(annotation, dict) or not {"image_id", "category_id", "bbox"} <= annotation.keys():
            raise UserError(f"{where}: needs image_id, category_id, bbox")
        if annotation["image_id"] not in image_ids:
            raise UserError(f"{where}: unknown image_id {annotation['image_id']}")
        if annotation["category_id"] not in category_ids:
            raise UserError(
                f"{where}: unknown category_id {annotation['category_id']} "
                f"(categories: {sorted(category_ids)})"
            )
        box = annotation["bbox"]
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
        ):
            raise UserError(f"{where}: bbox {box!r}, expected [x, y, width, height] numbers")
        if box[2] <= 0 or box[3] <= 0:
            raise UserError(f"{where}: bbox {box} has non-positive width or height")
    return {
        "images": len(image_ids),
        "annotations": len(data["annotations"]),
        "categories": len(category_ids),
    }


def register_coco_dataset(name: str, json_file: str | Path, image_root: str | Path, validate: bool = True) -> dict:
    """Validate and register a COCO instances dataset in detectron2's catalogs under `name`.

    Re-registering the same name with the same files is a no-op; with other files it replaces
    the old entry. Returns the counts from validation (empty when validate=False).
    """
    import_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    json_file, image_root = Path(json_file).resolve(), Path(image_root).resolve()
    counts = validate_coco_annotations(json_file, image_root) if validate else {}
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
    return len(_load_json(Path(json_file))["categories"])
