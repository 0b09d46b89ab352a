"""The schema of params.yaml, profile overlays, and validation.

params.yaml holds every knob of the pipeline. The schema's defaults ARE the embedded profile;
a profile in pipelines/profiles/NAME.yaml is a partial overlay on those defaults. Each DVC stage
lists the params.yaml sections it reads, so changing one knob reruns only those stages.

Any problem (unknown key, wrong type, unknown model) raises `UserError` naming the key.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from sge_repro.detection.detectors import DETECTORS, PROTOCOLS, REFERENCE_TWO_STAGE_LR, protocol_weights_source
from sge_repro.errors import UserError, not_utf8

PARAMS_FILE = Path("params.yaml")
RELEASED_SEED = 0  # a released classifier is one run: its files are named as seed 0
PROFILES_DIR = Path("pipelines") / "profiles"


class Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    # Strict types: `epochs: true` or `epochs: "3"` is an error, not 1 or 3 (an int where a float
    # is expected stays accepted: `lr: 1` is natural YAML).
    # No NaN or infinity (`lr: .inf` is valid YAML): no setting here means either.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


# detectron2 reads a negative seed as "pick one at random": a seed is >= 0.
Seed = Annotated[int, Field(ge=0)]
# What the engines run on ("cuda": each process's own GPU, cuda:LOCAL_RANK).
Device = Annotated[str, Field(pattern=r"^(cpu|cuda(:[0-9]+)?)$", description="cpu, cuda or cuda:<index>")]
# Data-loader worker processes of a classification stage: a count, or "auto" (from the cores this
# process may use and the processes on this node: sge_repro.classification.sampling.resolve_workers).
Workers = Annotated[int, Field(ge=0)] | Literal["auto"]
# How images become pixels (sge_repro/classification/transforms.py): torchvision's libjpeg-turbo decode and
# uint8 tensor resize (faster), or PIL's decode and resize (bit for bit what runs before this option did).
Decoder = Literal["torchvision", "pil"]


def _renamed_amp(value: Any) -> Any:
    """amp was 'off' | bf16 | fp16 until DVC experiments showed the trouble: a YAML writer that
    drops the quotes (DVC's, on `dvc exp run -S`) turns 'off' into the boolean false."""
    if value == "off" or value is False:
        got = "'off'" if value == "off" else "false (an unquoted off, as YAML reads it)"
        raise ValueError(f"got {got}: 'off' is now called fp32 (a value no YAML writer can turn into a "
                         "boolean); expected fp32, bf16 or fp16")
    return value


# Mixed precision: fp32 (none), bf16 or fp16 (CUDA, with loss scaling); see classification/precision.py.
Amp = Annotated[Literal["fp32", "bf16", "fp16"], BeforeValidator(_renamed_amp)]


def _image_size(minimum: int) -> Any:
    """A generated image's size: N (N x N pixels) or [width, height], each side at least `minimum`."""
    def check(value: Any) -> Any:
        sides = value if isinstance(value, list) and len(value) == 2 else [value]
        if not all(type(side) is int for side in sides):  # bool is an int subclass, not a size
            raise ValueError(f"expected a size in pixels or [width, height], got {value!r}")
        if min(sides) < minimum:
            raise ValueError(f"expected at least {minimum} pixels per side, got {value!r}")
        return value
    return Annotated[int | list[int], BeforeValidator(check)]


ClassificationImageSize = _image_size(16)
DetectionImageSize = _image_size(32)


class ClassificationData(Section):
    source: Literal["synthetic", "imagenet"] = "synthetic"
    source_path: str | None = Field(None, description="ImageNet ImageFolder tree or the three official archives")
    subset_classes: list[str] | None = Field(None, description="ImageNet synsets to use (default: all 1000)")
    num_classes: int = Field(10, ge=2)
    image_size: ClassificationImageSize = Field(64, description="pixels (square) or [width, height]")
    train_per_class: int = Field(150, ge=1)
    val_per_class: int = Field(30, ge=1)
    # Quick runs on part of a split (a CPU rehearsal, a look at some of ImageNet val): every reader
    # takes the same evenly spaced images (sge_repro.data.manifest.evenly_spaced). None: the whole split.
    max_train_images: int | None = Field(None, ge=1, description="train on at most this many images (None: all)")
    max_val_images: int | None = Field(None, ge=1, description="validate on at most this many images (None: all)")

    @property
    def dataset_name(self) -> str:
        return "embedded" if self.source == "synthetic" else "imagenet"


class DetectionData(Section):
    source: Literal["synthetic", "coco"] = "synthetic"
    source_path: str | None = Field(None, description="COCO 2017 root (train2017/, annotations/)")
    num_train: int = Field(240, ge=1)
    num_val: int = Field(60, ge=1)
    image_size: DetectionImageSize = Field(128, description="pixels (square) or [width, height]")
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
    # The paper's SGE ablations; the defaults are the paper's module (sge_repro.models.sge.DEFAULT_*:
    # not imported here, params.py stays free of torch; tests/test_params.py checks they agree).
    sge_weight_init: float = Field(0.0, description="initial SGE gamma of every group (0 in the paper)")
    sge_bias_init: float = Field(1.0, description="initial SGE beta of every group (1 in the paper)")
    sge_normalize: bool = Field(True, description=(
        "SGE's spatial normalisation of the similarity; false: the raw similarity goes into gamma / beta"))

    def model_kwargs(self) -> dict:
        """Architecture knobs shared by the classifier and its detector backbone."""
        return {"width": self.width, "groups": self.groups, "sge_impl": self.sge_impl, **self.sge_variant()}

    def sge_variant(self) -> dict:
        """The SGE ablation knobs, named as create_model's kwargs."""
        return {"sge_weight_init": self.sge_weight_init, "sge_bias_init": self.sge_bias_init,
                "sge_normalize": self.sge_normalize}


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
    amp: Amp = "fp32"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = Field(False, description=(
        "BatchNorm statistics over the global batch of all processes (torch SyncBatchNorm on CUDA, "
        "GlobalBatchNorm2d on CPU/gloo): N processes then train what one process trains on the same "
        "batch_size. No effect in a single process"))
    deterministic: bool = Field(True, description=(
        "deterministic kernels, no cudnn autotuning: reruns repeat bit for bit; false = cudnn.benchmark "
        "(faster on GPU). Not part of the resume recipe: it changes float rounding, not what is trained"))
    workers: Workers = 0
    decoder: Decoder = "torchvision"
    device: Device = "cpu"

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainClsParams":
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs}: expected 0 <= warmup_epochs <= epochs "
                             f"({self.epochs})")
        return self


