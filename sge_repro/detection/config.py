"""detectron2 configs: the YAML files in pipelines/detectron2/ plus run-specific values.

One YAML per protocol (sge_repro.detection.detectors.PROTOCOLS) and detector, at two scales:

    protocol detectron2:
      pipelines/detectron2/{detector}_{R50|SGE_R50|R101|SGE_R101}_FPN_{2x|20e}.yaml  (config set "paper": COCO)
      pipelines/detectron2/embedded/{detector}.yaml                    (config set "embedded": generated data)
    protocol authors / controlled:
      pipelines/detectron2/{protocol}/{detector}_FPN_{2x|20e}.yaml       (paper)
      pipelines/detectron2/embedded/{protocol}/{detector}.yaml           (embedded)

Every file names its PROTOCOL, so the protocol is part of the config a run is built from, its
dump (OUTPUT_DIR/config.yaml) and any fingerprint of it. The backbone architecture (ARCH, WIDTH,
GROUPS) comes from the converted weights' header when there is one, so a config can never
silently build a different network from the one the weights were trained as; the SGE
implementation and ablation knobs are run choices (params.yaml model.*).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sge_repro.detection.backbone import add_sge_config
from sge_repro.detection.compat import import_detectron2
from sge_repro.detection.convert import read_weights_metadata
from sge_repro.detection.detectors import DETECTORS, PAPER_SCHEDULES, PROTOCOLS
from sge_repro.detection.mmdetection import add_mmdetection_config
from sge_repro.errors import UserError
from sge_repro.models.registry import SGE_VARIANT_DEFAULTS, parse_model_name

import_detectron2()
from detectron2.config import CfgNode, get_cfg  # noqa: E402

# "embedded": small CPU configs for the generated data set (embedded / smoke profiles);
# "paper": the paper's COCO settings, one file per detector, depth and plain / SGE backbone.
CONFIG_SETS = ("embedded", "paper")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "pipelines" / "detectron2"


def new_config() -> CfgNode:
    """detectron2's defaults plus this project's keys (MODEL.SGE_BACKBONE, PROTOCOL, the
    mmdetection behaviours); what every YAML here is merged into."""
    cfg = add_mmdetection_config(add_sge_config(get_cfg()))
    if "PROTOCOL" not in cfg:
        cfg.PROTOCOL = "detectron2"  # each YAML names its own
    if "DETERMINISTIC" not in cfg:
        cfg.DETERMINISTIC = True  # deterministic cudnn kernels (train_det.deterministic)
    return cfg


def detector_config_file(detector: str, backbone_model: str | None = None, config_set: str = "embedded",
                         config_dir: str | Path | None = None, protocol: str = "detectron2") -> Path:
    """The YAML for `detector` in `config_set` under `protocol`; the detectron2 protocol's paper
    files are per depth and plain / SGE, the other protocols' one per detector."""
    if detector not in DETECTORS:
        raise UserError(f"detector {detector!r}: expected one of {list(DETECTORS)}")
    if config_set not in CONFIG_SETS:
        raise UserError(f"detection config set {config_set!r}: expected one of {list(CONFIG_SETS)}")
    if protocol not in PROTOCOLS:
        raise UserError(f"detection protocol {protocol!r}: expected one of {list(PROTOCOLS)}")
    config_dir = Path(config_dir) if config_dir is not None else CONFIG_DIR
    if protocol != "detectron2":
        if backbone_model is not None:
            parse_model_name(backbone_model)  # an unknown name is an error here too
        if config_set == "embedded":
            path = config_dir / "embedded" / protocol / f"{detector}.yaml"
        else:
            path = config_dir / protocol / f"{detector}_FPN_{PAPER_SCHEDULES[detector]}.yaml"
    elif config_set == "embedded":
        path = config_dir / "embedded" / f"{detector}.yaml"
    else:
        backbone = parse_model_name(backbone_model or "resnet50")
        # the paper has R50 and R101 files; other depths use R50's settings, other attentions
        # (se_, cbam_, ...) the plain file of their depth (ARCH is set later)
        depth = "101" if backbone.depth == 101 else "50"
        tag = f"SGE_R{depth}" if backbone.attention == "sge" else f"R{depth}"
        path = config_dir / f"{detector}_{tag}_FPN_{PAPER_SCHEDULES[detector]}.yaml"
    if not path.is_file():
        raise UserError(f"{path}: detectron2 config not found")
    return path


