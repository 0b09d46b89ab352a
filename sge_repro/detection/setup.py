"""A detector's detectron2 config for one pipeline run (called by sge_repro.stages.detection).

Which config set: `data.detection.source: coco` uses the "paper" YAMLs (pipelines/detectron2/*.yaml),
the generated set the small "embedded" ones (pipelines/detectron2/embedded/). train_det's params
are mapped onto the YAML keeping its shape: learning-rate steps stay at the same fractions of the
schedule, Cascade R-CNN keeps its 20e/24e length ratio, and base_lr is rescaled per detector by
`detector_base_lr` (RetinaNet: half). The backbone's SGE implementation is model.sge_impl, its SGE
ablation knobs model.sge_weight_init / sge_bias_init / sge_normalize; the protocol
(train_det.protocol) picks the YAML of each detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sge_repro.data.coco_json import coco_split_paths
from sge_repro.detection.config import build_detector_config, detector_config_file, new_config
from sge_repro.detection.data import dataset_num_classes, register_split
from sge_repro.detection.detectors import detector_base_lr

REFERENCE_PAPER_ITERS = 180000  # the 2x schedule train_det.max_iter stands for (paper config set)


@dataclass(frozen=True)
class DetectionDataset:
    """Where a detection set lives and which YAML set fits it."""

    kind: str        # "coco" or "embedded": the name in metrics and dataset registrations
    root: str
    layout: str      # "coco2017" (train2017/, val2017/) or "embedded" (train/, val/)
    config_set: str  # "paper" or "embedded" YAMLs
    verified: bool = False                   # checked by the data stage: not validated again here
    exclude: frozenset[str] = frozenset()    # image files (absolute) left out (corrupt, data.skip_corrupt)


def schedule_overrides(detector: str, config_set: str, max_iter: int, ims_per_batch: int, base_lr: float,
                       warmup_iters: int | None, min_size: int, max_size: int, checkpoint_period: int,
                       workers: int, protocol: str = "detectron2", deterministic: bool = True) -> dict[str, Any]:
    """detectron2 overrides for train_det's params, keeping the YAML's schedule shape.
    warmup_iters None: the YAML's warmup (the authors' 500 iterations at COCO scale)."""
    reference = new_config()
    reference.merge_from_file(str(detector_config_file(detector, None, config_set, protocol=protocol)))
    yaml_iters = reference.SOLVER.MAX_ITER
    # paper: max_iter is the 2x length; a detector with another schedule (cascade 20e) scales with it
    iters = max_iter if config_set == "embedded" else max(1, round(max_iter * yaml_iters / REFERENCE_PAPER_ITERS))
    steps = tuple(sorted({max(1, round(step / yaml_iters * iters)) for step in reference.SOLVER.STEPS} - {iters}))
    steps = tuple(step for step in steps if step < iters)
    lr = detector_base_lr(base_lr, reference.SOLVER.BASE_LR)
    return {
        "SOLVER.MAX_ITER": iters,
        "SOLVER.STEPS": steps,
        "SOLVER.IMS_PER_BATCH": ims_per_batch,
        "SOLVER.BASE_LR": lr,
        "SOLVER.WARMUP_ITERS": min(reference.SOLVER.WARMUP_ITERS if warmup_iters is None else warmup_iters, iters),
        "SOLVER.CHECKPOINT_PERIOD": checkpoint_period,
        "INPUT.MIN_SIZE_TRAIN": (min_size,),
        "INPUT.MAX_SIZE_TRAIN": max_size,
        "INPUT.MIN_SIZE_TEST": min_size,
        "INPUT.MAX_SIZE_TEST": max_size,
        "DATALOADER.NUM_WORKERS": workers,
        "DETERMINISTIC": deterministic,
        # never autotuned: COCO's images come in many sizes, and cudnn benchmarks every new input
        # shape (detectron2's defaults: ~10k iterations of overhead); deterministic or not only
        # chooses between cudnn's kernels
        "CUDNN_BENCHMARK": False,
    }


def run_config(detector: str, backbone: str, seed: int, dataset: DetectionDataset, overrides: dict[str, Any],
               protocol: str, weights: Path, run_dir: Path, device: str, sge_impl: str,
               sge_variant: dict[str, Any] | None = None):
    """(cfg, val dataset name) of one train_det / eval_det run; `overrides`: schedule_overrides'."""
    train_name, val_name = f"sge_{dataset.kind}_train", f"sge_{dataset.kind}_val"
    for name, split in ((train_name, "train"), (val_name, "val")):
        register_split(name, dataset.root, split, dataset.layout, validate=not dataset.verified,
                       exclude=dataset.exclude)
    cfg = build_detector_config(
        detector, backbone, weights, train_name, val_name, run_dir,
        num_classes=dataset_num_classes(coco_split_paths(dataset.root, "train", dataset.layout)[0]), seed=seed,
        overrides=overrides, config_set=dataset.config_set, device=device, sge_impl=sge_impl, protocol=protocol,
        sge_variant=sge_variant,
    )
    return cfg, val_name
