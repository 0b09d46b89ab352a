"""The paper's figures and the authors' ImageNet training logs, shipped inside the package.

Source: `paper_results.yaml` (a copy of shared/reference/paper-results.yaml, the SGE paper's
repository README tables) and `official_logs/*.tsv` (the per-epoch logs released with the models).
Also the naming rules the report relies on: an attention model `<attn>_resnet<depth>` is compared
with its plain baseline `resnet<depth>`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import yaml

from sge_repro.errors import UserError
from sge_repro.models.registry import parse_model_name

PACKAGE = "sge_repro.report"
PAPER_RESULTS_FILE = "paper_results.yaml"
OFFICIAL_LOGS_DIR = "official_logs"

# Datasets on which the paper's absolute numbers apply (the others, e.g. "embedded", only allow
# comparing the sign and size of the gain over the plain baseline).
PAPER_CLS_DATASET = "imagenet"
PAPER_DET_DATASET = "coco"

BBOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# How the paper's COCO numbers were produced (paper-results.md, "COCO 2017 detection"): the
# authors' mmdetection (2019) fork with their settings, which protocol "authors" mirrors in
# detectron2. Absolute APs compare only for runs with this engine AND this protocol.
PAPER_DET_ENGINE = "mmdetection-2019"
PAPER_DET_PROTOCOL = "authors"


def detection_setup_difference(engine: str | None, protocol: str | None) -> str | None:
    """How a detection run's setup differs from the paper's (None: the same engine and protocol)."""
    parts = []
    if engine != PAPER_DET_ENGINE:
        parts.append(f"engine {engine or 'not recorded'}, not the paper's mmdetection 2019")
    if protocol != PAPER_DET_PROTOCOL:
        parts.append(f"protocol {protocol or 'not recorded'}, not the authors'")
    return "; ".join(parts) or None


def split_model_name(name: str) -> tuple[str | None, str, int | None]:
    """`sge_resnet50` -> ("sge", "resnet50", 50); `resnet18` -> (None, "resnet18", 18)."""
    try:
        parsed = parse_model_name(name)
    except UserError:
        return None, name, None
    return (None if parsed.attention == "none" else parsed.attention), parsed.plain, parsed.depth


def plain_baseline(name: str) -> str | None:
    """The plain model an attention model is compared with (None for a plain model)."""
    attention, base, _ = split_model_name(name)
    return base if attention is not None else None


def is_paper_dataset(dataset: str, kind: str) -> bool:
    """Whether absolute numbers on `dataset` are comparable with the paper ("cls" or "det")."""
    wanted = PAPER_CLS_DATASET if kind == "cls" else PAPER_DET_DATASET
    return dataset.lower().replace("_", "-").startswith(wanted)


@dataclass(frozen=True)
class PaperClassification:
    model: str
    params_m: float
    gflops: float
    top1: float
    top5: float


@dataclass(frozen=True)
class PaperDetection:
    detector: str
    backbone: str
    params_m: float
    gflops: float
    AP: float
    AP50: float
    AP75: float


@dataclass(frozen=True)
class PaperResults:
    source: str
    classification: dict[str, PaperClassification] = field(default_factory=dict)
    detection: dict[tuple[str, str], PaperDetection] = field(default_factory=dict)

    def cls_gain(self, model: str) -> float | None:
        """Paper top-1 of `model` minus that of its plain baseline (None if either is absent)."""
        plain = plain_baseline(model)
        if plain is None or model not in self.classification or plain not in self.classification:
            return None
        return self.classification[model].top1 - self.classification[plain].top1

    def det_gain(self, detector: str, backbone: str) -> float | None:
        plain = plain_baseline(backbone)
        ours, base = (detector, backbone), (detector, plain)
        if plain is None or ours not in self.detection or base not in self.detection:
            return None
        return self.detection[ours].AP - self.detection[base].AP

    def nearest_cls_gain(self, model: str) -> tuple[float, str] | None:
        """The paper's top-1 gain for the same attention at the nearest depth it reports.

        For models the paper does not have (e.g. the embedded `sge_resnet18`), this is the figure
        whose sign and size the report compares against. Returns (gain, paper model name).
        """
        candidates = [m for m in self.classification if self.cls_gain(m) is not None]
        chosen = _nearest(model, candidates)
        return None if chosen is None else (self.cls_gain(chosen), chosen)  # type: ignore[return-value]

    def nearest_det_gain(self, detector: str, backbone: str) -> tuple[float, str] | None:
        candidates = [b for d, b in self.detection if d == detector and self.det_gain(d, b) is not None]
        chosen = _nearest(backbone, candidates)
        return None if chosen is None else (self.det_gain(detector, chosen), chosen)  # type: ignore[return-value]


def _nearest(model: str, candidates: list[str]) -> str | None:
    """The candidate with the same attention prefix whose depth is closest (deeper on ties)."""
    attention, _, depth = split_model_name(model)
    if attention is None:
        return None
    if model in candidates:
        return model
    same_attention = [c for c in candidates if split_model_name(c)[0] == attention]
    if not same_attention or depth is None:
        return None
    return min(same_attention, key=lambda c: (abs((split_model_name(c)[2] or 0) - depth), -(split_model_name(c)[2] or 0)))


def _required(entry: dict, key: str, where: str):
    if key not in entry:
        raise UserError(f"{where}: missing key '{key}' in {entry!r}")
    return entry[key]


def parse_paper_results(text: str, where: str = PAPER_RESULTS_FILE) -> PaperResults:
    """Parse the YAML layout of paper_results.yaml; UserError naming `where` on a bad layout."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{where}: not valid YAML ({error.__class__.__name__})") from error
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping with keys source, classification, detection")
    cls_section = _required(data, "classification", where)
    det_section = _required(data, "detection", where)
    classification = {}
    for entry in _required(cls_section, "results", where):
        result = PaperClassification(
            model=str(_required(entry, "model", where)),
            **{k: float(_required(entry, k, where)) for k in ("params_m", "gflops", "top1", "top5")},
        )
        classification[result.model] = result
    detection = {}
    for entry in _required(det_section, "results", where):
        result = PaperDetection(
            detector=str(_required(entry, "detector", where)),
            backbone=str(_required(entry, "backbone", where)),
            **{k: float(_required(entry, k, where)) for k in ("params_m", "gflops", "AP", "AP50", "AP75")},
        )
        detection[(result.detector, result.backbone)] = result
    return PaperResults(
        source=str(_required(data, "source", where)),
        classification=classification,
        detection=detection,
    )


