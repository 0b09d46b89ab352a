"""Embedded data sets, generated deterministically from a seed.

Both sets show the situation SGE is meant to help with: the object that matters is a textured
shape among clutter, similar distractor patterns and a noisy background.

* Classification (ImageNet ImageFolder layout): the class of an image is the pattern of its
  main object. Smaller distractor objects share the shape or the texture of the main object (or
  are another class's pattern), so a model has to bind shape and texture on the same object and
  attend to the right one.
* Detection (COCO layout): each category is a pattern; unannotated distractors carry a
  category's shape with the wrong texture or the right texture on the wrong shape.

A pattern (`pattern_table`) is a shape and a texture: 8 x 6 = 48 base patterns, painted at a
medium texture scale in a random contrasting colour pair per object. Patterns 48 onward repeat the
base table with two more attributes, so that ImageNet's 1000 classes and COCO's 80 categories
each get a pattern of their own: a texture scale (fine or coarse, where base patterns are
medium, so no extended pattern looks like a base one) and a fixed colour pair (two of white,
black, red, green, blue: 10 pairs). That makes 48 + 48 x 2 x 10 = 1008 patterns. A distractor
similar to an extended pattern keeps its scale and colours and changes the shape or texture.

An image is N x N pixels (`image_size` N) or W x H (`image_size` [W, H]); object sizes follow the
shorter side. A square [N, N] gives the same bytes as N.

Every image draws its randomness from its own numpy Generator seeded by (seed, split, index), so
the same seed gives byte-identical files regardless of generation order. A set is written into a
hidden temporary folder next to `root`, its manifest last, then renamed into place: a killed run
never leaves a tree at `root` that looks complete.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

from sge_repro import atomic
from sge_repro.errors import UserError

GENERATOR_VERSION = 1
JPEG_QUALITY = 90
MANIFEST_NAME = "manifest.json"

SHAPES = ("circle", "triangle", "square", "diamond", "star", "cross", "tee", "ell")
TEXTURES = ("hstripes", "vstripes", "dstripes", "checker", "dots", "rings")
# Stripe period as a fraction of the object radius; base patterns are medium.
TEXTURE_SCALES = {"medium": (0.35, 0.55), "fine": (0.17, 0.25), "coarse": (0.8, 1.1)}
COLOURS = {"white": (245, 245, 245), "black": (15, 15, 15), "red": (225, 35, 35), "green": (35, 190, 70),
           "blue": (40, 80, 230)}
COLOUR_JITTER = 20.0  # per channel, so a fixed colour pair still varies a little between objects

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


# --------------------------------------------------------------------------- patterns


class Pattern(NamedTuple):
    """What identifies a class or a detection category."""

    shape: str
    texture: str
    scale: str = "medium"                  # a key of TEXTURE_SCALES
    colours: tuple[str, str] | None = None  # two COLOURS keys; None: a random contrasting pair

    @property
    def name(self) -> str:
        """'circle / hstripes' (base) or 'circle / hstripes / fine / white-black'."""
        parts = [self.shape, self.texture]
        if self.colours is not None:
            parts += [self.scale, "-".join(self.colours)]
        return " / ".join(parts)


BASE_PATTERNS = len(SHAPES) * len(TEXTURES)


@functools.cache
def pattern_table() -> tuple[Pattern, ...]:
    """All patterns in a fixed order: the 48 base patterns, then the base table again for each
    (scale, colour pair) in turn.

    Consecutive base patterns differ in shape first, then texture, so the first ten classes reuse
    shapes and textures across classes: neither cue alone identifies a class.
    """
    base = []
    for shift in range(len(TEXTURES)):
        for shape_index, shape in enumerate(SHAPES):
            base.append(Pattern(shape, TEXTURES[(shape_index + shift) % len(TEXTURES)]))
    extended = [Pattern(p.shape, p.texture, scale, colours)
                for scale in ("fine", "coarse")
                for colours in itertools.combinations(COLOURS, 2)
                for p in base]
    return tuple(base + extended)


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


def _polygon_mask(polygon: np.ndarray, dims: tuple[int, int]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a polygon, rendered at 2x and box-filtered."""
    width, height = dims
    canvas = Image.new("L", (2 * width, 2 * height), 0)
    # PIL addresses pixel centres by integer coordinates: continuous u maps to 2u - 0.5.
    points = [(2 * x - 0.5, 2 * y - 0.5) for x, y in polygon]
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    coverage = canvas.resize((width, height), Image.Resampling.BOX)
    return np.asarray(coverage, dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=4)
