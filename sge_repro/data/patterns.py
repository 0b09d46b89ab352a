"""The patterns of the embedded data sets and how one object is painted (sge_repro.data.synthetic
draws the images): 8 shapes x 6 textures, extended by texture scale and fixed colour pairs to
1008 patterns (see synthetic's docstring), a noisy cluttered background, JPEG bytes."""

from __future__ import annotations

import functools
import io
import itertools
import math
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

JPEG_QUALITY = 90
SHAPES = ("circle", "triangle", "square", "diamond", "star", "cross", "tee", "ell")
TEXTURES = ("hstripes", "vstripes", "dstripes", "checker", "dots", "rings")
# Stripe period as a fraction of the object radius; base patterns are medium.
TEXTURE_SCALES = {"medium": (0.35, 0.55), "fine": (0.17, 0.25), "coarse": (0.8, 1.1)}
COLOURS = {"white": (245, 245, 245), "black": (15, 15, 15), "red": (225, 35, 35), "green": (35, 190, 70),
           "blue": (40, 80, 230)}
COLOUR_JITTER = 20.0  # per channel, so a fixed colour pair still varies a little between objects

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


def background(rng: np.random.Generator, dims: tuple[int, int], noise_std: float,
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


def paint_object(canvas: np.ndarray, rng: np.random.Generator, pattern: Pattern,
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


def jpeg_bytes(canvas: np.ndarray) -> bytes:
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def similar_distractor(rng: np.random.Generator, pattern: Pattern) -> Pattern:
    """A pattern sharing the shape or the texture of `pattern` (and its scale and colours), but not both."""
    if rng.random() < 0.5:
        others = [t for t in TEXTURES if t != pattern.texture]
        return pattern._replace(texture=others[int(rng.integers(len(others)))])
    others = [s for s in SHAPES if s != pattern.shape]
    return pattern._replace(shape=others[int(rng.integers(len(others)))])
