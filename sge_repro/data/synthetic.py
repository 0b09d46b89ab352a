"""Embedded data sets, generated deterministically from a seed.

Both sets show the situation SGE is meant to help with: the object that matters is a textured
shape among clutter, similar distractor patterns and a noisy background.

* Classification (ImageNet ImageFolder layout): the class of an image is the (shape, texture)
  pair of its main object. Smaller distractor objects share the shape or the texture of the main
  object (or are another class's pattern), so a model has to bind shape and texture on the same
  object and attend to the right one.
* Detection (COCO layout): each category is a (shape, texture) pair; unannotated distractors
  carry a category's shape with the wrong texture or the right texture on the wrong shape.

Every image draws its randomness from its own numpy Generator seeded by (seed, split, index), so
the same seed gives byte-identical files regardless of generation order. A set is written into a
hidden temporary folder next to `root`, its manifest last, then renamed into place: a killed run
never leaves a tree at `root` that looks complete.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from sge_repro import atomic
from sge_repro.errors import UserError

GENERATOR_VERSION = 1
JPEG_QUALITY = 90
MANIFEST_NAME = "manifest.json"

SHAPES = ("circle", "triangle", "square", "diamond", "star", "cross", "tee", "ell")
TEXTURES = ("hstripes", "vstripes", "dstripes", "checker", "dots", "rings")

_SPLIT_IDS = {"train": 1, "val": 2}

# How cluttered the classification images are (fractions of the image size).
CLASSIFICATION_STYLE = {
    "distractors": (1, 3),           # inclusive range of distractor objects
    "similar_distractor_share": 0.7,  # share of distractors that copy the shape or the texture
    "distractor_radius": (0.09, 0.16),
    "object_radius": (0.2, 0.32),
    "noise_std": (8.0, 20.0),
    "clutter_lines": (3, 7),
    "texture_period": (0.35, 0.55),   # stripe period as a fraction of the object radius
    "min_contrast": 70.0,
}


# --------------------------------------------------------------------------- patterns


def pattern_table() -> list[tuple[str, str]]:
    """All (shape, texture) patterns in a fixed order.

    Consecutive patterns differ in shape first, then texture, so the first ten classes reuse
    shapes and textures across classes: neither cue alone identifies a class.
    """
    table = []
    for shift in range(len(TEXTURES)):
        for shape_index, shape in enumerate(SHAPES):
            table.append((shape, TEXTURES[(shape_index + shift) % len(TEXTURES)]))
    return table


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of a shape centred at 0 with circumradius about 1 (y points down)."""
    if shape == "circle":
        return [(math.cos(2 * math.pi * k / 24), math.sin(2 * math.pi * k / 24)) for k in range(24)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "square":
        s = 0.75
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.45
            angle = -math.pi / 2 + math.pi * k / 5
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, b = 0.3, 0.9
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                (-a, a), (-b, a), (-b, -a), (-a, -a)]
    if shape == "tee":
        return [(-0.9, -0.8), (0.9, -0.8), (0.9, -0.3), (0.28, -0.3), (0.28, 0.9), (-0.28, 0.9),
                (-0.28, -0.3), (-0.9, -0.3)]
    if shape == "ell":
        return [(-0.65, -0.9), (-0.1, -0.9), (-0.1, 0.35), (0.75, 0.35), (0.75, 0.9), (-0.65, 0.9)]
    raise ValueError(f"unknown shape {shape!r}")


_UNIT_POLYGONS = {shape: np.array(_unit_polygon(shape), dtype=np.float64) for shape in SHAPES}


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Polygon vertices (N, 2) in continuous image coordinates (pixel i covers [i, i+1])."""
    unit = _UNIT_POLYGONS[shape]
    cos, sin = math.cos(angle), math.sin(angle)
    rotated = unit @ np.array([[cos, sin], [-sin, cos]])
    return rotated * radius + np.array([cx, cy])


def _polygon_mask(polygon: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a polygon, rendered at 2x and box-filtered."""
    canvas = Image.new("L", (2 * size, 2 * size), 0)
    # PIL addresses pixel centres by integer coordinates: continuous u maps to 2u - 0.5.
    points = [(2 * x - 0.5, 2 * y - 0.5) for x, y in polygon]
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    coverage = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(coverage, dtype=np.float32) / 255.0


