"""The train_det / eval_det pipeline stages: params.yaml values -> the detection library calls.

The CLI (`sge-repro train det`, `sge-repro eval det`) calls these with its StageContext
(validated params + ProjectPaths); everything below them takes explicit arguments.

Which config: `data.detection.source: coco` uses the paper YAMLs (pipelines/detectron2/*.yaml),
the generated set uses the small CPU ones (pipelines/detectron2/cpu/). train_det's params are
mapped onto the YAML keeping its shape: learning-rate steps stay at the same fractions of the
schedule, Cascade R-CNN keeps its 20e/24e length ratio, RetinaNet keeps half the two-stage lr.
"""

from __future__ import annotations

import time
from typing import Any

from sge_repro.atomic import write_json
from sge_repro.detection.config import build_detector_config, detector_config_file
from sge_repro.detection.data import coco_split_paths, dataset_num_classes, register_split
from sge_repro.errors import UserError

REFERENCE_TWO_STAGE_LR = 0.02  # the base YAMLs' R-CNN lr that train_det.base_lr stands for
REFERENCE_PAPER_ITERS = 180000  # the 2x schedule train_det.max_iter stands for (paper variant)


def _dataset(ctx) -> tuple[str, str, str, str]:
    """(data kind, root, layout, variant) of the detection data in params."""
    data = ctx.params.data.detection
    if data.source == "coco":
        if not data.source_path:
            raise UserError("params.yaml: data.detection.source_path: required when data.detection.source is coco")
        return "coco", data.source_path, "coco2017", "paper"
    return "embedded", str(ctx.paths.det_data), "embedded", "cpu"


def schedule_overrides(detector: str, variant: str, max_iter: int, ims_per_batch: int, base_lr: float,
                       warmup_iters: int, min_size: int, max_size: int, checkpoint_period: int,
                       workers: int) -> dict[str, Any]:
    """detectron2 overrides for train_det's params, keeping the YAML's schedule shape."""
    from sge_repro.detection.compat import import_detectron2

    import_detectron2()
    from detectron2.config import get_cfg

    from sge_repro.detection.backbone import add_sge_config

    reference = add_sge_config(get_cfg())
    reference.merge_from_file(str(detector_config_file(detector, None, variant)))
    yaml_iters = reference.SOLVER.MAX_ITER
    # paper: max_iter is the 2x length; a detector with another schedule (cascade 20e) scales with it
    iters = max_iter if variant == "cpu" else max(1, round(max_iter * yaml_iters / REFERENCE_PAPER_ITERS))
    steps = tuple(sorted({max(1, round(step / yaml_iters * iters)) for step in reference.SOLVER.STEPS} - {iters}))
    steps = tuple(step for step in steps if step < iters)
    lr = base_lr * reference.SOLVER.BASE_LR / REFERENCE_TWO_STAGE_LR
    return {
        "SOLVER.MAX_ITER": iters,
        "SOLVER.STEPS": steps,
        "SOLVER.IMS_PER_BATCH": ims_per_batch,
        "SOLVER.BASE_LR": lr,
        "SOLVER.WARMUP_ITERS": min(warmup_iters, iters),
        "SOLVER.CHECKPOINT_PERIOD": checkpoint_period,
        "INPUT.MIN_SIZE_TRAIN": (min_size,),
        "INPUT.MAX_SIZE_TRAIN": max_size,
        "INPUT.MIN_SIZE_TEST": min_size,
        "INPUT.MAX_SIZE_TEST": max_size,
        "DATALOADER.NUM_WORKERS": workers,
    }


def _stage_config(ctx, detector: str, backbone: str, seed: int, device: str):
    kind, root, layout, variant = _dataset(ctx)
    train_name, val_name = f"sge_{kind}_train", f"sge_{kind}_val"
    register_split(train_name, root, "train", layout)
    register_split(val_name, root, "val", layout)
    p = ctx.params.train_det
    overrides = schedule_overrides(
        detector, variant, p.max_iter, p.ims_per_batch, p.base_lr, p.warmup_iters, p.min_size,
        p.max_size, p.checkpoint_period, p.workers,
    )
    cfg = build_detector_config(
        detector, backbone, ctx.paths.det_weights(backbone, seed), train_name, val_name,
        ctx.paths.det_run_dir(detector, backbone, seed),
        num_classes=dataset_num_classes(coco_split_paths(root, "train", layout)[0]), seed=seed,
        overrides=overrides, variant=variant, device=device,
    )
    return cfg, kind, val_name


def train_detection_stage(ctx, detector: str, backbone: str, seed: int) -> dict:
    """Train one detector from the converted classifier; resumes. Returns a summary for printing."""
    from sge_repro.detection.engine import train_detector

    cfg, kind, _ = _stage_config(ctx, detector, backbone, seed, ctx.params.train_det.device)
    started = time.perf_counter()
    final = train_detector(cfg, resume=True)
    return {
        "weights": str(final),
        "iterations": int(cfg.SOLVER.MAX_ITER),
        "dataset": kind,
        "seconds": round(time.perf_counter() - started, 1),
    }


def evaluate_detection_stage(ctx, detector: str, backbone: str, seed: int) -> dict:
    """COCO AP of the trained detector on the val split; writes metrics/eval_det/<run>.json."""
    from sge_repro.detection.engine import FINAL_WEIGHTS, evaluate_detector

    cfg, kind, val_name = _stage_config(ctx, detector, backbone, seed, ctx.params.eval_det.device)
    run_dir = ctx.paths.det_run_dir(detector, backbone, seed)
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
    write_json(ctx.paths.det_metrics(detector, backbone, seed), metrics)
    return metrics
