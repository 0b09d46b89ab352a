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
from sge_repro.params_sections import (ConvertInput, ConvertParams, ConvertSource, DataParams, DetectionRun,
                                       EvalClsParams, EvalDetParams, LaunchParams, ModelParams, ReportParams,
                                       Section, Seed, TorchvisionWeights, TrainClsParams, TrainDetParams)
from sge_repro.paths import ProjectPaths

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
    detectors: list[str] = Field(default_factory=lambda: ["faster_rcnn", "retinanet"], min_length=1)
    detection_backbones: list[str] = Field(
        default_factory=lambda: ["resnet18", "sge_resnet18"], min_length=1
    )
    detection_pairs: list[str] | None = Field(None, description=(
        "the DETECTOR-BACKBONE pairs to train (e.g. retinanet-sge_resnet50), each of every seed; none: every "
        "detector with every backbone"))
    # Derived from detectors, detection_backbones, detection_pairs and seeds (dvc.yaml's train_det /
    # eval_det stages iterate over it); written by sge-repro, never edited by hand.
    detection_runs: dict[str, DetectionRun] | None = None
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train_cls: TrainClsParams = TrainClsParams()
    eval_cls: EvalClsParams = EvalClsParams()
    convert: ConvertParams = ConvertParams()
    train_det: TrainDetParams = TrainDetParams()
    eval_det: EvalDetParams = EvalDetParams()
    report: ReportParams = ReportParams()
    launch: LaunchParams = LaunchParams()

    def convert_source(self, backbone: str) -> ConvertSource:
        """Where `backbone`'s detector weights come from: convert.sources[backbone], else convert.source."""
        return self.convert.sources.get(backbone, self.convert.source)

    def require_listed(self, key: str, value: str | int) -> None:
        """A stage's matrix item must be one of params.yaml's lists (models, seeds, ...)."""
        allowed = getattr(self, key)
        if value not in allowed:
            raise UserError(f"params.yaml: {key}: {value!r} is not listed (listed: {', '.join(map(str, allowed))})")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        from sge_repro.models.registry import NAME_HELP, parse_model_name

        for key, names in (("models", self.models), ("released", list(self.released))):
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
        for name in self.detectors:
            if name not in DETECTORS:
                raise ValueError(f"detectors: unknown detector {name!r} (allowed: {', '.join(DETECTORS)})")
        self._check_protocol_sources()  # first: under a protocol its message is the one that helps
        self._check_convert_sources()
        for key in ("seeds", "models", "detectors", "detection_backbones", "detection_pairs"):
            values = getattr(self, key) or []
            if len(set(values)) != len(values):
                raise ValueError(f"{key}: duplicate entries in {values}")
        self._check_detection_pairs()
        self._check_derived(self.convert, "convert.inputs", self.convert_inputs())
        self._check_derived(self.convert, "convert.downloads", self.convert_downloads())
        self._check_derived(self, "detection_runs", self.detection_run_stages())
        return self

    def pairs(self) -> list[tuple[str, str]]:
        """The (detector, backbone) pairs trained and evaluated, in dvc.yaml's order."""
        if self.detection_pairs is None:
            return [(d, b) for d in self.detectors for b in self.detection_backbones]
        return [tuple(pair.split("-", 1)) for pair in self.detection_pairs]  # type: ignore[misc]

    def detection_run_stages(self) -> dict[str, DetectionRun]:
        return {f"{d}-{b}-{seed}": DetectionRun(detector=d, backbone=b, seed=seed)
                for d, b in self.pairs() for seed in self.seeds}

    def require_pair(self, detector: str, backbone: str) -> None:
        """A train_det / eval_det run must be one of the pairs params.yaml asks for."""
        if (detector, backbone) not in self.pairs():
            listed = ", ".join(f"{d}-{b}" for d, b in self.pairs())
            raise UserError(f"params.yaml: detection_pairs: {detector}-{backbone} is not a pair run here "
                            f"(pairs: {listed})")

    def _check_detection_pairs(self) -> None:
        if self.detection_pairs is None:
            return
        for pair in self.detection_pairs:
            detector, _, backbone = pair.partition("-")
            if detector not in self.detectors or backbone not in self.detection_backbones:
                raise ValueError(f"detection_pairs: {pair!r}: expected DETECTOR-BACKBONE with the detector from "
                                 f"detectors {self.detectors} and the backbone from detection_backbones "
                                 f"{self.detection_backbones}")
        used = {part for pair in self.pairs() for part in pair}
        for key in ("detectors", "detection_backbones"):
            unused = [name for name in getattr(self, key) if name not in used]
            if unused:
                raise ValueError(f"{key}: {', '.join(unused)} in no detection_pairs entry (add a pair or remove it)")

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
                    f"expected {expected!r} (set convert.sources: {{{name}: {expected}}})")

    def convert_input(self, backbone: str, seed: int) -> ConvertInput:
        """The one input of convert@<backbone>-<seed> (paths relative to the project root)."""
        paths = ProjectPaths(Path("."))
        source = self.convert_source(backbone)
        if source == "trained":
            return ConvertInput(model=backbone, seed=seed, source=source,
                                path=paths.cls_run_dir(backbone, seed).as_posix(), checkpoint=self.convert.checkpoint)
        if source == "file":
            return ConvertInput(model=backbone, seed=seed, source=source, path=self.convert.files[backbone])
        return ConvertInput(model=backbone, seed=seed, source=source, path=paths.torchvision_weights(backbone).as_posix())

    def convert_inputs(self) -> dict[str, ConvertInput]:
        return {f"{backbone}-{seed}": self.convert_input(backbone, seed)
                for backbone in self.detection_backbones for seed in self.seeds}

    def convert_downloads(self) -> dict[str, TorchvisionWeights]:
        """The torchvision weight files to fetch: one per backbone whose source is torchvision."""
        from sge_repro.models.torchvision_weights import TORCHVISION_IMAGENET_WEIGHTS

        downloads = {}
        for backbone in self.detection_backbones:
            if self.convert_source(backbone) == "torchvision":
                url, sha256 = TORCHVISION_IMAGENET_WEIGHTS[backbone]
                downloads[backbone] = self.convert.torchvision_weights.get(
                    backbone, TorchvisionWeights(url=url, sha256=sha256))
        return downloads

    def _check_convert_sources(self) -> None:
        from sge_repro.models.torchvision_weights import TORCHVISION_IMAGENET_WEIGHTS

        convert = self.convert
        for name in convert.sources:
            if name not in self.detection_backbones:
                raise ValueError(f"convert.sources: {name!r} is not in detection_backbones {self.detection_backbones}")
        for name in convert.torchvision_weights:
            if name not in TORCHVISION_IMAGENET_WEIGHTS:
                raise ValueError(f"convert.torchvision_weights: {name!r}: torchvision weights exist for "
                                 f"{', '.join(TORCHVISION_IMAGENET_WEIGHTS)} only")
        for name in self.detection_backbones:
            source = self.convert_source(name)
            if source == "trained" and name not in self.models:
                raise ValueError(
                    f"detection_backbones: {name!r} is not among models {self.models} (its convert source is "
                    "trained: a detector backbone starts from a classifier trained here; or set "
                    f"convert.sources.{name} to file / torchvision)")
            if source == "file" and not convert.files.get(name):
                raise ValueError(f"convert.files: no file for {name!r}, whose convert source is file")
            if source == "torchvision" and name not in TORCHVISION_IMAGENET_WEIGHTS:
                raise ValueError(f"convert.sources: {name!r} cannot come from torchvision (torchvision's ImageNet "
                                 f"weights exist for {', '.join(TORCHVISION_IMAGENET_WEIGHTS)} only)")
        for name in convert.files:
            if name not in self.detection_backbones or self.convert_source(name) != "file":
                raise ValueError(f"convert.files: {name!r} is not a detection backbone whose convert source is file "
                                 "(remove the entry, or set its source to file)")

    @staticmethod
    def _check_derived(owner: BaseModel, dotted: str, computed: dict) -> None:
        key = dotted.rpartition(".")[2]
        given = getattr(owner, key)
        if given is None:
            setattr(owner, key, computed)
        elif given != computed:
            raise ValueError(f"{dotted}: out of date with convert / detectors / detection_backbones / "
                             "detection_pairs / seeds (sge-repro derives it; `sge-repro run` rewrites it, or "
                             "delete the key)")


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
