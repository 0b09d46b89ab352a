"""The convert, train_<detector> and eval_<detector> stages."""

from __future__ import annotations

import json
import time

from sge_repro.atomic import write_json
from sge_repro.data.download import file_digest
from sge_repro.data.manifest import check_annotation_files, manifest_root, read_manifest
from sge_repro.detection.checkpoint import evaluation_fingerprint
from sge_repro.detection.convert import convert_classifier_to_detectron2
from sge_repro.detection.engine import FINAL_WEIGHTS, evaluate_detector, train_detector
from sge_repro.detection.setup import DetectionDataset, run_config, schedule_overrides
from sge_repro.errors import UserError
from sge_repro.launch import launch
from sge_repro.models.registry import parse_model_name
from sge_repro.models.torchvision_weights import fetch_torchvision_weights
from sge_repro.params import CONVERT_STAGES, Params
from sge_repro.paths import ProjectPaths
from sge_repro.stage_status import stage_name, tracking
from sge_repro.stages.runtime import use_cpu_threads


def convert(params: Params, paths: ProjectPaths, model: str, seed: int) -> dict:
    """The backbone's ImageNet weights -> detectron2 weights in runs/convert/. They come from our
    trained classifier of this seed, a given file, or torchvision's weights: the convert list that
    names the backbone says which."""
    source = params.convert_source(model)
    params.require_listed("seeds", seed)
    use_cpu_threads(params)
    if source == "trained":
        checkpoint = paths.cls_checkpoint(model, seed, params.convert.checkpoint)
    else:
        checkpoint = paths.given_weights(model, source)
        if not checkpoint.is_file():
            stage = "fetch_weights" if source == "torchvision" else "copy_weights"
            raise UserError(f"{checkpoint}: not found (run the {stage}@{model} stage first)")
    stage = stage_name(CONVERT_STAGES[source], model, seed)
    with tracking(paths.stage_status(stage), stage):  # the wall time, for the report's provenance
        return convert_classifier_to_detectron2(checkpoint, paths.det_weights(model, seed), model_name=model,
                                                backbone_source=source)


def fetch_weights(params: Params, paths: ProjectPaths, model: str) -> dict:
    """torchvision's ImageNet weights of `model`, checksum-verified, into runs/pretrained/."""
    if model not in params.convert.torchvision:
        raise UserError(f"params.yaml: convert.torchvision: {model!r} is not listed (listed: "
                        f"{', '.join(params.convert.torchvision) or 'none'})")
    pinned = params.torchvision_weights(model)
    path = fetch_torchvision_weights(pinned.url, pinned.sha256, paths.given_weights(model, "torchvision"))
    return {"model": model, "url": pinned.url, "sha256": pinned.sha256, "weights": str(path)}


def detection_dataset(paths: ProjectPaths):
    """The detection set as the data stage indexed it (data/manifests/det.json): its root and
    layout, its corrupt images left out; the annotation files must be the ones it checked."""
    manifest = read_manifest(paths.det_manifest, "detection")
    root = manifest_root(manifest)
    check_annotation_files(manifest)
    exclude = frozenset(str(root / item["file"]) for item in manifest["corrupt"])
    if manifest["source"] == "coco":
        return DetectionDataset("coco", str(root), manifest["layout"], "paper", verified=True, exclude=exclude)
    return DetectionDataset("embedded", str(root), manifest["layout"], "embedded", verified=True, exclude=exclude)


def detector_config(params: Params, paths: ProjectPaths, detector: str, backbone: str, seed: int, device: str):
    """(cfg, dataset kind, val dataset name) of one train_det / eval_det run."""
    params.require_pair(detector, backbone)
    params.require_listed("seeds", seed)
    use_cpu_threads(params)
    dataset = detection_dataset(paths)
    train = params.train_det
    overrides = schedule_overrides(
        detector, dataset.config_set, train.max_iter, train.ims_per_batch, train.base_lr, train.warmup_iters,
        train.min_size, train.max_size, train.checkpoint_period, train.workers, protocol=train.protocol,
        deterministic=train.deterministic)
    cfg, val_name = run_config(
        detector, backbone, seed, dataset, overrides, train.protocol, weights=paths.det_weights(backbone, seed),
        run_dir=paths.det_run_dir(detector, backbone, seed), device=device, sge_impl=params.model.sge_impl,
        sge_variant=params.model.sge_variant())
    return cfg, dataset.kind, val_name


