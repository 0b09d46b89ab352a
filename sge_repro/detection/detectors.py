"""The detectors the pipeline trains (params.yaml `detectors`), without importing detectron2.

Each has one YAML per protocol in pipelines/detectron2/ (see detection/config.py); the paper
trains Cascade R-CNN for 20 epochs and the others for the 2x schedule.
"""

DETECTORS = ("faster_rcnn", "mask_rcnn", "cascade_rcnn", "retinanet")
PAPER_SCHEDULES = {"faster_rcnn": "2x", "mask_rcnn": "2x", "cascade_rcnn": "20e", "retinanet": "2x"}

# train_det.base_lr is the two-stage (R-CNN) rate; each detector gets it scaled by its YAML's
# SOLVER.BASE_LR relative to this one, so RetinaNet (YAML 0.01) trains at half of base_lr.
REFERENCE_TWO_STAGE_LR = 0.02


def detector_base_lr(base_lr: float, yaml_base_lr: float) -> float:
    """The SOLVER.BASE_LR a detector trains at for params.yaml's train_det.base_lr."""
    return base_lr * yaml_base_lr / REFERENCE_TWO_STAGE_LR