def _pixel_centres(dims: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) float32 (H, W): the coordinates of the pixel centres (shared, read-only)."""
    width, height = dims
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


def _texture(texture: str, dims: tuple[int, int], cx: float, cy: float, period: float,
             phase: float, box: tuple[int, int, int, int]) -> np.ndarray:
    """Binary-ish texture in [0, 1] inside `box` (x0, y0, x1, y1), anchored at the object centre and
    normalised over the whole image."""
    ys, xs = _pixel_centres(dims)
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
    x0, y0, x1, y1 = box
    # Contiguous, so that numpy's vectorised exp gives the values it gives on the whole image.
    inside = np.ascontiguousarray(wave[y0:y1, x0:x1])
    # A steep sigmoid instead of a hard threshold keeps edges smooth after JPEG.
    return 1.0 / (1.0 + np.exp(-6.0 * inside / (np.abs(wave).max() + 1e-6)))


def _random_colour_pair(rng: np.random.Generator, min_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    while True:
        first, second = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
        if np.abs(first - second).mean() >= min_contrast:
            return first, second


def _fixed_colour_pair(rng: np.random.Generator, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    first, second = (np.array(COLOURS[name], np.float64) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
                     for name in names)
    # Which colour fills the stripes (dots, checks) is random: a pair is unordered.
    return (first, second) if rng.random() < 0.5 else (second, first)


def _background(rng: np.random.Generator, dims: tuple[int, int], noise_std: float,
                clutter_lines: tuple[int, int] = (3, 7)) -> np.ndarray:
    """A smooth random colour field plus clutter strokes and pixel noise, float32 (H, W, 3)."""
    coarse = rng.uniform(30, 225, size=(4, 4, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize(dims, Image.Resampling.BICUBIC), np.float32)
    clutter = Image.new("RGB", dims, (0, 0, 0))
    clutter_alpha = Image.new("L", dims, 0)
    draw, draw_alpha = ImageDraw.Draw(clutter), ImageDraw.Draw(clutter_alpha)
    for _ in range(int(rng.integers(clutter_lines[0], clutter_lines[1] + 1))):
        # An array bound draws the same numbers as the scalar one when the sides are equal.
        x0, y0, x1, y1 = rng.uniform(0, np.array(dims * 2))
        colour = tuple(int(c) for c in rng.uniform(0, 255, size=3))
        stroke = int(rng.integers(1, max(2, min(dims) // 32) + 1))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=stroke)
        draw_alpha.line([(x0, y0), (x1, y1)], fill=int(rng.uniform(90, 200)), width=stroke)
    alpha = np.asarray(clutter_alpha, np.float32)[..., None] / 255.0
    field = field * (1 - alpha) + np.asarray(clutter, np.float32) * alpha
    return field + rng.normal(0.0, noise_std, size=field.shape).astype(np.float32)


def _paint_object(canvas: np.ndarray, rng: np.random.Generator, pattern: Pattern,
                  cx: float, cy: float, radius: float, angle: float, min_contrast: float = 70.0) -> np.ndarray:
    """Composite one object of `pattern` onto the canvas in place; returns its polygon."""
    dims = (canvas.shape[1], canvas.shape[0])
    polygon = shape_polygon(pattern.shape, cx, cy, radius, angle)
    mask = _polygon_mask(polygon, dims)
    # Pixels outside the object's bounding box keep their value (coverage 0): painting only the
    # box saves most of the work on a large image.
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x0, y0, x1, y1 = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) if rows.size else (0, 0, 0, 0)
    period = max(3.0, radius * rng.uniform(*TEXTURE_SCALES[pattern.scale]))
    texture = _texture(pattern.texture, dims, cx, cy, period, rng.uniform(0, 2 * math.pi),
                       (x0, y0, x1, y1))[..., None]
    if pattern.colours is None:
        first, second = _random_colour_pair(rng, min_contrast=min_contrast)
    else:
        first, second = _fixed_colour_pair(rng, pattern.colours)
    painted = texture * first + (1 - texture) * second
    coverage = mask[y0:y1, x0:x1, None]
    region = canvas[y0:y1, x0:x1]
    region *= 1 - coverage
    region += coverage * painted
    return polygon


def _jpeg_bytes(canvas: np.ndarray) -> bytes:
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def _similar_distractor(rng: np.random.Generator, pattern: Pattern) -> Pattern:
    """A pattern sharing the shape or the texture of `pattern` (and its scale and colours), but not both."""
    if rng.random() < 0.5:
        others = [t for t in TEXTURES if t != pattern.texture]
        return pattern._replace(texture=others[int(rng.integers(len(others)))])
    others = [s for s in SHAPES if s != pattern.shape]
    return pattern._replace(shape=others[int(rng.integers(len(others)))])


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
    canvas = _background(rng, dims, rng.uniform(*style["noise_std"]), style["clutter_lines"])
    min_contrast = style["min_contrast"]

    # Distractors first (smaller, may be overlapped by the main object).
    low, high = style["distractors"]
    for _ in range(int(rng.integers(low, high + 1))):
        if rng.random() < style["similar_distractor_share"]:
            distractor = _similar_distractor(rng, pattern)
        else:
            distractor = pattern_table()[int(rng.integers(BASE_PATTERNS))]
        radius = short * rng.uniform(*style["distractor_radius"])
        cx, cy = rng.uniform(radius, np.array(dims) - radius)
        _paint_object(canvas, rng, distractor, cx, cy, radius, rng.uniform(-0.3, 0.3), min_contrast)

    radius = short * rng.uniform(*style["object_radius"])
    margin = 0.8 * radius
    cx, cy = rng.uniform(margin, np.array(dims) - margin)
    _paint_object(canvas, rng, pattern, cx, cy, radius, rng.uniform(-0.26, 0.26), min_contrast)
    return _jpeg_bytes(canvas)


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
    canvas = _background(rng, dims, noise_std=rng.uniform(8, 20))
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
        polygon = _paint_object(canvas, rng, categories[category_index], *centre, radius, rng.uniform(-0.26, 0.26))
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
        distractor = _similar_distractor(rng, categories[int(rng.integers(num_categories))])
        if distractor in patterns:
            continue
        radius = float(np.exp(rng.uniform(np.log(min_radius), np.log(max_radius * 0.8))))
        centre = _place(rng, dims, radius, placed)
        if centre is None:
            continue
        placed.append((*centre, radius))
        _paint_object(canvas, rng, distractor, *centre, radius, rng.uniform(-0.26, 0.26))
    return _jpeg_bytes(canvas), objects


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
