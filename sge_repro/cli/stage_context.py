"""What every stage command needs: validated params, artifact paths, the dataset's name."""

from __future__ import annotations

from dataclasses import dataclass

from sge_repro.errors import UserError
from sge_repro.params import Params, load_params
from sge_repro.paths import ProjectPaths


@dataclass(frozen=True)
class StageContext:
    params: Params
    paths: ProjectPaths

    @property
    def cls_dataset(self) -> str:
        return "embedded" if self.params.data.classification.source == "synthetic" else "imagenet"

    @property
    def det_dataset(self) -> str:
        return "embedded" if self.params.data.detection.source == "synthetic" else "coco"

    def model_kwargs(self) -> dict:
        """Architecture knobs shared by the classifier and its detector backbone."""
        m = self.params.model
        return {"width": m.width, "groups": m.groups, "sge_impl": m.sge_impl}

    def require_model(self, model: str, key: str = "models") -> None:
        allowed = getattr(self.params, key)
        if model not in allowed:
            raise UserError(f"params.yaml: {key}: {model!r} is not listed (listed: {', '.join(allowed)})")

    def require_detection_run(self, detector: str, backbone: str, seed: int) -> None:
        self.require_model(detector, "detectors")
        self.require_model(backbone, "detection_backbones")
        self.require_seed(seed)

    def require_seed(self, seed: int) -> None:
        if seed not in self.params.seeds:
            raise UserError(f"params.yaml: seeds: {seed} is not listed (listed: {self.params.seeds})")


def stage_context() -> StageContext:
    """Validated params and paths for a stage command; fixes torch's CPU thread count."""
    import torch

    params = load_params()
    torch.set_num_threads(params.cpu_threads)
    return StageContext(params, ProjectPaths())
