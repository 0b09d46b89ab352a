"""What the datasets cost the pipeline at ImageNet / COCO scale: `sge-repro bench data`.

1. Builds trees of the real shapes outside the project: ImageNet (1000 class folders,
   1,281,167 train + 50,000 val files) and COCO 2017 (118,287 train + 5,000 val images and
   their instances JSON, one box per image), times `scale`. The files are HARD LINKS to a
   handful of tiny valid JPEGs: the scan, status and no-op figures depend on file counts, not
   contents; the first indexing then decodes 1.33M tiny files, which says nothing about real
   decode speed (measured separately on full-size JPEGs, item 5).
2. Runs the smoke pipeline once in a copy of the project (tiny models, real DVC), points
   data.*.source_path at the big trees, runs the data stage (the first indexing) and records the
   stages after it with `dvc commit` (their outputs are the smoke run's: training on the big
   trees is not what is measured; `dvc commit` stores the current dependency hashes, as after a
   real run).
3. Times `sge-repro status` and a no-op `sge-repro run all` (median of `repeats`).
4. Times the data stage's rescan alone (in this process: scan + cache lookup + manifest build).
5. Verification speed: decodes `verify_images` generated full-size JPEGs (500x375, quality 90,
   ImageNet's typical size) with 1 process and with every core: images/s per core.

Schema of the result (JSON):
  {"machine": {"cpu", "cores", "load_before", "load_after"},
   "scale", "files": {"imagenet_train", "imagenet_val", "coco_train", "coco_val"},
   "build_s", "smoke_run_s", "first_index_s", "first_index_images_per_s",
   "status_s": [..], "noop_run_s": [..], "status_median_s", "noop_run_median_s",
   "rescan_s": [..], "rescan_median_s", "manifest_bytes": {"cls", "det"},
   "verify": {"images", "width", "height", "quality", "one_core_s", "one_core_images_per_s",
              "all_cores", "all_cores_s", "all_cores_images_per_s"},
   "targets": {"status_s": 10, "noop_run_s": 10}}
"""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from sge_repro.data.prepare import prepare_data
from sge_repro.data.verify import VerifyCache, available_cpus, scan, verify
from sge_repro.errors import UserError
from sge_repro.params_yaml import load_params
from sge_repro.paths import ProjectPaths
from sge_repro.provenance import cpu_model

IMAGENET = {"classes": 1000, "train": 1_281_167, "val": 50_000}
COCO = {"train": 118_287, "val": 5_000}
TARGET_S = 10.0
SEED_FILES = 64   # ext4 allows 65,000 links per inode: 1.33M files need more than 20 seeds


def _tiny_jpegs(folder: Path, count: int = SEED_FILES) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"seed{index}.jpg"
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _link_many(seeds: list[Path], folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        os.link(seeds[index % len(seeds)], folder / name)


def build_imagenet_shape(root: Path, scale: float) -> dict:
    seeds = _tiny_jpegs(root / ".seeds")
    counts = {}
    for split in ("train", "val"):
        total = max(IMAGENET["classes"], round(IMAGENET[split] * scale))
        base, extra = divmod(total, IMAGENET["classes"])
        for k in range(IMAGENET["classes"]):
            wnid = f"n{k:08d}"
            number = base + (1 if k < extra else 0)
            _link_many(seeds, root / split / wnid, [f"{wnid}_{i}.JPEG" for i in range(number)])
        counts[split] = total
    return counts


def build_coco_shape(root: Path, scale: float) -> dict:
    seeds = _tiny_jpegs(root / ".seeds")
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        total = max(1, round(COCO[split] * scale))
        names = [f"{i:012d}.jpg" for i in range(1, total + 1)]
        _link_many(seeds, root / f"{split}2017", names)
        document = {
            "images": [{"id": i, "file_name": name, "width": 32, "height": 24} for i, name in enumerate(names, 1)],
            "annotations": [{"id": i, "image_id": i, "category_id": 1 + i % 80, "bbox": [2.0, 2.0, 10.0, 8.0],
                             "area": 80.0, "iscrowd": 0} for i in range(1, total + 1)],
            "categories": [{"id": c, "name": f"category{c}"} for c in range(1, 81)],
        }
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(document), encoding="utf-8")
        counts[split] = total
    return counts