def _texture(texture: str, size: int, cx: float, cy: float, period: float, phase: float) -> np.ndarray:
    """Binary-ish texture in [0, 1] over the whole image, anchored at the object centre."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u, v = xs - cx, ys - cy
    omega = 2 * math.pi / period
    if texture == "hstripes":
        wave = np.sin(omega * v + phase)
    elif texture == "vstripes":
        wave = np.sin(omega * u + phase)
    elif texture == "dstripes":
        wave = np.sin(omega * (u + v) / math.sqrt(2) + phase)
    elif texture == "checker":
        wave = np.sin(omega * u + phase) * np.sin(omega * v + phase)
    elif texture == "dots":
        du = np.mod(u + phase, period) - period / 2
        dv = np.mod(v + phase, period) - period / 2
        wave = (0.32 * period) ** 2 - (du**2 + dv**2)
    elif texture == "rings":
        wave = np.sin(omega * np.sqrt(u**2 + v**2) + phase)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    # A steep sigmoid instead of a hard threshold keeps edges smooth after JPEG.
    return 1.0 / (1.0 + np.exp(-6.0 * wave / (np.abs(wave).max() + 1e-6)))


def _random_colour_pair(rng: np.random.Generator, min_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    while True:
        first, second = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
        if np.abs(first - second).mean() >= min_contrast:
            return first, second


def _background(rng: np.random.Generator, size: int, noise_std: float,
                clutter_lines: tuple[int, int] = (3, 7)) -> np.ndarray:
    """A smooth random colour field plus clutter strokes and pixel noise, float32 (H, W, 3)."""
    coarse = rng.uniform(30, 225, size=(4, 4, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    clutter = Image.new("RGB", (size, size), (0, 0, 0))
    clutter_alpha = Image.new("L", (size, size), 0)
    draw, draw_alpha = ImageDraw.Draw(clutter), ImageDraw.Draw(clutter_alpha)
    for _ in range(int(rng.integers(clutter_lines[0], clutter_lines[1] + 1))):
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        colour = tuple(int(c) for c in rng.uniform(0, 255, size=3))
        width = int(rng.integers(1, max(2, size // 32) + 1))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=width)
        draw_alpha.line([(x0, y0), (x1, y1)], fill=int(rng.uniform(90, 200)), width=width)
    alpha = np.asarray(clutter_alpha, np.float32)[..., None] / 255.0
    field = field * (1 - alpha) + np.asarray(clutter, np.float32) * alpha
    return field + rng.normal(0.0, noise_std, size=field.shape).astype(np.float32)


def _paint_object(canvas: np.ndarray, rng: np.random.Generator, shape: str, texture: str,
                  cx: float, cy: float, radius: float, angle: float,
                  period_range: tuple[float, float] = (0.35, 0.55), min_contrast: float = 70.0) -> np.ndarray:
    """Composite one textured shape onto the canvas in place; returns its polygon."""
    size = canvas.shape[0]
    polygon = shape_polygon(shape, cx, cy, radius, angle)
    coverage = _polygon_mask(polygon, size)[..., None]
    period = max(3.0, radius * rng.uniform(*period_range))
    pattern = _texture(texture, size, cx, cy, period, rng.uniform(0, 2 * math.pi))[..., None]
    first, second = _random_colour_pair(rng, min_contrast=min_contrast)
    painted = pattern * first + (1 - pattern) * second
    canvas *= 1 - coverage
    canvas += coverage * painted
    return polygon


def _jpeg_bytes(canvas: np.ndarray) -> bytes:
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def _similar_distractor(rng: np.random.Generator, shape: str, texture: str) -> tuple[str, str]:
    """A pattern sharing the shape or the texture of (shape, texture), but not both."""
    if rng.random() < 0.5:
        others = [t for t in TEXTURES if t != texture]
        return shape, others[int(rng.integers(len(others)))]
    others = [s for s in SHAPES if s != shape]
    return others[int(rng.integers(len(others)))], texture


# --------------------------------------------------------------------------- writing


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


Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------- classification


def class_folder_name(index: int) -> str:
    """An ImageNet-synset-like folder name for class `index`."""
    return f"n{index:08d}"


def render_classification_image(seed: int, split: str, class_index: int, image_index: int,
                                image_size: int) -> bytes:
    """One JPEG of class `class_index`; a pure function of its arguments."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], class_index, image_index, GENERATOR_VERSION])
    shape, texture = pattern_table()[class_index]
    style = CLASSIFICATION_STYLE
    size = image_size
    canvas = _background(rng, size, rng.uniform(*style["noise_std"]), style["clutter_lines"])
    paint = dict(period_range=style["texture_period"], min_contrast=style["min_contrast"])

    # Distractors first (smaller, may be overlapped by the main object).
    low, high = style["distractors"]
    for _ in range(int(rng.integers(low, high + 1))):
        if rng.random() < style["similar_distractor_share"]:
            d_shape, d_texture = _similar_distractor(rng, shape, texture)
        else:
            d_shape, d_texture = pattern_table()[int(rng.integers(len(SHAPES) * len(TEXTURES)))]
        radius = size * rng.uniform(*style["distractor_radius"])
        cx, cy = rng.uniform(radius, size - radius, size=2)
        _paint_object(canvas, rng, d_shape, d_texture, cx, cy, radius, rng.uniform(-0.3, 0.3), **paint)

    radius = size * rng.uniform(*style["object_radius"])
    margin = 0.8 * radius
    cx, cy = rng.uniform(margin, size - margin, size=2)
    _paint_object(canvas, rng, shape, texture, cx, cy, radius, rng.uniform(-0.26, 0.26), **paint)
    return _jpeg_bytes(canvas)


