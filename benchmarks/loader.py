"""How fast one core prepares training images: our loader against torchvision's reference recipe.

`benchmark_loader` writes full-size JPEGs of ImageNet's typical shape (500x375, quality 90, a
smooth photo-like field with textured patches and sensor-like noise, ~90 KB each) into a
temporary folder, then runs each pipeline over all of them, in the same process on one thread
(torch.set_num_threads(1); PIL and libjpeg-turbo decode on one thread anyway), rounds
interleaved so that machine-load drift hits every pipeline alike:

- reference: torchvision's recipe: PIL open + convert("RGB"), RandomResizedCrop(224),
  RandomHorizontalFlip, ToTensor, Normalize (float32 samples);
- ours_torchvision / ours_pil: what a loader worker of ours does (TrainTransform's decode, then
  crop + flip to a uint8 sample) with decoder "torchvision" (the default) or "pil".

Every pipeline also collates its samples into batches of `batch` (shared-memory batches are
what a worker hands over). The normalisation of ours runs on the training device
(`to_model_input`); its CPU cost per image is reported on its own, for CPU training.

Images per core = images / CPU seconds of the measuring thread (time.thread_time): the time a
loaded machine takes the core away is not counted; wall-clock images/s are reported beside it.

JSON (`sge-repro bench loader --json`):
{"image_size": int, "images": int, "rounds": int, "batch": int, "threads": 1,
 "source": {"width": 500, "height": 375, "quality": 90, "mean_kb": float},
 "machine": {"cpu": str, "cores": int, "load_average_before": [3 floats], "load_average_after": [3 floats]},
 "pipelines": {NAME: {"description": str, "images_per_core_s": float, "images_per_s": float,
                      "cpu_ms_per_image": [float per round], "wall_ms_per_image": [float per round]}},
 "speedup_per_core": float,          # ours_torchvision / reference, images per core-second
 "speedup_per_core_pil": float,      # ours_pil / reference
 "to_model_input_cpu_ms_per_image": float}
with NAME in ("reference", "ours_torchvision", "ours_pil"); figures are medians over rounds.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms as T

from sge_repro.classification.transforms import (DEFAULT_MIN_SCALE, IMAGENET_MEAN, IMAGENET_STD, TrainTransform,
                                                 to_model_input)
from sge_repro.errors import UserError
from sge_repro.provenance import cpu_model

SOURCE_WIDTH, SOURCE_HEIGHT, SOURCE_QUALITY = 500, 375, 90
PIPELINES = ("reference", "ours_torchvision", "ours_pil")
_DESCRIPTIONS = {
    "reference": "torchvision recipe: PIL open+convert, RandomResizedCrop, RandomHorizontalFlip, ToTensor, "
                 "Normalize (float32)",
    "ours_torchvision": "ours, decoder torchvision: decode_jpeg, tensor crop/resize + flip (uint8)",
    "ours_pil": "ours, decoder pil: PIL decode, crop/resize + flip (uint8)",
}


def photo_like_image(rng: np.random.Generator, width: int = SOURCE_WIDTH, height: int = SOURCE_HEIGHT) -> np.ndarray:
    """An RGB uint8 array that compresses like a photo: smooth colour fields, textured patches
    (edges and detail), sensor-like noise. At 500x375, quality 90: ~80-105 KB."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        field = np.full((height, width), rng.uniform(60, 190), np.float32)
        for _ in range(6):
            fx, fy = rng.uniform(-1, 1) / rng.uniform(40, 300), rng.uniform(-1, 1) / rng.uniform(40, 300)
            field += rng.uniform(10, 40) * np.sin(2 * np.pi * (x * fx + y * fy) + rng.uniform(0, 2 * np.pi))
        image[..., channel] = field
    for _ in range(rng.integers(8, 16)):
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
        angle, period = rng.uniform(0, 2 * np.pi), rng.uniform(2.5, 12)
        texture = 40 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
        image[inside] += texture[inside, None] + rng.uniform(-60, 60, 3).astype(np.float32)
    image += rng.normal(0, rng.uniform(10, 16), image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"{index:05d}.JPEG"
        Image.fromarray(photo_like_image(rng)).save(path, quality=SOURCE_QUALITY)
        paths.append(path)
    return paths


def _pipelines(image_size: int) -> dict[str, Callable[[Path], torch.Tensor]]:
    reference = T.Compose([T.RandomResizedCrop(image_size, scale=(DEFAULT_MIN_SCALE, 1.0), antialias=True),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ours = {decoder: TrainTransform(image_size, DEFAULT_MIN_SCALE, decoder=decoder) for decoder in ("torchvision", "pil")}
    return {
        "reference": lambda path: reference(Image.open(path).convert("RGB")),
        "ours_torchvision": lambda path: ours["torchvision"](ours["torchvision"].decode(path)),
        "ours_pil": lambda path: ours["pil"](ours["pil"].decode(path)),
    }


def _run(pipeline: Callable[[Path], torch.Tensor], paths: list[Path], batch: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per image of one pass: every image seeded by its index, batches collated."""
    cpu_start, wall_start = time.thread_time(), time.perf_counter()
    samples = []
    for index, path in enumerate(paths):
        torch.manual_seed(index)
        samples.append((pipeline(path), 0))
        if len(samples) == batch:
            default_collate(samples)
            samples = []
    if samples:
        default_collate(samples)
    cpu, wall = time.thread_time() - cpu_start, time.perf_counter() - wall_start
    return cpu * 1e3 / len(paths), wall * 1e3 / len(paths)


def benchmark_loader(images: int = 256, image_size: int = 224, rounds: int = 5, batch: int = 32,
                     seed: int = 0, workdir: str | os.PathLike | None = None) -> dict:
    """Images per core-second of each pipeline on `images` generated JPEGs (see module docstring)."""
    if images < 1 or rounds < 1 or batch < 1:
        raise UserError(f"bench loader: images={images}, rounds={rounds}, batch={batch}; expected positive integers")
    if image_size < 16:
        raise UserError(f"bench loader: image_size={image_size}, expected at least 16")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    state = torch.get_rng_state()
    try:
        with tempfile.TemporaryDirectory(prefix="sge-repro-bench-loader-", dir=workdir) as folder:
            paths = write_jpegs(Path(folder), images, seed)
            mean_kb = statistics.fmean(path.stat().st_size for path in paths) / 1e3
            load_before = list(os.getloadavg())
            pipelines = _pipelines(image_size)
            for name in PIPELINES:  # warm-up: imports, allocator, page cache
                _run(pipelines[name], paths[: min(len(paths), batch)], batch)
            cpu_ms: dict[str, list[float]] = {name: [] for name in PIPELINES}
            wall_ms: dict[str, list[float]] = {name: [] for name in PIPELINES}
            for round_index in range(rounds):
                order = PIPELINES[round_index % 3:] + PIPELINES[:round_index % 3]  # rotate who goes first
                for name in order:
                    cpu, wall = _run(pipelines[name], paths, batch)
                    cpu_ms[name].append(cpu)
                    wall_ms[name].append(wall)
            normalise_ms = _to_model_input_cpu_ms(image_size, batch, rounds)
            load_after = list(os.getloadavg())
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(state)

    results = {name: {"description": _DESCRIPTIONS[name],
                      "images_per_core_s": 1e3 / statistics.median(cpu_ms[name]),
                      "images_per_s": 1e3 / statistics.median(wall_ms[name]),
                      "cpu_ms_per_image": cpu_ms[name], "wall_ms_per_image": wall_ms[name]} for name in PIPELINES}
    reference = results["reference"]["images_per_core_s"]
    return {
        "image_size": image_size, "images": images, "rounds": rounds, "batch": batch, "threads": 1,
        "source": {"width": SOURCE_WIDTH, "height": SOURCE_HEIGHT, "quality": SOURCE_QUALITY, "mean_kb": mean_kb},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count() or 1, "load_average_before": load_before,
                    "load_average_after": load_after},
        "pipelines": results,
        "speedup_per_core": results["ours_torchvision"]["images_per_core_s"] / reference,
        "speedup_per_core_pil": results["ours_pil"]["images_per_core_s"] / reference,
        "to_model_input_cpu_ms_per_image": normalise_ms,
    }


def _to_model_input_cpu_ms(image_size: int, batch: int, rounds: int) -> float:
    """CPU ms per image of the device-side step when the device is the CPU (one thread)."""
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
    cpu = torch.device("cpu")
    to_model_input(images, cpu)
    samples = []
    for _ in range(rounds):
        start = time.thread_time()
        to_model_input(images, cpu)
        samples.append((time.thread_time() - start) * 1e3 / batch)
    return statistics.median(samples)
