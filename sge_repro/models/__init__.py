"""Model zoo: one ResNet with SGE and the paper's attention baselines."""

from sge_repro.models.attention import SpatialGroupEnhance, create_attention
from sge_repro.models.registry import ModelName, create_model, list_models, parse_model_name
from sge_repro.models.resnet import DEFAULT_WIDTH
from sge_repro.models.sge import DEFAULT_GROUPS

__all__ = ["DEFAULT_GROUPS", "DEFAULT_WIDTH", "ModelName", "SpatialGroupEnhance", "create_attention",
           "create_model", "list_models", "parse_model_name"]
