"""reports/summary.json as one pydantic model, and the built report that holds it.

Every field of the file is defined once, here: writing is `Summary.model_dump()` (field order is
the file's key order), reading a saved file is `Summary.model_validate(data)`. The DESIGN.md
contract: `profile`, per-run `classification` entries (model, dataset, seed, top1, top5,
params_m, gflops) and `detection` entries (detector, backbone, dataset, seed, bbox, segm for mask
models), accuracies and APs in percent; the comparison with the paper, what is missing and the
notes are added beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_serializer

APs = dict[str, float]
OptionalAPs = dict[str, float | None]


class _Record(BaseModel):
    """A JSON object of summary.json: JSON names via aliases, keys in `omit_when_none` left out
    when their value is None (e.g. `segm` of a detector without masks)."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True, frozen=True)
    omit_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler):
        data = handler(self)
        for key in self.omit_when_none:
            if data.get(key, 0) is None:
                del data[key]
        return data


class GainInterval(_Record):
    """A gain (attention model minus its plain baseline) in points, with its bootstrap CI."""

    estimate: float = Field(alias="gain")
    low: float | None = Field(alias="ci_low")
    high: float | None = Field(alias="ci_high")
    confidence: float = 0.95
    method: str  # how the CI was obtained, for the report
    units: int  # images or seeds resampled (0 when there is no CI)
    samples: int  # bootstrap resamples (0 when there is no CI)

    @computed_field
    @property
    def significant(self) -> bool | None:
        """True when the CI excludes 0; None when there is no CI (a single run)."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0.0 or self.high < 0.0


class ClsEntry(_Record):
    """One classification run (the contract's per-run entry)."""

    model: str
    dataset: str
    seed: int
    top1: float
    top5: float
    params_m: float | None
    gflops: float | None


class DetEntry(_Record):
    """One detection run (the contract's per-run entry). COCO's undefined APs are 0 here and
    named under flags.nan_reported_as_zero."""

    omit_when_none: ClassVar[tuple[str, ...]] = ("segm", "flags")

    detector: str
    backbone: str
    dataset: str
    seed: int
    bbox: APs
    segm: APs | None = None
    flags: dict[str, dict[str, list[str]]] | None = None
    # how it was trained (null when its metrics file does not say): the detection engine, the
    # protocol (train_det.protocol) and where the backbone weights came from (convert source:
    # trained | file | torchvision)
    engine: str | None = None
    protocol: str | None = None
    backbone_weights: str | None = None


class ClsRow(_Record):
    """One classification model on one dataset, aggregated over its seeds, against the paper."""

    model: str
    dataset: str
    seeds: list[int]
    top1: float
    top1_std: float | None
    top5: float
    top5_std: float | None
    params_m: float | None
    gflops: float | None
    baseline: str | None
    gain: GainInterval | None
    comparable: bool = Field(alias="comparable_with_paper")  # the paper's dataset: absolute numbers compare
    paper_top1: float | None
    paper_gain: float | None
    paper_gain_model: str | None
    verdict: str


class DetRow(_Record):
    """One detector + backbone on one dataset, aggregated over its seeds, against the paper."""

    omit_when_none: ClassVar[tuple[str, ...]] = ("segm",)

    detector: str
    backbone: str
    dataset: str
    seeds: list[int]
    bbox: OptionalAPs
    bbox_std: OptionalAPs
    segm: OptionalAPs | None = None
    baseline: str | None
    gain: GainInterval | None
    comparable: bool = Field(alias="comparable_with_paper")
    paper_ap: float | None = Field(alias="paper_AP")
    paper_gain: float | None
    paper_gain_backbone: str | None
    verdict: str
    # how the row's runs were trained ("a+b" when its seeds differ) and what the verdict judged:
    # "AP" (absolute, the paper's engine and protocol), "gain" (the gain's CI against the paper's
    # gain: COCO with another engine or protocol), "gain sign and size" (not the paper's dataset)
    engine: str | None = None
    protocol: str | None = None
    backbone_weights: str | None = None
    judged_on: str = "AP"


class Comparison(_Record):
    tolerance: float  # |ours - paper| in points within which a result counts as reproduced
    classification: list[ClsRow]
    detection: list[DetRow]


class Missing(_Record):
    """Something the report would use but could not find (or found incomplete)."""

    what: str
    path: str
    reason: str


class PaperSource(_Record):
    source: str


class StageRun(_Record):
    """A stage's last recorded run (its status file, sge_repro.stage_status)."""

    stage: str
    state: str  # done | failed | stopped | running (a run killed without a word)
    wall_time_s: float
    finished: str  # UTC, ISO 8601, of the status file's last write
    host: str
    world_size: int
    devices: str = ""  # "N x GPU model" when the stage used CUDA


class Hardware(_Record):
    """The machine that built the report (each stage's own host is in its StageRun)."""

    cpu: str
    cpu_count: int
    gpus: list[str]
    gpu_count: int
    platform: str


class Provenance(_Record):
    """What made the report (sge_repro.provenance): code, params, packages, hardware, stage runs."""

    git_commit: str | None
    git_dirty: bool | None
    git_changed: list[str] = []  # the files that differ from the commit (at most 20)
    params_sha256: str | None
    profile: str
    packages: dict[str, str]
    hardware: Hardware
    stages: list[StageRun] = []


class ActivationRow(_Record):
    """The paper's activation analysis of one SGE model at its last SGE block (the visualize
    stage's activation_stats.json; sge_repro.report.activations): means over groups of per-group
    means over images."""

    model: str
    seed: int
    layer: str
    images: int
    variance_before: float | None  # of the group's mean activation map across positions
    variance_after: float | None
    variance_ratio: float | None  # after / before
    groups_increased: float  # the fraction of groups whose variance grew
    weak_fraction: float | None  # positions below weak_threshold x the map's max, before SGE
    weak_gate: float | None  # mean gate over weak positions
    strong_gate: float | None  # ... over the others
    weak_threshold: float
    verdict: str  # held | not held | undetermined
    group_variance_before: list[float | None]
    group_variance_after: list[float | None]


class Summary(_Record):
    """reports/summary.json."""

    omit_when_none: ClassVar[tuple[str, ...]] = ("provenance", "activations")

    profile: str
    classification: list[ClsEntry]
    detection: list[DetEntry]
    comparison: Comparison
    missing: list[Missing] = []
    notes: list[str] = []
    paper: PaperSource
    provenance: Provenance | None = None
    activations: list[ActivationRow] | None = None  # absent when no SGE model was visualized


@dataclass
class CurveSet:
    """Training histories of one model (one per seed), and its dataset when known."""

    model: str
    dataset: str | None
    histories: dict[int, list[dict[str, float]]]


@dataclass
class Report:
    """A built report: summary.json's content plus what only the plots use; `files` are the
    paths written by sge_repro.report.files.write_report_files."""

    summary: Summary
    curves: list[CurveSet] = field(default_factory=list)
    attention_images: list[Path] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def profile(self) -> str:
        return self.summary.profile

    @property
    def tolerance(self) -> float:
        return self.summary.comparison.tolerance

    @property
    def classification(self) -> list[ClsRow]:
        return self.summary.comparison.classification

    @property
    def detection(self) -> list[DetRow]:
        return self.summary.comparison.detection

    @property
    def missing(self) -> list[Missing]:
        return self.summary.missing

    @property
    def notes(self) -> list[str]:
        return self.summary.notes
