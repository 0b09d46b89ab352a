"""Embedded data sets, generated deterministically from a seed.

Both sets show the situation SGE is meant to help with: the object that matters is a textured
shape among clutter, similar distractor patterns and a noisy background. In classification
(ImageNet ImageFolder layout) an image's class is the pattern of its main object and smaller
distractors share its shape or texture, so a model has to bind shape and texture on one object;
in detection (COCO layout) each category is a pattern and unannotated distractors carry a
category's shape with the wrong texture or its texture on the wrong shape.

A pattern (`pattern_table`) is a shape and a texture: 8 x 6 = 48 base patterns at a medium texture
scale in a random contrasting colour pair. Patterns 48 onward repeat them with a fine or coarse
scale (so none looks like a base pattern) and a fixed colour pair (10 pairs of white, black, red,
green, blue): 48 + 48 x 2 x 10 = 1008, enough for ImageNet's 1000 classes. `image_size` is N or
[W, H]; object sizes follow the shorter side, and [N, N] gives the same bytes as N.

Every image draws from its own numpy Generator seeded by (seed, split, index), so the same seed
gives byte-identical files in any generation order. A set is written into a hidden temporary
folder next to `root`, its manifest last, then renamed into place: a killed run never leaves a
tree at `root` that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sge_repro import atomic
from sge_repro.data.patterns import (BASE_PATTERNS, Pattern, background, jpeg_bytes, paint_object, pattern_table,
                                     similar_distractor)
from sge_repro.errors import UserError

GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.json"

_SPLIT_IDS = {"train": 1, "val": 2}

# How cluttered the classification images are (sizes are fractions of the shorter side).
CLASSIFICATION_STYLE = {
    "distractors": (1, 3),           # inclusive range of distractor objects
    "similar_distractor_share": 0.7,  # share of distractors that copy the shape or the texture
    "distractor_radius": (0.09, 0.16),
    "object_radius": (0.2, 0.32),
    "noise_std": (8.0, 20.0),
    "clutter_lines": (3, 7),
    "min_contrast": 70.0,
}


def _write_manifest(staging: Path, manifest: dict) -> None:
    """The manifest goes in last: a tree with one is complete."""
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of a generated set; UserError if the set is missing or incomplete."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{path}: missing; expected a complete generated data set (rerun the data stage)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: unreadable manifest ({error}); rerun the data stage") from error


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name}={value!r}: expected a positive integer")


ImageSize = int | Sequence[int]


def image_dims(image_size: ImageSize) -> tuple[int, int]:
    """(width, height) of an image size: N (square) or [width, height]."""
    if isinstance(image_size, int):
        return image_size, image_size
    width, height = image_size
    return width, height


def _check_image_size(image_size: ImageSize, minimum: int, purpose: str = "") -> tuple[int, int]:
    sides = [image_size] if isinstance(image_size, int) else list(image_size)
    if len(sides) not in (1, 2) or not all(isinstance(side, int) and not isinstance(side, bool) for side in sides):
        raise UserError(f"image_size={image_size!r}: expected a size in pixels or [width, height]")
    if min(sides) < minimum:
        side = "" if len(sides) == 1 else " per side"
        raise UserError(f"image_size={image_size!r}: expected at least {minimum} pixels{side}{purpose}")
    return image_dims(image_size)


def _check_pattern_count(key: str, count: int) -> None:
    if count > len(pattern_table()):
        raise UserError(f"{key}={count}: expected at most {len(pattern_table())} (the number of distinct "
                        "patterns of the generator)")


Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------- classification


def class_folder_name(index: int) -> str:
    """An ImageNet-synset-like folder name for class `index`."""
    return f"n{index:08d}"


def render_classification_image(seed: int, split: str, class_index: int, image_index: int,
                                image_size: ImageSize) -> bytes:
    """One JPEG of class `class_index`; a pure function of its arguments."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], class_index, image_index, GENERATOR_VERSION])
    pattern = pattern_table()[class_index]
    style = CLASSIFICATION_STYLE
    dims = image_dims(image_size)
    short = min(dims)
    canvas = background(rng, dims, rng.uniform(*style["noise_std"]), style["clutter_lines"])
    min_contrast = style["min_contrast"]

    # Distractors first (smaller, may be overlapped by the main object).
    low, high = style["distractors"]
    for _ in range(int(rng.integers(low, high + 1))):
        if rng.random() < style["similar_distractor_share"]:
            distractor = similar_distractor(rng, pattern)
        else:
            distractor = pattern_table()[int(rng.integers(BASE_PATTERNS))]
        radius = short * rng.uniform(*style["distractor_radius"])
        cx, cy = rng.uniform(radius, np.array(dims) - radius)
        paint_object(canvas, rng, distractor, cx, cy, radius, rng.uniform(-0.3, 0.3), min_contrast)

    radius = short * rng.uniform(*style["object_radius"])
    margin = 0.8 * radius
    cx, cy = rng.uniform(margin, np.array(dims) - margin)
    paint_object(canvas, rng, pattern, cx, cy, radius, rng.uniform(-0.26, 0.26), min_contrast)
    return jpeg_bytes(canvas)


