"""The schema of params.yaml (`Params`: its sections, in params_sections, and the checks that span
sections) and its validation; reading and writing the file and the profiles: params_yaml.

params.yaml holds every knob of the pipeline. The schema's defaults ARE the embedded profile;
a profile in pipelines/profiles/NAME.yaml is a partial overlay on those defaults. Each DVC stage
lists the params.yaml sections it reads, so changing one knob reruns only those stages.

Any problem (unknown key, wrong type, unknown model) raises `UserError` naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from sge_repro.detection.detectors import DETECTORS, protocol_weights_source
from sge_repro.errors import UserError
from sge_repro.params_sections import (ConvertParams, ConvertSource, DataParams, DetectionParams, EvalClsParams,
                                       EvalDetParams, LaunchParams, ModelParams, ReportParams, Section, Seed,
                                       TorchvisionWeights, TrainClsParams, TrainDetParams)

# sge_repro.models.* is imported inside the checks that need it: importing any of it runs the package's
# __init__, which imports torch, and the CLI's entry imports this module without torch.

PARAMS_FILE = Path("params.yaml")
RELEASED_SEED = 0  # a released classifier is one run: its files are named as seed 0
PROFILES_DIR = Path("pipelines") / "profiles"


class Params(Section):
    profile: str = "embedded"
    cpu_threads: int = Field(2, ge=1, description=(
        "torch threads on CPU, per node (split over the processes a stage launches there); "
        "CPU runs repeat bit for bit at a fixed count"))
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    models: list[str] = Field(default_factory=lambda: ["resnet18", "sge_resnet18"], description=(
        "classifiers trained here (may be empty when `released` names the classifiers)"))
    released: dict[str, str] = Field(default_factory=dict, description=(
        "classifiers NOT trained here: model name -> checkpoint file (the authors' release, a torchvision "
        "state dict, or ours), evaluated as run seed 0 (stages import_cls, eval_released)"))
    detection: DetectionParams = DetectionParams()
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train_cls: TrainClsParams = TrainClsParams()
    eval_cls: EvalClsParams = EvalClsParams()
    convert: ConvertParams = ConvertParams()
    train_det: TrainDetParams = TrainDetParams()
    eval_det: EvalDetParams = EvalDetParams()
    report: ReportParams = ReportParams()
    launch: LaunchParams = LaunchParams()

    @property
    def detectors(self) -> list[str]:
        """The detectors that train with at least one backbone."""
        return [name for name in DETECTORS if getattr(self.detection, name)]

    @property
    def detection_backbones(self) -> list[str]:
        return list(dict.fromkeys(backbone for _, backbone in self.pairs()))

    def pairs(self) -> list[tuple[str, str]]:
        """The (detector, backbone) pairs trained and evaluated, in dvc.yaml's order."""
        return [(name, backbone) for name in DETECTORS for backbone in getattr(self.detection, name)]

    def convert_source(self, backbone: str) -> ConvertSource:
        """Where `backbone`'s detector weights come from (the convert list that names it)."""
        source = self.convert.source(backbone)
        if source is None:
            raise UserError(f"params.yaml: convert: {backbone!r} is in no list (trained, files, torchvision)")
        return source

    def torchvision_weights(self, backbone: str) -> TorchvisionWeights:
        """The URL and checksum of torchvision's weights of `backbone`: pinned, or convert.torchvision_weights'."""
        from sge_repro.models.torchvision_weights import TORCHVISION_IMAGENET_WEIGHTS

        url, sha256 = TORCHVISION_IMAGENET_WEIGHTS[backbone]
        return self.convert.torchvision_weights.get(backbone, TorchvisionWeights(url=url, sha256=sha256))

    def require_listed(self, key: str, value: str | int) -> None:
        """A stage's matrix item must be one of params.yaml's lists (models, seeds, ...)."""
        allowed = getattr(self, key)
        if value not in allowed:
            raise UserError(f"params.yaml: {key}: {value!r} is not listed (listed: {', '.join(map(str, allowed))})")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        from sge_repro.models.registry import NAME_HELP, parse_model_name

        named = [("models", self.models), ("released", list(self.released))]
        named += [(f"detection.{name}", getattr(self.detection, name)) for name in DETECTORS]
        for key, names in named:
            for name in names:
                try:
                    parse_model_name(name)
                except UserError:
                    raise ValueError(f"{key}: unknown model {name!r}; {NAME_HELP}") from None
        if not self.models and not self.released:
            raise ValueError("models: empty, and no released checkpoints; expected at least one classifier")
        both = [name for name in self.released if name in self.models]
        if both:
            raise ValueError(f"released: {', '.join(both)} also in models; a classifier is either trained here "
                             "or given as a file")
        empty = [name for name, path in self.released.items() if not path]
        if empty:
            raise ValueError(f"released: {empty[0]!r} has no checkpoint path")
        self._check_sge_groups()
        lists = {"seeds": self.seeds, "models": self.models, "convert.trained": self.convert.trained,
                 "convert.torchvision": self.convert.torchvision}
        lists.update({f"detection.{name}": getattr(self.detection, name) for name in DETECTORS})
        for key, values in lists.items():
            if len(set(values)) != len(values):
                raise ValueError(f"{key}: duplicate entries in {values}")
        if not self.pairs():
            raise ValueError(f"detection: no detector has a backbone; expected a backbone in at least one of "
                             f"{', '.join(DETECTORS)}")
        self._check_convert_sources()
        self._check_protocol_sources()
        return self

    def require_pair(self, detector: str, backbone: str) -> None:
        """A detector's run must be one params.yaml asks for."""
        if detector not in DETECTORS:
            raise UserError(f"params.yaml: detection: unknown detector {detector!r} (allowed: {', '.join(DETECTORS)})")
        if (detector, backbone) not in self.pairs():
            raise UserError(f"params.yaml: detection.{detector}: {backbone!r} is not listed (listed: "
                            f"{', '.join(getattr(self.detection, detector)) or 'none'})")

    def _check_sge_groups(self) -> None:
        """G must divide the channels of every SGE block of every model built from model.* (the
        smallest, layer1's, decides: the others are its multiples)."""
        from sge_repro.models.registry import sge_channels

        for name in dict.fromkeys([*self.models, *self.detection_backbones]):
            channels = sge_channels(name, self.model.width)
            if channels and channels[0] % self.model.groups:
                raise ValueError(f"model.groups: {self.model.groups} does not divide the channels of {name}'s SGE "
                                 f"blocks at model.width {self.model.width} ({', '.join(map(str, channels))}); "
                                 f"expected a divisor of {channels[0]}")

    def _check_protocol_sources(self) -> None:
        """The protocol fixes where each detector backbone starts from (its convert source)."""
        from sge_repro.models.registry import parse_model_name

        protocol = self.train_det.protocol
        for name in self.detection_backbones:
            expected = protocol_weights_source(protocol, parse_model_name(name).attention == "none")
            source = self.convert_source(name)
            if expected is not None and source != expected:
                why = ("plain backbones from torchvision's weights, attention backbones from the authors' "
                       "checkpoint file" if protocol == "authors" else "both backbones from our own training runs")
                raise ValueError(
                    f"train_det.protocol {protocol} starts {why}: convert source of {name!r} is {source!r}, "
                    f"expected {expected!r} (list it in convert.{_SOURCE_LISTS[expected]})")

    def _check_convert_sources(self) -> None:
        from sge_repro.models.torchvision_weights import TORCHVISION_IMAGENET_WEIGHTS

        convert, backbones = self.convert, self.detection_backbones
        given = {"trained": convert.trained, "files": list(convert.files), "torchvision": convert.torchvision}
        for key, names in given.items():
            for name in names:
                if name not in backbones:
                    raise ValueError(f"convert.{key}: {name!r} is not a backbone of any detector in detection "
                                     f"(backbones: {', '.join(backbones)})")
                other = next((k for k, v in given.items() if k != key and name in v), None)
                if other:
                    raise ValueError(f"convert.{key}: {name!r} is also in convert.{other}; expected one source")
        for name in backbones:
            if convert.source(name) is None:
                raise ValueError(f"detection: backbone {name!r} has no weights: list it in convert.trained (a "
                                 "classifier trained here), convert.files or convert.torchvision")
        for name in convert.trained:
            if name not in self.models:
                raise ValueError(f"convert.trained: {name!r} is not among models {self.models} (a backbone from "
                                 "training starts from a classifier trained here)")
        for name in convert.torchvision:
            if name not in TORCHVISION_IMAGENET_WEIGHTS:
                raise ValueError(f"convert.torchvision: {name!r}: torchvision's ImageNet weights exist for "
                                 f"{', '.join(TORCHVISION_IMAGENET_WEIGHTS)} only")
        for name, path in convert.files.items():
            if not path:
                raise ValueError(f"convert.files: {name!r} has no file path")
        for name in convert.torchvision_weights:
            if name not in convert.torchvision:
                raise ValueError(f"convert.torchvision_weights: {name!r} is not in convert.torchvision")


_SOURCE_LISTS = {"trained": "trained", "file": "files", "torchvision": "torchvision"}
# dvc.yaml's convert stage of each source (they differ in their one dependency)
CONVERT_STAGES = {"trained": "convert", "file": "convert_file", "torchvision": "convert_torchvision"}


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