class EvalClsParams(Section):
    batch_size: int = Field(128, ge=1)
    image_size: int = Field(64, ge=16)
    amp: Amp = "fp32"
    channels_last: bool = False
    workers: Workers = 0
    decoder: Decoder = "torchvision"
    device: Device = "cpu"


ConvertSource = Literal["trained", "file", "torchvision"]


class TorchvisionWeights(Section):
    url: str = Field(pattern=r"^https?://")
    sha256: str = Field(pattern=r"^[0-9a-f]{8,64}$", description="the file's SHA-256 or its leading hex digits (>= 8)")


class ConvertInput(Section):
    """What one convert@<backbone>-<seed> stage reads (derived; see ConvertParams.inputs)."""

    model: str
    seed: Seed
    source: ConvertSource
    path: str = Field(description="the stage's DVC dependency: runs/cls/<run>, the given file, or the fetched torchvision file")
    checkpoint: Literal["best", "last"] | None = Field(None, description="source trained: which checkpoint of the run")


class DetectionRun(Section):
    """What one train_det@ / eval_det@<detector>-<backbone>-<seed> stage runs (derived; see Params.detection_runs)."""

    detector: str
    backbone: str
    seed: Seed


class ConvertParams(Section):
    checkpoint: Literal["best", "last"] = "best"
    source: ConvertSource = Field("trained", description=(
        "where every backbone's ImageNet weights come from: trained (our train_cls run), file (convert.files), "
        "torchvision (torchvision's ImageNet weights; resnet50 / resnet101)"))
    sources: dict[str, ConvertSource] = Field(default_factory=dict, description="per-backbone override of source")
    files: dict[str, str] = Field(default_factory=dict, description=(
        "backbone -> checkpoint file (ours, a torchvision state dict or the authors' release); every backbone "
        "whose source is file, and only those"))
    torchvision_weights: dict[str, TorchvisionWeights] = Field(default_factory=dict, description=(
        "replaces the pinned URL / checksum of torchvision's weights (sge_repro.models.torchvision_weights)"))
    # Derived from the keys above, detection_backbones and seeds (dvc.yaml's convert / fetch_weights
    # stages iterate over them); written by sge-repro, never edited by hand: a copy that disagrees is an error.
    inputs: dict[str, ConvertInput] | None = None
    downloads: dict[str, TorchvisionWeights] | None = None