@lru_cache(maxsize=1)
def load_paper_results() -> PaperResults:
    """The paper's figures packaged with sge_repro (paper_results.yaml)."""
    text = resources.files(PACKAGE).joinpath(PAPER_RESULTS_FILE).read_text(encoding="utf-8")
    return parse_paper_results(text)


# The authors' log columns -> our history column names (plots/train_cls/*.tsv).
_LOG_COLUMNS = {
    "Learning Rate": "lr",
    "Train Loss": "train_loss",
    "Valid Loss": "val_loss",
    "Train Acc.": "train_acc",
    "Valid Acc.": "val_top1",
}


def parse_official_log(text: str, where: str) -> list[dict[str, float]]:
    """Rows of {"epoch" (1-based), "lr", "train_loss", "val_loss", "train_acc", "val_top1"}."""
    reader = csv.reader(io.StringIO(text), delimiter="\t")
    header = [h.strip() for h in next(reader, [])]
    unknown = [h for h in header if h and h not in _LOG_COLUMNS]
    if unknown or not header:
        raise UserError(f"{where}: unexpected log columns {unknown or header}; expected {list(_LOG_COLUMNS)}")
    rows = []
    for epoch, cells in enumerate(reader, start=1):
        values = {_LOG_COLUMNS[h]: float(c) for h, c in zip(header, cells) if h and c.strip()}
        if values:
            rows.append({"epoch": float(epoch), **values})
    return rows


@lru_cache(maxsize=None)
def _official_log_cached(model: str) -> tuple[tuple[tuple[str, float], ...], ...] | None:
    prefix = "old_" if plain_baseline(model) is None else ""  # the authors log plain ResNets as old_resnet*
    path = resources.files(PACKAGE).joinpath(OFFICIAL_LOGS_DIR, f"{prefix}{model}.log.tsv")
    if not path.is_file():
        return None
    rows = parse_official_log(path.read_text(encoding="utf-8"), where=f"{OFFICIAL_LOGS_DIR}/{path.name}")
    return tuple(tuple(row.items()) for row in rows)


def official_log(model: str) -> list[dict[str, float]] | None:
    """The authors' per-epoch ImageNet log for `model`, or None when they released none."""
    rows = _official_log_cached(model)
    return None if rows is None else [dict(row) for row in rows]
