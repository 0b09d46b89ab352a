"""The detectors the pipeline trains (params.yaml `detectors`) and the detection protocols
(params.yaml `train_det.protocol`), without importing detectron2.

Each detector has one YAML per protocol in pipelines/detectron2/ (see detection/config.py); the
paper trains Cascade R-CNN for 20 epochs and the others for the 2x schedule.
"""

DETECTORS = ("faster_rcnn", "mask_rcnn", "cascade_rcnn", "retinanet")
PAPER_SCHEDULES = {"faster_rcnn": "2x", "mask_rcnn": "2x", "cascade_rcnn": "20e", "retinanet": "2x"}

# train_det.base_lr is the two-stage (R-CNN) rate; each detector gets it scaled by its YAML's
# SOLVER.BASE_LR relative to this one, so RetinaNet (YAML 0.01) trains at half of base_lr.
REFERENCE_TWO_STAGE_LR = 0.02


def detector_base_lr(base_lr: float, yaml_base_lr: float) -> float:
    """The SOLVER.BASE_LR a detector trains at for params.yaml's train_det.base_lr."""
    return base_lr * yaml_base_lr / REFERENCE_TWO_STAGE_LR


# How a detector is trained (params.yaml train_det.protocol; the YAMLs in pipelines/detectron2/):
# - detectron2: detectron2's defaults around the paper's schedule (frozen BN, 1000 proposals,
#   ROIAlignV2, L1 box losses); backbones from any convert source.
# - authors: the authors' mmdetection-2019 settings (paper-results.md, detection section), plain
#   backbones from torchvision's ImageNet weights and attention backbones from the authors' own
#   checkpoint, as their configs did.
# - controlled: detectron2's settings, both backbones from our own classification runs of one
#   recipe, so the detection gain is SGE's alone.
PROTOCOLS = ("detectron2", "authors", "controlled")


def protocol_weights_source(protocol: str, backbone_is_plain: bool) -> str | None:
    """The convert source (the params.yaml convert list naming the backbone) a protocol requires for a
    backbone: "trained", "file" or "torchvision"; None when the protocol accepts any."""
    if protocol == "authors":
        # their configs: pretrained='modelzoo://resnet50' (torchvision) for the plain detectors,
        # their own model_best.pth.tar for the SGE ones (paper-results.md, "Backbone weights")
        return "torchvision" if backbone_is_plain else "file"
    if protocol == "controlled":
        return "trained"
    return None