class TrainDetParams(Section):
    protocol: Literal[PROTOCOLS] = Field("detectron2", description=(  # type: ignore[valid-type]
        "detectron2 (its defaults), authors (the authors' mmdetection-2019 settings, plain backbones from "
        "torchvision, attention backbones from the authors' checkpoint) or controlled (detectron2's settings, "
        "both backbones from our own runs); see sge_repro.detection.detectors.PROTOCOLS"))
    max_iter: int = Field(300, ge=1)
    ims_per_batch: int = Field(8, ge=1)
    base_lr: float = Field(0.02, gt=0, description=(
        f"the two-stage (R-CNN) lr; each detector trains at base_lr * its YAML's SOLVER.BASE_LR / "
        f"{REFERENCE_TWO_STAGE_LR} (sge_repro.detection.detectors.detector_base_lr): RetinaNet at half"))
    warmup_iters: int | None = Field(None, ge=0, description=(
        "linear warmup length; null = the protocol YAML's (500 from 1/3 at COCO scale, as the authors)"))
    min_size: int = Field(128, ge=32)
    max_size: int = Field(128, ge=32)
    checkpoint_period: int = Field(100, ge=1)
    workers: int = Field(0, ge=0)
    device: Device = "cpu"
    keep_checkpoints: int = Field(2, ge=1, description="periodic checkpoints kept (newest); model_final always")
    deterministic: bool = Field(True, description="cudnn without autotuning (detectron2 CUDNN_BENCHMARK off)")


class EvalDetParams(Section):
    device: Device = "cpu"


class ReportParams(Section):
    tolerance: float = Field(0.3, ge=0, description="points within which a paper number counts as reproduced")
    bootstrap_samples: int = Field(2000, ge=100)
    seed: Seed = 0


# Raw sbatch options the launcher sets itself (from launch.* or for its own bookkeeping).
_SLURM_RESERVED = {"nodes", "ntasks", "ntasks-per-node", "cpus-per-task", "mem", "mem-per-cpu", "mem-per-gpu",
                   "time", "partition", "account", "job-name", "output", "error", "open-mode", "signal", "array",
                   "gpus-per-node", "gpus-per-task", "wrap", "chdir"}


class SlurmParams(Section):
    """How a training stage's SLURM job is requested (launch.launcher: slurm)."""

    partition: str | None = Field(None, description="sbatch --partition (none: the cluster's default)")
    account: str | None = Field(None, description="sbatch --account (none: the user's default)")
    time_limit: str = Field("72:00:00", pattern=r"^(\d+-)?\d+(:\d+){0,2}$|^(UNLIMITED|unlimited|INFINITE|infinite)$",
                            description="sbatch --time: minutes, [days-]hours:minutes:seconds, ...")
    cpus_per_task: int = Field(8, ge=1, description="CPU cores per task (one task per GPU); data loading workers use them")
    mem_per_task: str = Field("64G", pattern=r"^[1-9][0-9]*[KMGT]?$",
                              description="memory per task, in SLURM's units (K, M, G, T; M without a unit)")
    extra_options: list[str] = Field(default_factory=list, description=(
        'raw sbatch long options, e.g. ["--qos=high", "--constraint=a100"]'))

    @model_validator(mode="after")
    def _check_options(self) -> "SlurmParams":
        for option in self.extra_options:
            key = option[2:].split("=", 1)[0]
            if not option.startswith("--") or not key or not key.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"extra_options: {option!r}: expected a long sbatch option such as "
                                 "'--qos=high' or '--exclusive'")
            if key.replace("_", "-") in _SLURM_RESERVED:
                raise ValueError(f"extra_options: {option!r}: --{key} is set by the launcher (from launch.nodes, "
                                 "launch.nproc_per_node and launch.slurm.*); set it there")
        return self


