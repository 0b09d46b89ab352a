"""The schema of params.yaml, profile overlays, and validation.

params.yaml holds every knob of the pipeline. The schema's defaults ARE the embedded profile;
a profile in pipelines/profiles/NAME.yaml is a partial overlay on those defaults. Each DVC stage
lists the params.yaml sections it reads, so changing one knob reruns only those stages.

Any problem (unknown key, wrong type, unknown model) raises `UserError` naming the key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sge_repro.detection.detectors import DETECTORS, REFERENCE_TWO_STAGE_LR
from sge_repro.errors import UserError

PARAMS_FILE = Path("params.yaml")
PROFILES_DIR = Path("pipelines") / "profiles"


class Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    # Strict types: `epochs: true` or `epochs: "3"` is an error, not 1 or 3 (an int where a float
    # is expected stays accepted: `lr: 1` is natural YAML).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


# detectron2 reads a negative seed as "pick one at random": a seed is >= 0.
Seed = Annotated[int, Field(ge=0)]
# Data-loader worker processes of a classification stage: a count, or "auto" (from the cores this
# process may use and the processes on this node: sge_repro.classification.sampling.resolve_workers).
Workers = Annotated[int, Field(ge=0)] | Literal["auto"]
# How images become pixels (sge_repro/classification/transforms.py): torchvision's libjpeg-turbo decode and
# uint8 tensor resize (faster), or PIL's decode and resize (bit for bit what runs before this option did).
Decoder = Literal["torchvision", "pil"]


class ClassificationData(Section):
    source: Literal["synthetic", "imagenet"] = "synthetic"
    source_path: str | None = Field(None, description="ImageNet ImageFolder tree or the three official archives")
    subset_classes: list[str] | None = Field(None, description="ImageNet synsets to use (default: all 1000)")
    num_classes: int = Field(10, ge=2)
    image_size: int = Field(64, ge=16)
    train_per_class: int = Field(150, ge=1)
    val_per_class: int = Field(30, ge=1)

    @property
    def dataset_name(self) -> str:
        return "embedded" if self.source == "synthetic" else "imagenet"


class DetectionData(Section):
    source: Literal["synthetic", "coco"] = "synthetic"
    source_path: str | None = Field(None, description="COCO 2017 root (train2017/, annotations/)")
    num_train: int = Field(240, ge=1)
    num_val: int = Field(60, ge=1)
    image_size: int = Field(128, ge=32)
    num_categories: int = Field(3, ge=1)

    @property
    def dataset_name(self) -> str:
        return "embedded" if self.source == "synthetic" else "coco"


class DataParams(Section):
    seed: Seed = 0
    skip_corrupt: bool = False
    classification: ClassificationData = ClassificationData()
    detection: DetectionData = DetectionData()


class ModelParams(Section):
    """Shared by every classifier and detector backbone built from `models`."""

    width: int = Field(32, ge=4, description="base channel width (64 = the paper's ResNets)")
    groups: int = Field(8, ge=1, description="SGE groups G (64 in the paper)")
    sge_impl: Literal["fast", "reference", "triton"] = Field("fast", description=(
        "SGE implementation: fast (default), reference (the formula step by step), triton (CUDA kernels, opt-in)"))

    def model_kwargs(self) -> dict:
        """Architecture knobs shared by the classifier and its detector backbone."""
        return {"width": self.width, "groups": self.groups, "sge_impl": self.sge_impl}


class TrainClsParams(Section):
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=1, description="global batch (all processes together)")
    lr: float = Field(0.05, gt=0, description="for the global batch, used as given")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    no_weight_decay_on_bn_bias: bool = False
    lr_schedule: Literal["step", "cosine"] = "cosine"
    milestones: list[Annotated[int, Field(ge=1)]] = [30, 60, 90]
    warmup_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip_norm: float | None = Field(None, gt=0)
    image_size: int = Field(64, ge=16)
    min_crop_scale: float = Field(0.35, gt=0, le=1, description="RandomResizedCrop scale lower bound")
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = Field(False, description=(
        "BatchNorm statistics over the global batch of all processes (torch SyncBatchNorm on CUDA, "
        "GlobalBatchNorm2d on CPU/gloo): N processes then train what one process trains on the same "
        "batch_size. No effect in a single process"))
    workers: Workers = 0
    decoder: Decoder = "torchvision"
    device: str = "cpu"

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainClsParams":
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs}: expected 0 <= warmup_epochs <= epochs "
                             f"({self.epochs})")
        return self


class EvalClsParams(Section):
    batch_size: int = Field(128, ge=1)
    image_size: int = Field(64, ge=16)
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    workers: Workers = 0
    decoder: Decoder = "torchvision"
    device: str = "cpu"


class ConvertParams(Section):
    checkpoint: Literal["best", "last"] = "best"


class TrainDetParams(Section):
    max_iter: int = Field(300, ge=1)
    ims_per_batch: int = Field(8, ge=1)
    base_lr: float = Field(0.02, gt=0, description=(
        f"the two-stage (R-CNN) lr; each detector trains at base_lr * its YAML's SOLVER.BASE_LR / "
        f"{REFERENCE_TWO_STAGE_LR} (sge_repro.detection.detectors.detector_base_lr): RetinaNet at half"))
    warmup_iters: int = Field(50, ge=0)
    min_size: int = Field(128, ge=32)
    max_size: int = Field(128, ge=32)
    checkpoint_period: int = Field(100, ge=1)
    workers: int = Field(0, ge=0)
    device: str = "cpu"


class EvalDetParams(Section):
    device: str = "cpu"


class ReportParams(Section):
    tolerance: float = Field(0.3, ge=0, description="points within which a paper number counts as reproduced")
    bootstrap_samples: int = Field(2000, ge=100)
    seed: Seed = 0


class Params(Section):
    profile: str = "embedded"
    cpu_threads: int = Field(2, ge=1, description="torch threads on CPU; CPU runs repeat bit for bit at a fixed count")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    models: list[str] = Field(default_factory=lambda: ["resnet18", "sge_resnet18"], min_length=1)
    detectors: list[str] = Field(default_factory=lambda: ["faster_rcnn", "retinanet"], min_length=1)
    detection_backbones: list[str] = Field(
        default_factory=lambda: ["resnet18", "sge_resnet18"], min_length=1
    )
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train_cls: TrainClsParams = TrainClsParams()
    eval_cls: EvalClsParams = EvalClsParams()
    convert: ConvertParams = ConvertParams()
    train_det: TrainDetParams = TrainDetParams()
    eval_det: EvalDetParams = EvalDetParams()
    report: ReportParams = ReportParams()

    def require_listed(self, key: str, value: str | int) -> None:
        """A stage's matrix item must be one of params.yaml's lists (models, seeds, ...)."""
        allowed = getattr(self, key)
        if value not in allowed:
            raise UserError(f"params.yaml: {key}: {value!r} is not listed (listed: {', '.join(map(str, allowed))})")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        from sge_repro.models.registry import NAME_HELP, parse_model_name

        for name in self.models:
            try:
                parse_model_name(name)
            except UserError:
                raise ValueError(f"models: unknown model {name!r}; {NAME_HELP}") from None
        for name in self.detectors:
            if name not in DETECTORS:
                raise ValueError(f"detectors: unknown detector {name!r} (allowed: {', '.join(DETECTORS)})")
        for name in self.detection_backbones:
            if name not in self.models:
                raise ValueError(
                    f"detection_backbones: {name!r} is not among models {self.models} "
                    "(a detector backbone starts from a trained classifier)"
                )
        for key in ("seeds", "models", "detectors", "detection_backbones"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"{key}: duplicate entries in {values}")
        return self


def _describe(error: dict[str, Any], source: str) -> str:
    key = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _section_for(error["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "?"
        return f"{source}: unknown key '{key}' (allowed here: {allowed})"
    if kind == "value_error":
        message = error["msg"].removeprefix("Value error, ")
        return f"{source}: {key}: {message}" if key else f"{source}: {message}"
    got = error.get("input")
    return f"{source}: {key or '(top level)'}: {error['msg'].lower()}, got {got!r}"


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def validate_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a dict against the schema; the error names the key and what was expected."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_describe(exc.errors()[0], source)) from None
    return params


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None


def load_params(path: Path = PARAMS_FILE) -> Params:
    """params.yaml, validated; it must name every top-level key (dvc.yaml reads them from the file)."""
    raw = read_yaml(path)
    if raw == {}:
        raise UserError(f"{path}: empty; expected every section of the schema "
                        "(`sge-repro run all --profile embedded` writes a complete one)")
    params = validate_params(raw, str(path))
    missing = [key for key in Params.model_fields if key not in raw]
    if missing:
        raise UserError(f"{path}: missing top-level key(s) {', '.join(missing)} "
                        "(`sge-repro run all --profile NAME` writes a complete file)")
    return params


def available_profiles(profiles_dir: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in profiles_dir.glob("*.yaml"))


def deep_merge(base: dict, overlay: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def profile_params(name: str, profiles_dir: Path = PROFILES_DIR) -> Params:
    """Schema defaults with the profile's overlay applied (and `profile: name` set)."""
    path = profiles_dir / f"{name}.yaml"
    if not path.exists():
        allowed = ", ".join(available_profiles(profiles_dir)) or "none found"
        raise UserError(f"unknown profile {name!r}: no {path} (available: {allowed})")
    overlay = read_yaml(path)
    if not isinstance(overlay, dict):
        raise UserError(f"{path}: expected a mapping, got {type(overlay).__name__}")
    merged = deep_merge(Params().model_dump(mode="json"), overlay)
    merged["profile"] = name
    return validate_params(merged, str(path))


def dump_params(params: Params) -> str:
    header = (
        "# Every knob of the pipeline. `sge-repro run all --profile NAME` rewrites this file as\n"
        "# the schema defaults (sge_repro/params.py) plus pipelines/profiles/NAME.yaml.\n"
        "# Edit freely: `dvc repro` reruns only the stages whose params changed.\n"
    )
    return header + yaml.dump(params.model_dump(mode="json"), Dumper=_ParamsDumper, sort_keys=False, width=100)


class _ParamsDumper(yaml.SafeDumper):
    """Block style for sections, one-line lists of scalars (`seeds: [0, 1, 2]`)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(item, (dict, list)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ParamsDumper.add_representer(list, _represent_list)
