"""Two mmdetection-2019 behaviours detectron2 v0.6 lacks, for the `authors` protocol.

- `StageWeightedCascadeROIHeads` (ROI_HEADS.NAME): Cascade R-CNN whose stage losses are weighted
  by `MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS` (the authors' `stage_loss_weights=[1, 0.5,
  0.25]`), with the gradient reaching the pooled features unscaled, as mmdetection's CascadeRCNN.
  detectron2's CascadeROIHeads weights every stage 1 and scales that gradient by 1/3 instead.
- `SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "full_model"`: clip the norm of ALL gradients together (the
  authors' `grad_clip=dict(max_norm=35, norm_type=2)`, torch's clip_grad_norm_ over the model).
  detectron2's "norm" clips each parameter tensor on its own.

`build_optimizer(cfg, model)` is what the trainer calls; without "full_model" it is detectron2's.
"""

from __future__ import annotations

import torch

from sge_repro.detection.compat import import_detectron2
from sge_repro.errors import UserError

import_detectron2()
from detectron2.config import CfgNode  # noqa: E402
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads  # noqa: E402
from detectron2.solver import build_optimizer as detectron2_build_optimizer  # noqa: E402
from detectron2.solver.build import get_default_optimizer_params  # noqa: E402

FULL_MODEL = "full_model"


def add_mmdetection_config(cfg: CfgNode) -> CfgNode:
    """Add the keys these behaviours read (idempotent) and return cfg."""
    cascade = cfg.MODEL.ROI_BOX_CASCADE_HEAD
    if "STAGE_LOSS_WEIGHTS" not in cascade:
        # one weight per stage (len(IOUS)); read by StageWeightedCascadeROIHeads only
        cascade.STAGE_LOSS_WEIGHTS = [1.0, 1.0, 1.0]
    return cfg


@ROI_HEADS_REGISTRY.register()
class StageWeightedCascadeROIHeads(CascadeROIHeads):
    """Cascade R-CNN as mmdetection 2019 trains it: stage k's classification and box losses times
    STAGE_LOSS_WEIGHTS[k], and no 1/num_stages scaling of the gradient into the pooled features."""

    @classmethod
    def _init_box_head(cls, cfg: CfgNode, input_shape):
        built = super()._init_box_head(cfg, input_shape)
        weights = [float(w) for w in cfg.MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS]
        predictors = built["box_predictors"]
        if len(weights) != len(predictors) or any(w < 0 for w in weights):
            raise UserError(
                f"MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS: {weights}, expected {len(predictors)} "
                "non-negative numbers (one per cascade stage, as MODEL.ROI_BOX_CASCADE_HEAD.IOUS)")
        for weight, predictor in zip(weights, predictors):
            box_weight = predictor.loss_weight.get("loss_box_reg", 1.0)
            predictor.loss_weight = {"loss_cls": weight, "loss_box_reg": weight * box_weight}
        return built

    def _run_stage(self, features, proposals, stage):
        box_features = self.box_pooler(features, [x.proposal_boxes for x in proposals])
        box_features = self.box_head[stage](box_features)
        return self.box_predictor[stage](box_features)


class FullModelClipSGD(torch.optim.SGD):
    """SGD that first clips the total gradient norm of all its parameters to `max_norm`."""

    def __init__(self, params, *, max_norm: float, norm_type: float = 2.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)

    @torch.no_grad()
    def step(self, closure=None):
        gradients = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if gradients:
            torch.nn.utils.clip_grad_norm_(gradients, self.max_norm, self.norm_type)
        return super().step(closure)


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """detectron2's SGD with its parameter groups; "full_model" clipping as FullModelClipSGD."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == FULL_MODEL):
        return detectron2_build_optimizer(cfg, model)
    if clip.CLIP_VALUE <= 0:
        raise UserError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE: {clip.CLIP_VALUE}, expected a positive max norm")
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    return FullModelClipSGD(
        params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY, max_norm=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE,
    )
