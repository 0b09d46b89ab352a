"""detectron2 configs: the YAML files in pipelines/detectron2/ plus run-specific values.

    pipelines/detectron2/{detector}_{R50|SGE_R50|R101|SGE_R101}_FPN_{2x|20e}.yaml  (paper)
    pipelines/detectron2/cpu/{detector}.yaml                                    (embedded / smoke)

Detectors: faster_rcnn, mask_rcnn, cascade_rcnn, retinanet. The backbone architecture comes
from the converted weights' header when there is one, so a config can never silently build a
different network from the one the weights were trained as.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sge_repro.detection.backbone import add_sge_config
from sge_repro.detection.compat import import_detectron2
from sge_repro.errors import UserError

import_detectron2()
from detectron2.config import CfgNode, get_cfg  # noqa: E402

DETECTORS = ("faster_rcnn", "mask_rcnn", "cascade_rcnn", "retinanet")
VARIANTS = ("cpu", "paper")
PAPER_SCHEDULES = {"faster_rcnn": "2x", "mask_rcnn": "2x", "cascade_rcnn": "20e", "retinanet": "2x"}
CONFIG_DIR = Path(__file__).resolve().parents[2] / "pipelines" / "detectron2"


def detector_config_file(detector: str, backbone_model: str | None = None, variant: str = "cpu",
                         config_dir: str | Path | None = None) -> Path:
    """The YAML for `detector` in `variant`; paper files are per depth and plain / SGE."""
    if detector not in DETECTORS:
        raise UserError(f"detector {detector!r}: expected one of {list(DETECTORS)}")
    if variant not in VARIANTS:
        raise UserError(f"detection config variant {variant!r}: expected one of {list(VARIANTS)}")
    config_dir = Path(config_dir) if config_dir is not None else CONFIG_DIR
    if variant == "cpu":
        path = config_dir / "cpu" / f"{detector}.yaml"
    else:
        name = backbone_model or "resnet50"
        depth = "101" if name.endswith("101") else "50"
        # other attentions (se_, cbam_, ...) reuse the plain file of their depth; ARCH is set later
        tag = f"SGE_R{depth}" if name.startswith("sge_") else f"R{depth}"
        path = config_dir / f"{detector}_{tag}_FPN_{PAPER_SCHEDULES[detector]}.yaml"
    if not path.is_file():
        raise UserError(f"{path}: detectron2 config not found")
    return path


def _backbone_from_weights(weights: str | Path | None) -> dict | None:
    if not weights:
        return None
    from sge_repro.detection.convert import read_weights_metadata

    metadata = read_weights_metadata(weights)
    if metadata is None or "model" not in metadata:
        return None
    return {"model": metadata["model"], **dict(metadata.get("model_kwargs", {}))}


def apply_overrides(cfg: CfgNode, overrides: dict[str, Any] | None) -> CfgNode:
    """Dotted detectron2 keys -> values, e.g. {"SOLVER.MAX_ITER": 300}; unknown key -> UserError."""
    for key, value in (overrides or {}).items():
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, AttributeError) as error:
            raise UserError(f"detectron2 override {key!r}: not a config key ({error})") from None
        except (ValueError, TypeError, AssertionError) as error:
            raise UserError(f"detectron2 override {key}={value!r}: {error}") from None
    return cfg


def build_detector_config(
    detector: str,
    backbone_model: str | None,
    weights: str | os.PathLike | None,
    dataset_train: str,
    dataset_val: str | None,
    output_dir: str | os.PathLike,
    num_classes: int,
    seed: int,
    overrides: dict[str, Any] | None = None,
    variant: str = "cpu",
    config_file: str | os.PathLike | None = None,
    device: str | None = None,
) -> CfgNode:
    """A frozen detectron2 config for one run.

    backbone_model: a create_model name; None = the one recorded in `weights`. weights: converted
    classification weights (sge-repro convert) or a detector checkpoint; None = random init
    (explicit, logged). overrides: dotted detectron2 keys, applied last. device: None = the
    config's, falling back to "cpu" when CUDA is absent.
    """
    cfg = add_sge_config(get_cfg())
    path = Path(config_file) if config_file is not None else detector_config_file(detector, backbone_model, variant)
    if not path.is_file():
        raise UserError(f"{path}: detectron2 config not found")
    try:
        cfg.merge_from_file(str(path))
    except KeyError as error:
        raise UserError(f"{path}: unknown config key ({error})") from None

    recorded = _backbone_from_weights(weights)
    if recorded is not None:
        if backbone_model is not None and backbone_model != recorded["model"]:
            raise UserError(
                f"weights {weights}: converted from {recorded['model']!r}, but the backbone asked for is {backbone_model!r}"
            )
        cfg.MODEL.SGE_BACKBONE.ARCH = recorded["model"]
        cfg.MODEL.SGE_BACKBONE.WIDTH = int(recorded.get("width", cfg.MODEL.SGE_BACKBONE.WIDTH))
        cfg.MODEL.SGE_BACKBONE.GROUPS = int(recorded.get("groups", cfg.MODEL.SGE_BACKBONE.GROUPS))
    elif backbone_model is not None:
        cfg.MODEL.SGE_BACKBONE.ARCH = backbone_model

    if num_classes < 1:
        raise UserError(f"num_classes={num_classes}: expected a positive integer")
    cfg.MODEL.WEIGHTS = str(weights) if weights else ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.DATASETS.TRAIN = (dataset_train,)
    cfg.DATASETS.TEST = (dataset_val,) if dataset_val else ()
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.SEED = int(seed)

    import torch

    if device is not None:
        cfg.MODEL.DEVICE = device
    elif cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    apply_overrides(cfg, overrides)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but CUDA is not available")
    cfg.freeze()
    return cfg
