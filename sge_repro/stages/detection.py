"""The convert, train_det and eval_det stages."""

from __future__ import annotations

import time

from sge_repro.atomic import write_json
from sge_repro.errors import UserError
from sge_repro.params import Params
from sge_repro.paths import ProjectPaths
from sge_repro.stages.runtime import use_cpu_threads


def convert(params: Params, paths: ProjectPaths, model: str, seed: int) -> dict:
    """A trained classifier's checkpoint -> detectron2 weights in runs/convert/."""
    from sge_repro.detection.convert import convert_classifier_to_detectron2

    params.require_listed("detection_backbones", model)
    params.require_listed("seeds", seed)
    use_cpu_threads(params)
    return convert_classifier_to_detectron2(
        paths.cls_checkpoint(model, seed, params.convert.checkpoint), paths.det_weights(model, seed),
        model_name=model)


def detection_dataset(paths: ProjectPaths):
    """The detection set as the data stage indexed it (data/manifests/det.json): its root and
    layout, its corrupt images left out; the annotation files must be the ones it checked."""
    from sge_repro.data.manifest import check_annotation_files, manifest_root, read_manifest
    from sge_repro.detection.setup import DetectionDataset

    manifest = read_manifest(paths.det_manifest, "detection")
    root = manifest_root(manifest)
    check_annotation_files(manifest)
    exclude = frozenset(str(root / item["file"]) for item in manifest["corrupt"])
    if manifest["source"] == "coco":
        return DetectionDataset("coco", str(root), manifest["layout"], "paper", verified=True, exclude=exclude)
    return DetectionDataset("embedded", str(root), manifest["layout"], "embedded", verified=True, exclude=exclude)


def detector_config(params: Params, paths: ProjectPaths, detector: str, backbone: str, seed: int, device: str):
    """(cfg, dataset kind, val dataset name) of one train_det / eval_det run."""
    from sge_repro.detection.setup import run_config

    params.require_listed("detectors", detector)
    params.require_listed("detection_backbones", backbone)
    params.require_listed("seeds", seed)
    use_cpu_threads(params)
    dataset = detection_dataset(paths)
    cfg, val_name = run_config(
        detector, backbone, seed, dataset, params.train_det, weights=paths.det_weights(backbone, seed),
        run_dir=paths.det_run_dir(detector, backbone, seed), device=device, sge_impl=params.model.sge_impl)
    return cfg, dataset.kind, val_name


def train_det(params: Params, paths: ProjectPaths, detector: str, backbone: str, seed: int) -> dict:
    """Train one detector from the converted classifier; resumes. Returns a summary for printing."""
    from sge_repro.detection.engine import train_detector

    cfg, kind, _ = detector_config(params, paths, detector, backbone, seed, params.train_det.device)
    started = time.perf_counter()
    final = train_detector(cfg, resume=True)
    return {
        "weights": str(final),
        "iterations": int(cfg.SOLVER.MAX_ITER),
        "dataset": kind,
        "seconds": round(time.perf_counter() - started, 1),
    }


def eval_det(params: Params, paths: ProjectPaths, detector: str, backbone: str, seed: int) -> dict:
    """COCO AP of the trained detector on the val split; writes metrics/eval_det/<run>.json."""
    from sge_repro.detection.engine import FINAL_WEIGHTS, evaluate_detector

    cfg, kind, val_name = detector_config(params, paths, detector, backbone, seed, params.eval_det.device)
    run_dir = paths.det_run_dir(detector, backbone, seed)
    weights = run_dir / FINAL_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights}: no trained detector; run `sge-repro train det --detector {detector} "
                        f"--backbone {backbone} --seed {seed}` first")
    started = time.perf_counter()
    # predictions go to a temp folder: the run folder is train_det's output and must not change here
    result = evaluate_detector(cfg, weights, val_name)
    if result is None:  # a non-main process of a distributed evaluation
        return {}
    metrics = {
        "detector": detector,
        "backbone": backbone,
        "seed": seed,
        "dataset": kind,
        "bbox": result["bbox"],
        **({"segm": result["segm"]} if "segm" in result else {}),
        "flags": {
            "no_detections": result["no_detections"],
            "nan_reported_as_zero": result["nan_metrics"],
        },
        "per_category": result["per_category"],
        "num_detections": result["num_detections"],
        "num_images": result["num_images"],
        "weights": str(weights),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(paths.det_metrics(detector, backbone, seed), metrics)
    return metrics