def _backbone_from_weights(weights: str | Path | None) -> dict | None:
    if not weights:
        return None

    metadata = read_weights_metadata(weights)
    if metadata is None or "model" not in metadata:
        return None
    return {"model": metadata["model"], **dict(metadata.get("model_kwargs", {}))}


def _set_sge_variant(cfg: CfgNode, sge_variant: dict[str, Any], weights, recorded: dict | None) -> None:
    """The SGE ablation knobs onto MODEL.SGE_BACKBONE; the weights' normalisation decides
    SGE_NORMALIZE, and asking for the other one is an error (it would compute another function
    than the one the weights were trained with)."""
    node = cfg.MODEL.SGE_BACKBONE
    unknown = sorted(set(sge_variant) - set(SGE_VARIANT_DEFAULTS))
    if unknown:
        raise UserError(f"sge_variant: unknown key(s) {', '.join(unknown)}; expected {', '.join(SGE_VARIANT_DEFAULTS)}")
    for key, value in sge_variant.items():
        node[key.upper()] = value
    if recorded is not None:
        trained = recorded.get("sge_normalize", SGE_VARIANT_DEFAULTS["sge_normalize"])
        if sge_variant.get("sge_normalize", trained) != trained:
            raise UserError(f"weights {weights}: converted from an SGE with sge_normalize={trained}, but "
                            f"model.sge_normalize is {sge_variant['sge_normalize']}; expected the same value")
        node.SGE_NORMALIZE = trained


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
    config_set: str = "embedded",
    config_file: str | os.PathLike | None = None,
    device: str | None = None,
    sge_impl: str | None = None,
    protocol: str = "detectron2",
    sge_variant: dict[str, Any] | None = None,
) -> CfgNode:
    """A frozen detectron2 config for one run.

    backbone_model: a create_model name; None = the one recorded in `weights`. weights: converted
    classification weights (sge-repro convert) or a detector checkpoint; None = random init
    (explicit, logged). overrides: dotted detectron2 keys, applied last. device: None = the
    config's, falling back to "cpu" when CUDA is absent. sge_impl: the backbone's SGE
    implementation ("fast" | "reference" | "triton"); None = the config's. protocol: which YAML
    (sge_repro.detection.detectors.PROTOCOLS); an explicit config_file names its own. sge_variant:
    {"sge_weight_init", "sge_bias_init", "sge_normalize"} (any of them) for an SGE backbone; a
    backbone without SGE ignores them, as it ignores GROUPS.
    """
    cfg = new_config()
    if config_file is not None:
        path = Path(config_file)
    else:
        path = detector_config_file(detector, backbone_model, config_set, protocol=protocol)
    if not path.is_file():
        raise UserError(f"{path}: detectron2 config not found")
    try:
        cfg.merge_from_file(str(path))
    except KeyError as error:
        raise UserError(f"{path}: unknown config key ({error})") from None
    if config_file is None and cfg.PROTOCOL != protocol:
        raise UserError(f"{path}: PROTOCOL is {cfg.PROTOCOL!r}, expected {protocol!r} for this protocol's file")

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
    if sge_impl is not None:
        cfg.MODEL.SGE_BACKBONE.SGE_IMPL = sge_impl
    if parse_model_name(cfg.MODEL.SGE_BACKBONE.ARCH).attention == "sge":
        _set_sge_variant(cfg, sge_variant or {}, weights, recorded)

    if num_classes < 1:
        raise UserError(f"num_classes={num_classes}: expected a positive integer")
    cfg.MODEL.WEIGHTS = str(weights) if weights else ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.DATASETS.TRAIN = (dataset_train,)
    cfg.DATASETS.TEST = (dataset_val,) if dataset_val else ()
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.SEED = int(seed)


    if device is not None:
        cfg.MODEL.DEVICE = device
    elif cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    apply_overrides(cfg, overrides)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but CUDA is not available")
    cfg.freeze()
    return cfg
