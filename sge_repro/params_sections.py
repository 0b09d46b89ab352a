"""The sections of params.yaml (one pydantic model each) and the value types they share; `Params`
(sge_repro.params) holds them and checks what spans sections."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from sge_repro.detection.detectors import PROTOCOLS, REFERENCE_TWO_STAGE_LR


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


class DetectionParams(Section):
    """Which backbones each detector trains with, each once per seed (dvc.yaml: one train_<detector> /
    eval_<detector> stage per listed backbone and seed). An empty list: the detector does not run."""

    faster_rcnn: list[str] = Field(default_factory=lambda: ["resnet18", "sge_resnet18"])
    mask_rcnn: list[str] = Field(default_factory=list)
    cascade_rcnn: list[str] = Field(default_factory=list)
    retinanet: list[str] = Field(default_factory=lambda: ["resnet18", "sge_resnet18"])


class ConvertParams(Section):
    """Where each detection backbone's ImageNet weights come from: one of the three lists names it."""

    checkpoint: Literal["best", "last"] = "best"
    trained: list[str] = Field(default_factory=lambda: ["resnet18", "sge_resnet18"], description=(
        "backbones from this project's classifier of the same seed (runs/cls/<backbone>-seed<seed>)"))
    files: dict[str, str] = Field(default_factory=dict, description=(
        "backbone -> checkpoint file (ours, a torchvision state dict or the authors' release), the same for every seed"))
    torchvision: list[str] = Field(default_factory=list, description=(
        "backbones from torchvision's ImageNet weights (resnet50 / resnet101), fetched and checksum-verified"))
    torchvision_weights: dict[str, TorchvisionWeights] = Field(default_factory=dict, description=(
        "replaces the pinned URL / checksum of torchvision's weights (sge_repro.models.torchvision_weights)"))

    def source(self, backbone: str) -> ConvertSource | None:
        if backbone in self.trained:
            return "trained"
        if backbone in self.files:
            return "file"
        return "torchvision" if backbone in self.torchvision else None


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
