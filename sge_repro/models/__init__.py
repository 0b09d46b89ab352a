"""Model zoo: one ResNet with SGE and the paper's attention baselines."""

from sge_repro.models.registry import create_model, list_models
from sge_repro.models.sge import SpatialGroupEnhance

__all__ = ["SpatialGroupEnhance", "create_model", "list_models"]
