"""Validation of COCO-format instance annotation files (real COCO 2017 or the embedded set).

`validate_coco_json` checks what detectron2 and pycocotools assume without checking: the JSON
parses, the top-level lists exist and are not empty, ids are unique integers, every annotation
points (by integer id) at a known image and category, at least one annotation is not a crowd one
(detectron2 drops crowd-only images and then finds no data; COCOeval has nothing to score), boxes
have positive size, every file_name stays inside the split's image folder, and every image file
exists. Problems raise UserError with one line naming the file and the offending id and key. That
each image's width / height is its file's real size is checked by the data stage, which decodes
every file once anyway (sge_repro.data.prepare).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections import Counter
from pathlib import Path

from sge_repro.data.download import file_digest
from sge_repro.data.manifest import SPLITS
from sge_repro.errors import UserError

REQUIRED_KEYS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_id(value) -> bool:
    """A COCO id: a JSON integer (not a bool, not 1.0: pycocotools and detectron2 key dicts by it)."""
    return isinstance(value, int) and not isinstance(value, bool)


def outside_folder(file_name: str) -> bool:
    """`file_name` (as detectron2 joins it to the image folder) names a file outside that folder:
    an absolute path, or one whose '..' components climb above it. Checked on the text, not by
    resolving links: a split folder or its files may be symlinks into another tree."""
    if os.path.isabs(file_name) or posixpath.isabs(file_name):
        return True
    normalized = posixpath.normpath(file_name.replace(os.sep, "/"))
    return normalized == ".." or normalized.startswith("../")


def load_coco_document(json_path: Path) -> dict:
    if not json_path.is_file():
        raise UserError(f"{json_path}: annotation file not found; expected a COCO instances JSON")
    try:
        with open(json_path, encoding="utf-8") as handle:
            document = json.load(handle)
    except json.JSONDecodeError as error:
        raise UserError(f"{json_path}: malformed JSON at line {error.lineno} column {error.colno} "
                        f"({error.msg}); expected a COCO instances JSON") from error
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{json_path}: unreadable ({error}); expected a COCO instances JSON") from error
    if not isinstance(document, dict):
        raise UserError(f"{json_path}: top level is a {type(document).__name__}; expected an object with "
                        "images, annotations, categories")
    return document


def check_records(json_path: Path, document: dict, section: str) -> list[dict]:
    if section not in document:
        raise UserError(f"{json_path}: missing key {section!r}; expected images, annotations and categories")
    records = document[section]
    if not isinstance(records, list):
        raise UserError(f"{json_path}: {section!r} is a {type(records).__name__}; expected a list")
    singular = section[:-1]
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{json_path}: {section}[{position}] is a {type(record).__name__}; expected an object")
        label = f"{singular} id {record['id']}" if "id" in record else f"{section}[{position}]"
        for key in REQUIRED_KEYS[section]:
            if key not in record:
                raise UserError(f"{json_path}: {label} lacks {key!r}; expected keys {', '.join(REQUIRED_KEYS[section])}")
        if not _is_id(record["id"]):
            raise UserError(f"{json_path}: {section}[{position}] has id {record['id']!r}; expected an integer")
    duplicates = sorted(id_ for id_, count in Counter(r["id"] for r in records).items() if count > 1)
    if duplicates:
        raise UserError(f"{json_path}: duplicate {singular} id {duplicates[0]}"
                        + (f" (and {len(duplicates) - 1} more)" if len(duplicates) > 1 else "")
                        + f"; expected unique {singular} ids")
    return records


LAYOUTS = ("coco2017", "embedded")


def coco_split_paths(root: str | os.PathLike, split: str, layout: str = "embedded") -> tuple[Path, Path]:
    """(annotation json, image folder) of `split` under `root` in one of LAYOUTS:

    coco2017:  root/train2017/, root/val2017/, root/annotations/instances_{train,val}2017.json
    embedded:  root/train/,     root/val/,     root/annotations/instances_{train,val}.json
    """
    if layout not in LAYOUTS:
        raise UserError(f"dataset layout {layout!r}: expected one of {list(LAYOUTS)}")
    if split not in SPLITS:
        raise UserError(f"dataset split {split!r}: expected one of {list(SPLITS)}")
    root = Path(root)
    suffix = "2017" if layout == "coco2017" else ""
    return root / "annotations" / f"instances_{split}{suffix}.json", root / f"{split}{suffix}"


def validate_coco_json(json_path: str | os.PathLike, image_root: str | os.PathLike,
                       check_files: bool = True) -> dict:
    """Validate a COCO instances file against its image folder; returns counts.

    Returns {"images", "annotations", "categories", "crowd", "images_without_annotations",
    "annotations_per_category": {name: count}, "small", "medium", "large"} (COCO area ranges).
    """
    json_path = Path(json_path)
    return validate_coco_document(json_path, load_coco_document(json_path), image_root, check_files)


def validate_coco_document(json_path: Path, document: dict, image_root: str | os.PathLike,
                           check_files: bool = True) -> dict:
    """`validate_coco_json` of an already parsed document (`json_path` names it in errors)."""
    image_root = Path(image_root)
    images = check_records(json_path, document, "images")
    annotations = check_records(json_path, document, "annotations")
    categories = check_records(json_path, document, "categories")
    if not categories:
        raise UserError(f"{json_path}: 'categories' is empty; expected at least one category")
    if not images:
        raise UserError(f"{json_path}: 'images' is empty; expected at least one image (a split without "
                        "images can be neither trained on nor evaluated)")

    image_sizes = {}
    for image in images:
        width, height = image["width"], image["height"]
        if not (_is_number(width) and _is_number(height) and width > 0 and height > 0):
            raise UserError(f"{json_path}: image id {image['id']} has size {width!r}x{height!r}; "
                            "expected positive width and height")
        if not isinstance(image["file_name"], str) or not image["file_name"] or "\0" in image["file_name"]:
            raise UserError(f"{json_path}: image id {image['id']} has file_name {image['file_name']!r}; "
                            "expected a relative path")
        if outside_folder(image["file_name"]):
            raise UserError(f"{json_path}: image id {image['id']} has file_name {image['file_name']!r}, which "
                            f"points outside the split's image folder {image_root}; expected a path relative "
                            "to that folder, inside it")
        image_sizes[image["id"]] = (width, height)
        if check_files and not (image_root / image["file_name"]).is_file():
            raise UserError(f"{json_path}: image id {image['id']}: file {image_root / image['file_name']} "
                            "not found; expected every listed image to exist")

    category_names = {category["id"]: str(category["name"]) for category in categories}
    per_category = Counter()
    annotated_images = set()
    size_buckets = Counter()
    crowd = 0
    for annotation in annotations:
        label = f"annotation id {annotation['id']}"
        for key, points_at in (("image_id", "an image"), ("category_id", "a category")):
            if not _is_id(annotation[key]):
                raise UserError(f"{json_path}: {label} has {key} {annotation[key]!r}; expected the integer id "
                                f"of {points_at}")
        if annotation["image_id"] not in image_sizes:
            raise UserError(f"{json_path}: {label} points at unknown image id {annotation['image_id']!r}; "
                            "expected an id listed in 'images'")
        if annotation["category_id"] not in category_names:
            raise UserError(f"{json_path}: {label} points at unknown category id {annotation['category_id']!r}; "
                            f"expected one of {sorted(category_names)}")
        bbox = annotation["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise UserError(f"{json_path}: {label} has bbox {bbox!r}; expected [x, y, width, height] numbers")
        x, y, width, height = bbox
        if width <= 0 or height <= 0:
            raise UserError(f"{json_path}: {label} has bbox {bbox!r} with non-positive size; "
                            "expected width > 0 and height > 0")
        image_width, image_height = image_sizes[annotation["image_id"]]
        tolerance = 1.0
        if x < -tolerance or y < -tolerance or x + width > image_width + tolerance \
                or y + height > image_height + tolerance:
            raise UserError(f"{json_path}: {label} has bbox {bbox!r} outside image id {annotation['image_id']} "
                            f"({image_width}x{image_height}); expected a box inside the image")
        area = annotation.get("area", width * height)
        if not _is_number(area) or area < 0:
            raise UserError(f"{json_path}: {label} has area {area!r}; expected a non-negative number")
        if "segmentation" in annotation:
            _check_segmentation(json_path, label, annotation["segmentation"])
        if annotation.get("iscrowd", 0) not in (0, 1):
            raise UserError(f"{json_path}: {label} has iscrowd {annotation.get('iscrowd')!r}; expected 0 or 1")
        crowd += annotation.get("iscrowd", 0)
        per_category[category_names[annotation["category_id"]]] += 1
        annotated_images.add(annotation["image_id"])
        size_buckets["small" if area < 32**2 else "medium" if area < 96**2 else "large"] += 1
    if not annotations:
        raise UserError(f"{json_path}: 'annotations' is empty; expected at least one annotation (a split "
                        "without annotations can be neither trained on nor evaluated)")
    if crowd == len(annotations):
        raise UserError(f"{json_path}: every one of the {crowd} annotation(s) has iscrowd 1; expected at least "
                        "one with iscrowd 0 (crowd regions are ignored in training and evaluation)")

    return {
        "images": len(images),
        "annotations": len(annotations),
        "categories": len(categories),
        "crowd": crowd,
        "images_without_annotations": len(images) - len(annotated_images),
        "annotations_per_category": {name: per_category[name] for name in category_names.values()},
        "small": size_buckets["small"],
        "medium": size_buckets["medium"],
        "large": size_buckets["large"],
    }


def _check_segmentation(json_path: Path, label: str, segmentation) -> None:
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise UserError(f"{json_path}: {label} has an RLE segmentation without 'counts'/'size'; "
                            "expected COCO RLE")
        return
    if not isinstance(segmentation, list) or not segmentation:
        raise UserError(f"{json_path}: {label} has segmentation {str(segmentation)[:40]!r}; "
                        "expected a list of polygons or an RLE object")
    for polygon in segmentation:
        if not (isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
                and all(_is_number(v) for v in polygon)):
            raise UserError(f"{json_path}: {label} has a polygon with {len(polygon) if isinstance(polygon, list) else '?'} "
                            "values; expected a flat list of at least 3 (x, y) pairs")


def coco_annotation_record(json_path: Path, image_dir: Path, info: os.stat_result) -> dict:
    """What the data stage caches of one validated annotation file (`info`: its stat): size, mtime,
    sha256, counts, and each image's file name, id and size."""
    document = load_coco_document(json_path)
    stats = validate_coco_document(json_path, document, image_dir, check_files=False)
    return {
        "size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": file_digest(json_path, "sha256"),
        "counts": {key: stats[key] for key in ("images", "annotations", "categories")},
        "files": sorted({str(image["file_name"]) for image in document["images"]}),
        "images": [[image["file_name"], image["id"], image["width"], image["height"]] for image in document["images"]],
    }