def generate_classification_set(root: str | os.PathLike, num_classes: int, image_size: int,
                                train_per_class: int, val_per_class: int, seed: int,
                                progress: Progress | None = None) -> dict:
    """Write an ImageFolder tree root/{train,val}/<synset>/*.jpg; returns the counts.

    `progress`, if given, is called as progress(split, done, total) after every image.
    """
    _check_positive(num_classes=num_classes, image_size=image_size, train_per_class=train_per_class,
                    val_per_class=val_per_class)
    if num_classes > len(pattern_table()):
        raise UserError(f"num_classes={num_classes}: expected at most {len(pattern_table())} "
                        "(the number of distinct shape x texture patterns)")
    if image_size < 16:
        raise UserError(f"image_size={image_size}: expected at least 16 pixels")
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
            "image_size": image_size,
            "num_classes": num_classes,
            "counts": counts,
            "classes": {class_folder_name(k): f"{table[k][0]} / {table[k][1]}" for k in range(num_classes)},
        }
        _write_manifest(staging, manifest)
    return {"num_classes": num_classes, **counts}


# --------------------------------------------------------------------------- detection


def category_patterns(num_categories: int) -> list[tuple[str, str]]:
    """(shape, texture) of each detection category: distinct shapes, shared textures."""
    table = pattern_table()
    return table[:num_categories]


def _place(rng: np.random.Generator, size: int, radius: float, placed: list[tuple[float, float, float]],
           tries: int = 30) -> tuple[float, float] | None:
    """A centre for a disc of `radius` inside the image that overlaps no placed disc."""
    for _ in range(tries):
        cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (radius + r + 2) ** 2 for x, y, r in placed):
            return float(cx), float(cy)
    return None


def _polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def render_detection_image(seed: int, split: str, image_index: int, image_size: int,
                           num_categories: int, max_objects: int) -> tuple[bytes, list[dict]]:
    """One JPEG and its objects [{category_index, bbox [x,y,w,h], area, polygon [x1,y1,...]}]."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], image_index, num_categories, GENERATOR_VERSION])
    size = image_size
    categories = category_patterns(num_categories)
    canvas = _background(rng, size, noise_std=rng.uniform(8, 20))
    placed: list[tuple[float, float, float]] = []
    # Radii log-uniform from tiny (COCO "small": area < 32^2 at 128 px) to about a quarter image.
    min_radius, max_radius = max(5.0, size * 0.045), size * 0.24

    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        radius = float(np.exp(rng.uniform(np.log(min_radius), np.log(max_radius))))
        centre = _place(rng, size, radius, placed)
        if centre is None:
            continue
        placed.append((*centre, radius))
        category_index = int(rng.integers(num_categories))
        shape, texture = categories[category_index]
        polygon = _paint_object(canvas, rng, shape, texture, *centre, radius, rng.uniform(-0.26, 0.26))
        polygon = np.clip(polygon, 0, size)
        x0, y0 = polygon.min(axis=0)
        x1, y1 = polygon.max(axis=0)
        objects.append({
            "category_index": category_index,
            "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
            "area": round(_polygon_area(polygon), 2),
            "polygon": [round(float(v), 2) for v in polygon.reshape(-1)],
        })

    # Unannotated distractors: a category's shape with another texture, or its texture on
    # another shape. They never overlap annotated objects, so masks stay exact.
    patterns = set(categories)
    for _ in range(int(rng.integers(1, 4))):
        shape, texture = categories[int(rng.integers(num_categories))]
        d_shape, d_texture = _similar_distractor(rng, shape, texture)
        if (d_shape, d_texture) in patterns:
            continue
        radius = float(np.exp(rng.uniform(np.log(min_radius), np.log(max_radius * 0.8))))
        centre = _place(rng, size, radius, placed)
        if centre is None:
            continue
        placed.append((*centre, radius))
        _paint_object(canvas, rng, d_shape, d_texture, *centre, radius, rng.uniform(-0.26, 0.26))
    return _jpeg_bytes(canvas), objects


def generate_detection_set(root: str | os.PathLike, num_train: int, num_val: int, image_size: int,
                           num_categories: int, seed: int, max_objects: int = 6,
                           progress: Progress | None = None) -> dict:
    """Write a COCO-format set: root/{train,val}/*.jpg and root/annotations/instances_{split}.json.

    Returns {"num_categories", "train_images", "val_images", "train_annotations", "val_annotations"}.
    """
    _check_positive(num_train=num_train, num_val=num_val, image_size=image_size,
                    num_categories=num_categories, max_objects=max_objects)
    if num_categories > len(SHAPES):
        raise UserError(f"num_categories={num_categories}: expected at most {len(SHAPES)} "
                        "(categories must have distinct shapes)")
    if image_size < 64:
        raise UserError(f"image_size={image_size}: expected at least 64 pixels for detection")
    categories = [
        {"id": index + 1, "name": f"{shape}-{texture}", "supercategory": shape}
        for index, (shape, texture) in enumerate(category_patterns(num_categories))
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
                images.append({"id": image_id, "file_name": file_name, "width": image_size,
                               "height": image_size})
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
            "image_size": image_size,
            "num_categories": num_categories,
            "max_objects": max_objects,
            "counts": counts,
            "categories": [c["name"] for c in categories],
        }
        _write_manifest(staging, manifest)
    return {"num_categories": num_categories, **counts}