def generate_classification_set(root: str | os.PathLike, num_classes: int, image_size: ImageSize,
                                train_per_class: int, val_per_class: int, seed: int,
                                progress: Progress | None = None) -> dict:
    """Write an ImageFolder tree root/{train,val}/<synset>/*.jpg; returns the counts.

    `progress`, if given, is called as progress(split, done, total) after every image.
    """
    _check_positive(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class)
    _check_pattern_count("num_classes", num_classes)
    _check_image_size(image_size, 16)
    counts = {"train": 0, "val": 0}
    with atomic.publish_dir(root) as staging:
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            total = per_class * num_classes
            for class_index in range(num_classes):
                folder = staging / split / class_folder_name(class_index)
                folder.mkdir(parents=True)
                for image_index in range(per_class):
                    data = render_classification_image(seed, split, class_index, image_index, image_size)
                    (folder / f"{split}_{class_index:04d}_{image_index:06d}.jpg").write_bytes(data)
                    counts[split] += 1
                    if progress is not None:
                        progress(split, counts[split], total)
        table = pattern_table()
        manifest = {
            "kind": "classification",
            "layout": "imagefolder",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "image_size": image_size if isinstance(image_size, int) else list(image_size),
            "num_classes": num_classes,
            "counts": counts,
            "classes": {class_folder_name(k): table[k].name for k in range(num_classes)},
        }
        _write_manifest(staging, manifest)
    return {"num_classes": num_classes, **counts}


# --------------------------------------------------------------------------- detection


def category_patterns(num_categories: int) -> list[Pattern]:
    """The pattern of each detection category: the first `num_categories` of the table. The first 8
    have distinct shapes; more share shapes or textures, and from the 49th on a scale and colours."""
    return list(pattern_table()[:num_categories])


def _place(rng: np.random.Generator, dims: tuple[int, int], radius: float,
           placed: list[tuple[float, float, float]], tries: int = 30) -> tuple[float, float] | None:
    """A centre for a disc of `radius` inside the image that overlaps no placed disc."""
    for _ in range(tries):
        cx, cy = rng.uniform(radius + 1, np.array(dims) - radius - 1)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (radius + r + 2) ** 2 for x, y, r in placed):
            return float(cx), float(cy)
    return None