class LaunchParams(Section):
    """How each training stage starts its processes (sge_repro.launch). Not a dependency of any stage
    in dvc.yaml: the outputs are a single process's files however many processes computed them."""

    launcher: Literal["local", "slurm"] = Field("local", description=(
        "local: this machine (torch's elastic launcher); slurm: one SLURM job per training stage"))
    nproc_per_node: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(1, description=(
        "processes per node: an int >= 1, or auto = every visible CUDA GPU (1 without CUDA)"))
    nodes: int = Field(1, ge=1, description="> 1 only with launcher slurm")
    slurm: SlurmParams = SlurmParams()

    @field_validator("nproc_per_node", mode="before")
    @classmethod
    def _int_or_auto(cls, value: Any) -> Any:
        if value == "auto" or (type(value) is int and value >= 1):
            return value
        raise ValueError(f"expected an int >= 1 or 'auto', got {value!r}")

    @model_validator(mode="after")
    def _cross_checks(self) -> "LaunchParams":
        if self.nodes > 1 and self.launcher != "slurm":
            raise ValueError(f"nodes={self.nodes}: more than one node needs launcher: slurm "
                             f"(got launcher: {self.launcher})")
        return self


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
        from sge_repro.paths import ProjectPaths

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


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core schema for plain scalars, as DVC reads and writes
    params.yaml (ruamel.yaml): only true/false are booleans, `1e-05` is a float, `010` is ten, and
    on / off / yes / no / dates stay strings. So a value DVC writes back without quotes
    (`dvc exp run -S key=value`) means here what it meant to DVC. A key given twice in one mapping
    is an error, as it is to DVC (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: PyYAML's own error names it
                break
            if first != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {first + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                           "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                   list("-+0123456789"))
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


def _yaml12_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = loader.construct_scalar(node).lower()
    return {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}.get(text) or float(text)


Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _yaml12_float)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        raise not_utf8(path, error, "a UTF-8 YAML file") from None
    try:
        return yaml.load(text, Loader=Yaml12Loader) or {}
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


def profile_overlay(name: str, profiles_dir: Path = PROFILES_DIR, _seen: tuple[str, ...] = ()) -> dict:
    """The keys profile `name` sets: its file, on top of the profile it `extends` (if any)."""
    path = profiles_dir / f"{name}.yaml"
    if not path.exists():
        allowed = ", ".join(available_profiles(profiles_dir)) or "none found"
        raise UserError(f"unknown profile {name!r}: no {path} (available: {allowed})")
    overlay = read_yaml(path)
    if not isinstance(overlay, dict):
        raise UserError(f"{path}: expected a mapping, got {type(overlay).__name__}")
    base = overlay.pop("extends", None)
    if base is None:
        return overlay
    if not isinstance(base, str) or base in (*_seen, name):
        raise UserError(f"{path}: extends: expected the name of another profile that does not extend this one, "
                        f"got {base!r}")
    return deep_merge(profile_overlay(base, profiles_dir, (*_seen, name)), overlay)


def profile_params(name: str, profiles_dir: Path = PROFILES_DIR) -> Params:
    """Schema defaults with the profile's overlay applied (and `profile: name` set)."""
    merged = deep_merge(without_derived(Params().model_dump(mode="json")), profile_overlay(name, profiles_dir))
    merged["profile"] = name
    return validate_params(merged, str(profiles_dir / f"{name}.yaml"))


DERIVED_KEYS = (("convert", "inputs"), ("convert", "downloads"), ("detection_runs",))


def _derived_value(raw: dict, path: tuple[str, ...]) -> Any:
    for name in path:
        if not isinstance(raw, dict):
            return None
        raw = raw.get(name)
    return raw


def without_derived(raw: dict) -> dict:
    """A copy of raw params without the keys sge-repro derives (they are computed on validation)."""
    raw = copy.deepcopy(raw)
    for *sections, key in DERIVED_KEYS:
        owner = _derived_value(raw, tuple(sections))
        if isinstance(owner, dict):
            owner.pop(key, None)
    return raw


def set_values(raw: dict, assignments: list[str]) -> dict:
    """A copy of raw params with each `KEY=VALUE` applied, as DVC's `-S` spells them: a dotted key
    (`train_cls.lr`, `seeds`) and a YAML value (`[0, 1]`, `0.1`, `fp32`), read as params.yaml is."""
    raw = copy.deepcopy(raw)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        names = key.strip().split(".")
        if not sep or not all(names):
            raise UserError(f"-S {assignment!r}: expected KEY=VALUE with a dotted params.yaml key, e.g. "
                            "train_cls.lr=0.1 or 'seeds=[0, 1]'")
        try:
            value = yaml.load(text, Loader=Yaml12Loader)
        except yaml.YAMLError as exc:
            raise UserError(f"-S {assignment!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
        section = raw
        for depth, name in enumerate(names[:-1]):
            section = section.setdefault(name, {})
            if not isinstance(section, dict):
                raise UserError(f"-S {assignment!r}: {'.'.join(names[:depth + 1])} is a value, not a section")
        section[names[-1]] = value
    return raw


def refresh_params_file(path: Path = PARAMS_FILE) -> bool:
    """Rewrite params.yaml if its derived keys disagree with the rest (a hand edit of convert.sources,
    detection_backbones, seeds, ...); True if rewritten. Anything else wrong is a UserError."""
    raw = read_yaml(path)
    if not isinstance(raw, dict) or any(key not in raw for key in Params.model_fields):
        return False  # empty or partial: load_params names what is missing, nothing is filled in here
    params = validate_params(without_derived(raw), str(path))
    fresh = yaml.safe_load(dump_params(params))
    stale = any(_derived_value(raw, key) != _derived_value(fresh, key) for key in DERIVED_KEYS)
    if stale:
        from sge_repro import atomic

        atomic.write_text(path, dump_params(params))
    return stale


def dump_params(params: Params) -> str:
    header = (
        "# Every knob of the pipeline. `sge-repro run all --profile NAME` rewrites this file as\n"
        "# the schema defaults (sge_repro/params.py) plus pipelines/profiles/NAME.yaml.\n"
        "# Edit freely: `dvc repro` reruns only the stages whose params changed.\n"
    )
    data = params.model_dump(mode="json")
    # derived keys are written as derived from the rest, also for params changed with model_copy
    # (which does not validate again)
    data["convert"]["inputs"] = {key: value.model_dump(mode="json") for key, value in params.convert_inputs().items()}
    data["convert"]["downloads"] = {key: value.model_dump(mode="json")
                                    for key, value in params.convert_downloads().items()}
    data["detection_runs"] = {key: _OneLine(value.model_dump(mode="json"))
                              for key, value in params.detection_run_stages().items()}
    return header + yaml.dump(data, Dumper=_ParamsDumper, sort_keys=False, width=100)


class _ParamsDumper(yaml.SafeDumper):
    """Block style for sections, one-line lists of scalars (`seeds: [0, 1, 2]`)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(item, (dict, list)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


class _OneLine(dict):
    """A mapping written on one line (`{detector: retinanet, backbone: resnet50, seed: 0}`)."""


_ParamsDumper.add_representer(list, _represent_list)
_ParamsDumper.add_representer(_OneLine, lambda dumper, data: dumper.represent_mapping(
    "tag:yaml.org,2002:map", data.items(), flow_style=True))