def train_det(params: Params, paths: ProjectPaths, detector: str, backbone: str, seed: int) -> dict:
    """Train one detector from the converted classifier; resumes. Returns a summary for printing.

    Runs on the processes params.launch asks for (sge_repro.launch)."""
    params.require_pair(detector, backbone)
    params.require_listed("seeds", seed)
    name = stage_name(f"train_{detector}", backbone, seed)
    return launch(train_det_worker, (params, paths, detector, backbone, seed), params.launch, name=name,
                  state_dir=paths.launch_state_dir(name))


def train_det_worker(params: Params, paths: ProjectPaths, detector: str, backbone: str, seed: int) -> dict:
    """One process of train_det (all of it, when it runs alone)."""
    cfg, kind, _ = detector_config(params, paths, detector, backbone, seed, params.train_det.device)
    started = time.perf_counter()
    stage = stage_name(f"train_{detector}", backbone, seed)
    with tracking(paths.stage_status(stage), stage) as status:  # logs/progress/<stage>.json (rank 0 writes)
        final = train_detector(cfg, resume=True, keep_checkpoints=params.train_det.keep_checkpoints, status=status)
    return {
        "weights": str(final),
        "protocol": params.train_det.protocol,
        "iterations": int(cfg.SOLVER.MAX_ITER),
        "dataset": kind,
        "seconds": round(time.perf_counter() - started, 1),
    }


def eval_det(params: Params, paths: ProjectPaths, detector: str, backbone: str, seed: int) -> dict:
    """COCO AP of the trained detector on the val split; writes metrics/eval_det/<run>.json."""
    cfg, kind, val_name = detector_config(params, paths, detector, backbone, seed, params.eval_det.device)
    run_dir = paths.det_run_dir(detector, backbone, seed)
    weights = run_dir / FINAL_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights}: no trained detector; run `sge-repro train det --detector {detector} "
                        f"--backbone {backbone} --seed {seed}` first")
    inputs = evaluation_inputs(params, paths, cfg, backbone, weights)
    previous = _read_previous_metrics(paths.det_metrics(detector, backbone, seed))
    if previous.get("inputs") == inputs:
        # DVC reruns every eval_det when any `model` key changes (a G sweep), plain backbones too:
        # the same weights evaluated with the same settings give the same numbers, so keep them
        return previous
    started = time.perf_counter()
    # predictions go to a temp folder: the run folder is train_det's output and must not change here
    stage = stage_name(f"eval_{detector}", backbone, seed)
    with tracking(paths.stage_status(stage), stage) as status:  # logs/progress/<stage>.json
        result = evaluate_detector(cfg, weights, val_name, status=status)
    if result is None:  # a non-main process of a distributed evaluation
        return {}
    metrics = {
        "detector": detector,
        "backbone": backbone,
        "seed": seed,
        "dataset": kind,
        # how the detector was trained: the protocol's YAML and where its backbone weights came from
        "engine": "detectron2",
        "protocol": params.train_det.protocol,
        "backbone_weights": params.convert_source(backbone),
        "bbox": result["bbox"],
        **({"segm": result["segm"]} if "segm" in result else {}),
        "flags": {
            "no_detections": result["no_detections"],
            "nan_reported_as_zero": result["nan_metrics"],
        },
        "per_category": result["per_category"],
        "num_detections": result["num_detections"],
        "num_images": result["num_images"],
        **({"skipped_images": result["skipped_images"]} if result["skipped_images"] else {}),
        "weights": str(weights),
        "inputs": inputs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(paths.det_metrics(detector, backbone, seed), metrics)
    return metrics


def evaluation_inputs(params: Params, paths: ProjectPaths, cfg, backbone: str, weights) -> dict:
    """What one eval_det result is a function of: the detector's weights, its evaluation config,
    the indexed data and the CPU threads (a plain backbone leaves out model.groups, sge_impl and
    the SGE ablation knobs)."""
    return {
        "config": evaluation_fingerprint(cfg, weights, uses_sge=parse_model_name(backbone).attention == "sge"),
        "det_manifest_sha256": file_digest(paths.det_manifest, "sha256"),
        "cpu_threads": params.cpu_threads,
    }


def _read_previous_metrics(path) -> dict:
    """The metrics an earlier eval_det wrote here ({} when none or unreadable: evaluate again)."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return previous if isinstance(previous, dict) else {}