def full_size_jpegs(folder: Path, count: int, width: int = 500, height: int = 375, quality: int = 90) -> list[Path]:
    """ImageNet-like JPEGs: a smooth random colour field with detail and noise (not flat, so the
    entropy decoder has work like on photos)."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
        field += rng.normal(0, 18, field.shape).astype(np.float32)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        path = folder / f"photo{index:05d}.JPEG"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def _timed(command: list[str], cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise UserError(f"bench data: `{' '.join(command)}` failed (exit {result.returncode}): "
                        f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    return elapsed


def _copy_project(repo: Path, destination: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=repo, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = repo / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)


def benchmark_data(work: Path, scale: float = 1.0, repeats: int = 3, verify_images: int = 300,
                   repo: Path | None = None, log=print) -> dict:
    """See the module docstring; `work` (an empty or missing folder) holds the trees and the project."""
    if not 0 < scale <= 1:
        raise UserError(f"scale={scale}: expected 0 < scale <= 1")
    if repeats < 1 or verify_images < 1:
        raise UserError("repeats and verify_images: expected at least 1")
    work = Path(work).resolve()
    if work.exists() and any(work.iterdir()):
        raise UserError(f"{work}: not empty; expected a new folder for the benchmark's trees and project")
    repo = Path(repo or Path(__file__).resolve().parents[1])
    bin_dir = Path(sys.executable).parent
    # the trees are read in place, so their verification cache goes to the user cache: this run's own
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "SGE_REPRO_CACHE": str(work / "user-cache")}
    sge_repro = [str(bin_dir / "sge-repro")]
    result: dict = {"machine": {"cpu": cpu_model(), "cores": available_cpus(), "load_before": os.getloadavg()[0]},
                    "scale": scale, "targets": {"status_s": TARGET_S, "noop_run_s": TARGET_S}}

    started = time.perf_counter()
    log("building the ImageNet- and COCO-shaped trees (hard links)")
    imagenet = build_imagenet_shape(work / "imagenet", scale)
    coco = build_coco_shape(work / "coco", scale)
    result["build_s"] = time.perf_counter() - started
    result["files"] = {"imagenet_train": imagenet["train"], "imagenet_val": imagenet["val"],
                       "coco_train": coco["train"], "coco_val": coco["val"]}

    project = work / "project"
    _copy_project(repo, project)
    log("smoke pipeline in a copy of the project")
    result["smoke_run_s"] = _timed([*sge_repro, "run", "all", "--profile", "smoke", "--no-report"], project, env)

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["classification"].update(source="imagenet", source_path=str(work / "imagenet"),
                                            num_classes=IMAGENET["classes"])
    params["data"]["detection"].update(source="coco", source_path=str(work / "coco"))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log("first indexing of the big trees (decodes every file once)")
    result["first_index_s"] = _timed(["dvc", "repro", "data"], project, env)
    total = sum(result["files"].values())
    result["first_index_images_per_s"] = total / result["first_index_s"]
    # the stages after data: record their dependencies as they now are (outputs from the smoke run)
    _timed(["dvc", "commit", "--force"], project, env)

    result["status_s"], result["noop_run_s"] = [], []
    for round_ in range(repeats):
        log(f"round {round_ + 1}/{repeats}: status, no-op run all")
        result["status_s"].append(_timed([*sge_repro, "status"], project, env))
        result["noop_run_s"].append(_timed([*sge_repro, "run", "all", "--no-report"], project, env))
    stale = subprocess.run(["dvc", "status", "--json"], cwd=project, env=env, capture_output=True, text=True).stdout
    if json.loads(stale or "{}") != {"data": ["always changed"]}:
        raise UserError(f"bench data: the no-op runs left stages stale: {stale.strip()[:200]}")
    result["status_median_s"] = statistics.median(result["status_s"])
    result["noop_run_median_s"] = statistics.median(result["noop_run_s"])

    paths = ProjectPaths(project)
    loaded = load_params(project / "params.yaml")
    result["rescan_s"] = []
    saved_cache_dir = os.environ.get("SGE_REPRO_CACHE")
    os.environ["SGE_REPRO_CACHE"] = env["SGE_REPRO_CACHE"]  # the cache the subprocesses filled
    try:
        for _ in range(repeats):
            begin = time.perf_counter()
            summary = prepare_data(loaded.data, paths)
            result["rescan_s"].append(time.perf_counter() - begin)
            if summary["classification"]["decoded"] or summary["detection"]["decoded"]:
                raise UserError("bench data: the rescan decoded files; expected none to have changed")
    finally:
        if saved_cache_dir is None:
            del os.environ["SGE_REPRO_CACHE"]
        else:
            os.environ["SGE_REPRO_CACHE"] = saved_cache_dir
    result["rescan_median_s"] = statistics.median(result["rescan_s"])
    result["manifest_bytes"] = {name: paths.manifest(name).stat().st_size for name in ("cls", "det")}

    log(f"verification speed on {verify_images} full-size JPEGs")
    photos = full_size_jpegs(work / "photos" / "all", verify_images)
    folders = {"all": None}
    verify_result = {"images": verify_images, "width": 500, "height": 375, "quality": 90,
                     "all_cores": available_cpus()}
    for key, workers in (("one_core", 1), ("all_cores", available_cpus())):
        cache = VerifyCache(work / "photos" / f".cache-{key}.json", work / "photos")
        begin = time.perf_counter()
        _, decoded = verify(work / "photos", scan(work / "photos", folders, (".jpeg",)), cache, workers=workers)
        elapsed = time.perf_counter() - begin
        assert decoded == len(photos)
        verify_result[f"{key}_s"] = elapsed
        verify_result[f"{key}_images_per_s"] = decoded / elapsed
    result["verify"] = verify_result
    result["machine"]["load_after"] = os.getloadavg()[0]
    return result