def _polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def render_detection_image(seed: int, split: str, image_index: int, image_size: ImageSize,
                           num_categories: int, max_objects: int) -> tuple[bytes, list[dict]]:
    """One JPEG and its objects [{category_index, bbox [x,y,w,h], area, polygon [x1,y1,...]}]."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], image_index, num_categories, GENERATOR_VERSION])
    dims = image_dims(image_size)
    categories = category_patterns(num_categories)
    canvas = background(rng, dims, noise_std=rng.uniform(8, 20))
    placed: list[tuple[float, float, float]] = []
    # Radii log-uniform from tiny (COCO "small": area < 32^2 at 128 px) to about a quarter of the
    # shorter side.
    min_radius, max_radius = max(5.0, min(dims) * 0.045), min(dims) * 0.24

    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        radius = float(np.exp(rng.uniform(np.log(min_radius), np.log(max_radius))))
        centre = _place(rng, dims, radius, placed)
        if centre is None:
            continue
        placed.append((*centre, radius))
        category_index = int(rng.integers(num_categories))
        polygon = paint_object(canvas, rng, categories[category_index], *centre, radius, rng.uniform(-0.26, 0.26))
        polygon = np.clip(polygon, 0, dims)
        x0, y0 = polygon.min(axis=0)
        x1, y1 = polygon.max(axis=0)
        objects.append({
            "category_index": category_index,
            "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
            "area": round(_polygon_area(polygon), 2),
            "polygon": [round(float(v), 2) for v in polygon.reshape(-1)],
        })

    # Unannotated distractors: a category's shape with another texture, or its texture on
    # another shape (none where that is a category too, as it always is for a base pattern once
    # all 48 are categories). They never overlap annotated objects, so masks stay exact.
    patterns = set(categories)
    for _ in range(int(rng.integers(1, 4))):
        distractor = similar_distractor(rng, categories[int(rng.integers(num_categories))])
        if distractor in patterns:
            continue
        radius = float(np.exp(rng.uniform(np.log(min_radius), np.log(max_radius * 0.8))))
        centre = _place(rng, dims, radius, placed)
        if centre is None:
            continue
        placed.append((*centre, radius))
        paint_object(canvas, rng, distractor, *centre, radius, rng.uniform(-0.26, 0.26))
    return jpeg_bytes(canvas), objects


def generate_detection_set(root: str | os.PathLike, num_train: int, num_val: int, image_size: ImageSize,
                           num_categories: int, seed: int, max_objects: int = 6,
                           progress: Progress | None = None) -> dict:
    """Write a COCO-format set: root/{train,val}/*.jpg and root/annotations/instances_{split}.json.

    Returns {"num_categories", "train_images", "val_images", "train_annotations", "val_annotations"}.
    """
    _check_positive(num_train=num_train, num_val=num_val, num_categories=num_categories, max_objects=max_objects)
    _check_pattern_count("num_categories", num_categories)
    width, height = _check_image_size(image_size, 64, " for detection")
    categories = [
        {"id": index + 1, "name": pattern.name.replace(" / ", "-"), "supercategory": pattern.shape}
        for index, pattern in enumerate(category_patterns(num_categories))
    ]
    counts = {}
    with atomic.publish_dir(root) as staging:
        (staging / "annotations").mkdir(parents=True)
        for split, count in (("train", num_train), ("val", num_val)):
            (staging / split).mkdir()
            images, annotations = [], []
            for image_index in range(count):
                data, objects = render_detection_image(seed, split, image_index, image_size,
                                                       num_categories, max_objects)
                file_name = f"{split}_{image_index:06d}.jpg"
                (staging / split / file_name).write_bytes(data)
                image_id = image_index + 1
                images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
                for obj in objects:
                    annotations.append({
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": obj["category_index"] + 1,
                        "bbox": obj["bbox"],
                        "area": obj["area"],
                        "iscrowd": 0,
                        "segmentation": [obj["polygon"]],
                    })
                if progress is not None:
                    progress(split, image_index + 1, count)
            document = {
                "info": {"description": "sge-repro embedded detection set", "version": str(GENERATOR_VERSION),
                         "seed": seed},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": categories,
            }
            (staging / "annotations" / f"instances_{split}.json").write_text(
                json.dumps(document, separators=(",", ":")), encoding="utf-8")
            counts[f"{split}_images"] = len(images)
            counts[f"{split}_annotations"] = len(annotations)
        manifest = {
            "kind": "detection",
            "layout": "coco",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "image_size": image_size if isinstance(image_size, int) else list(image_size),
            "num_categories": num_categories,
            "max_objects": max_objects,
            "counts": counts,
            "categories": [c["name"] for c in categories],
        }
        _write_manifest(staging, manifest)
    return {"num_categories": num_categories, **counts}
