"""Read every metrics file the pipeline stages wrote, grouped by model / detector and seed.

A file that is absent or incomplete (a stage not run yet, a key not written) is recorded as
missing and the report says so; a file that exists but is not UTF-8 text, not valid JSON (or TSV),
or holds values of the wrong type where the report reads them, is a UserError naming the file and
the key.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from sge_repro.errors import UserError
from sge_repro.paths import ProjectPaths
from sge_repro.report import checked_json as fields
from sge_repro.report.activations import STATS_FILE, summarize
from sge_repro.report.reference import BBOX_KEYS
from sge_repro.report.schema import ActivationRow, Missing

_RUN_FILE = re.compile(r"^(?P<name>.+)-seed(?P<seed>\d+)\.(?:json|tsv)$")


@dataclass
class Predictions:
    """Per-validation-image top-1 correctness of one classification run."""

    correct: np.ndarray  # uint8, one entry per validation image
    files: tuple[str, ...]


@dataclass
class ClsRun:
    model: str
    dataset: str
    seed: int
    top1: float
    top5: float
    loss: float | None = None
    num_images: int | None = None
    subset_of: int | None = None  # the val split's size when num_images is a subset of it
    params_m: float | None = None
    gflops: float | None = None
    predictions: Predictions | None = None
    train: dict[str, Any] | None = None
    history: list[dict[str, float]] | None = None


@dataclass
class DetRun:
    detector: str
    backbone: str
    dataset: str
    seed: int
    bbox: dict[str, float | None]
    segm: dict[str, float | None] | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    # how the detector was trained (eval det records them; None in files written before it did)
    engine: str | None = None
    protocol: str | None = None
    backbone_weights: str | None = None


@dataclass
class CollectedResults:
    classification: list[ClsRun] = field(default_factory=list)
    detection: list[DetRun] = field(default_factory=list)
    # Training histories whose run has no evaluation yet (still plotted).
    orphan_histories: dict[tuple[str, int], list[dict[str, float]]] = field(default_factory=dict)
    missing: list[Missing] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _name_and_seed(path: Path) -> tuple[str, int] | None:
    match = _RUN_FILE.match(path.name)
    return None if match is None else (match["name"], int(match["seed"]))


def _check_identity(data: dict, key: str, expected: Any, path: Path, root: Path) -> None:
    if data.get(key) is not None and data[key] != expected:
        raise UserError(
            f"{fields.display(path, root)}: key '{key}' is {fields.shown(data[key])} but the file name says {expected!r}"
        )


def read_predictions(path: Path, root: Path) -> Predictions | None:
    data = fields.read_json_object(path, root)
    if data is None:
        return None
    # The classification engine writes "correct_top1" (plus top-5, targets, ...); "correct" also accepted.
    key = "correct_top1" if "correct_top1" in data else "correct"
    correct, files = data.get(key), data.get("files")
    if not isinstance(correct, list) or not isinstance(files, list):
        raise UserError(f"{fields.display(path, root)}: expected lists under keys 'correct_top1' and 'files'")
    if len(correct) != len(files):
        raise UserError(
            f"{fields.display(path, root)}: '{key}' has {len(correct)} entries but 'files' has {len(files)}"
        )
    if any(c not in (0, 1) for c in correct):  # True/False compare equal to 1/0
        raise UserError(f"{fields.display(path, root)}: '{key}' should hold only 0/1 values")
    if any(not isinstance(f, str) for f in files):
        raise UserError(f"{fields.display(path, root)}: 'files' should hold file names (strings)")
    return Predictions(correct=np.asarray(correct, dtype=np.uint8), files=tuple(files))


def read_history(path: Path, root: Path) -> list[dict[str, float]] | None:
    """Per-epoch rows of a training history TSV; finite numeric cells only (extra columns kept, a
    cell that is not a number skipped); UserError naming the file when it is not a UTF-8 text TSV."""
    if not path.is_file():
        return None
    text = fields.read_text(path, root, "a tab-separated training history")
    rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
    try:
        for raw in reader:
            row = {}
            for key, cell in raw.items():
                if key is None or cell is None:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    row[key.strip()] = value
            if row:
                rows.append(row)
    except csv.Error as error:  # e.g. an unterminated quote running past csv's field size limit
        raise UserError(f"{fields.display(path, root)}: not a valid TSV (line {reader.line_num}: {error})") from error
    return rows or None


def read_train_metrics(path: Path, root: Path) -> dict[str, Any] | None:
    """A training run's final metrics (metrics/train_cls); the report reads its `dataset` (a string)."""
    data = fields.read_json_object(path, root)
    if data is not None:
        fields.string(data, "dataset", path, root)
    return data


def _read_cls_run(path: Path, paths: ProjectPaths, missing: list[Missing]) -> ClsRun | None:
    root = paths.root
    identity = _name_and_seed(path)
    if identity is None:
        return None  # not a run file (e.g. a README); the stages only write <model>-seed<n>.json
    model, seed = identity
    data = fields.read_json_object(path, root)
    if data is None:
        missing.append(Missing(what=f"classification {model} seed {seed}", path=fields.display(path, root), reason="empty file"))
        return None
    _check_identity(data, "model", model, path, root)
    _check_identity(data, "seed", seed, path, root)
    absent = [k for k in ("dataset", "top1", "top5") if k not in data]
    if absent:
        missing.append(
            Missing(what=f"classification {model} seed {seed}", path=fields.display(path, root),
                    reason=f"incomplete: no {', '.join(absent)}")
        )
        return None
    run = ClsRun(
        model=model,
        dataset=fields.string(data, "dataset", path, root, required=True),
        seed=seed,
        top1=fields.percent(data["top1"], "top1", path, root),
        top5=fields.percent(data["top5"], "top5", path, root),
        loss=fields.number(data.get("loss"), "loss", path, root, allow_none=True),
        params_m=fields.number(data.get("params_m"), "params_m", path, root, allow_none=True),
        gflops=fields.number(data.get("gflops"), "gflops", path, root, allow_none=True),
    )
    if data.get("num_images") is not None:
        run.num_images = fields.count(data["num_images"], "num_images", path, root)
    if data.get("subset_of") is not None:
        run.subset_of = fields.count(data["subset_of"], "subset_of", path, root)
    predictions_path = paths.cls_predictions(model, seed)
    run.predictions = read_predictions(predictions_path, root)
    if run.predictions is None:
        missing.append(
            Missing(
                what=f"per-image predictions of {model} seed {seed}",
                path=fields.display(predictions_path, root),
                reason="absent: no paired bootstrap over validation images",
            )
        )
    elif run.num_images is not None and run.num_images != len(run.predictions.correct):
        raise UserError(
            f"{fields.display(predictions_path, root)}: {len(run.predictions.correct)} images, "
            f"but {fields.display(path, root)} says num_images={run.num_images}"
        )
    run.train = read_train_metrics(paths.cls_train_metrics(model, seed), root)
    run.history = read_history(paths.cls_history(model, seed), root)
    return run


def _read_det_run(path: Path, root: Path, missing: list[Missing], notes: list[str]) -> DetRun | None:
    identity = _name_and_seed(path)
    if identity is None or "-" not in identity[0]:
        return None
    (detector, backbone), seed = identity[0].split("-", 1), identity[1]
    what = f"detection {detector} + {backbone} seed {seed}"
    data = fields.read_json_object(path, root)
    if data is None:
        missing.append(Missing(what=what, path=fields.display(path, root), reason="empty file"))
        return None
    _check_identity(data, "detector", detector, path, root)
    _check_identity(data, "backbone", backbone, path, root)
    _check_identity(data, "seed", seed, path, root)
    bbox = fields.object_at(data, "bbox", path, root, "APs")  # null: not written yet, as if absent
    if "dataset" not in data or bbox is None or any(k not in bbox for k in BBOX_KEYS):
        absent = [k for k in ("dataset",) if k not in data] + (["bbox"] if bbox is None else [])
        absent += [f"bbox.{k}" for k in BBOX_KEYS if bbox is not None and k not in bbox]
        missing.append(Missing(what=what, path=fields.display(path, root), reason=f"incomplete: no {', '.join(absent)}"))
        return None
    run = DetRun(
        detector=detector,
        backbone=backbone,
        dataset=fields.string(data, "dataset", path, root, required=True),
        seed=seed,
        bbox={k: fields.percent(bbox[k], f"bbox.{k}", path, root, allow_none=True) for k in BBOX_KEYS},
        flags=_read_flags(data, path, root),
        **{key: fields.string(data, key, path, root) for key in ("engine", "protocol", "backbone_weights")},
    )
    _check_per_category(data, path, root)
    if run.bbox["AP"] is None:
        missing.append(Missing(what=what, path=fields.display(path, root), reason="incomplete: bbox.AP is null"))
        return None
    segm = fields.object_at(data, "segm", path, root, "APs")
    if segm is not None:
        run.segm = {k: fields.percent(segm.get(k), f"segm.{k}", path, root, allow_none=True) for k in BBOX_KEYS}
    _apply_nan_flags(run, what, notes)
    return run


def _read_flags(data: dict, path: Path, root: Path) -> dict[str, Any]:
    """The `flags` object of eval det: no_detections a boolean, nan_reported_as_zero {task: [AP names]}
    (other flags are not read); UserError naming the key on a wrong type."""
    flags = fields.object_at(data, "flags", path, root, "flags") or {}
    no_detections = flags.get("no_detections")
    if no_detections is not None and not isinstance(no_detections, bool):
        raise UserError(f"{fields.display(path, root)}: key 'flags.no_detections' should be true or false, "
                        f"got {fields.got(no_detections)}")
    flagged = fields.object_at(flags, "nan_reported_as_zero", path, root, "AP name lists per task", parent="flags.")
    for task, keys in (flagged or {}).items():
        if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
            raise UserError(f"{fields.display(path, root)}: key 'flags.nan_reported_as_zero.{_key(task)}' should be "
                            f"a list of AP names, got {fields.got(keys)}")
    return dict(flags)


def _check_per_category(data: dict, path: Path, root: Path) -> None:
    """eval det's per_category {task: {category: AP}}: not shown, but its types are checked like the rest."""
    for task, aps in (fields.object_at(data, "per_category", path, root, "per-task category APs") or {}).items():
        if aps is None:
            continue
        if not isinstance(aps, dict):
            raise UserError(f"{fields.display(path, root)}: key 'per_category.{_key(task)}' should be an object of "
                            f"category APs, got {fields.got(aps)}")
        for name, value in aps.items():
            fields.number(value, f"per_category.{_key(task)}.{_key(name)}", path, root, allow_none=True)


def _key(name: str) -> str:
    """A key of the file as part of a dotted key path in a one-line message."""
    return name if name.isprintable() and len(name) <= 40 and "'" not in name else fields.shown(name, 40)


def _apply_nan_flags(run: DetRun, what: str, notes: list[str]) -> None:
    """The detection stage writes COCO's NaN (no objects of a size, or no detections) as 0.0 and
    lists those keys under flags.nan_reported_as_zero; show them as absent, not as a zero AP.
    A detector with no detections at all keeps its zeros (it found nothing) and gets a note."""
    if run.flags.get("no_detections"):
        notes.append(f"{what} made no detections on the validation set: its APs are 0.")
        return
    flagged = run.flags.get("nan_reported_as_zero") or {}  # types checked by _read_flags
    for task, values in (("bbox", run.bbox), ("segm", run.segm)):
        for key in flagged.get(task) or ():
            if values is not None and key in values:
                values[key] = None


def read_activation_stats(path: Path, root: Path) -> ActivationRow | None:
    """One activation_stats.json of the visualize stage, summarised (None when absent or empty)."""
    data = fields.read_json_object(path, root)
    if data is None:
        return None
    groups = data.get("groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise UserError(f"{fields.display(path, root)}: key 'groups' should be a non-empty list of objects, got {fields.got(groups)}")
    checked = [{key: fields.number(g.get(key), f"groups.{i}.{key}", path, root, allow_none=key.endswith(("gate", "fraction")))
                for key in ("variance_before", "variance_after", "weak_fraction", "weak_gate", "strong_gate")}
               for i, g in enumerate(groups)]
    return ActivationRow(
        model=fields.string(data, "model", path, root, required=True), seed=fields.count(data.get("seed"), "seed", path, root),
        layer=fields.string(data, "layer", path, root, required=True), images=fields.count(data.get("images"), "images", path, root),
        weak_threshold=fields.number(data.get("weak_threshold"), "weak_threshold", path, root), **summarize(checked),
        group_variance_before=[g["variance_before"] for g in checked],
        group_variance_after=[g["variance_after"] for g in checked])


def collect_activations(root: Path) -> list[ActivationRow]:
    """Every SGE model's activation analysis under runs/visualize, by model and seed."""
    folder = ProjectPaths(Path(root)).attention_maps
    rows = [read_activation_stats(path, Path(root)) for path in sorted(folder.glob(f"*/{STATS_FILE}"))]
    return [row for row in rows if row is not None]


def collect_results(
    root: Path,
    expected_models: Iterable[str] = (),
    expected_detection: Iterable[tuple[str, str]] = (),
    seeds: Sequence[int] = (),
) -> CollectedResults:
    """Every classification / detection result under `root`, sorted, plus what is missing.

    `expected_models`, `expected_detection` (detector, backbone) and `seeds` name runs that
    should exist (from params); any without a metrics file is listed as missing.
    """
    paths = ProjectPaths(Path(root))
    results = CollectedResults()
    for path in sorted(paths.cls_metrics("x", 0).parent.glob("*.json")):
        run = _read_cls_run(path, paths, results.missing)
        if run is not None:
            results.classification.append(run)
    for path in sorted(paths.det_metrics("x", "y", 0).parent.glob("*.json")):
        run = _read_det_run(path, paths.root, results.missing, results.notes)
        if run is not None:
            results.detection.append(run)

    evaluated = {(r.model, r.seed) for r in results.classification}
    # Trained but not evaluated: keep the curves, say the evaluation is missing.
    for path in sorted(paths.cls_history("x", 0).parent.glob("*.tsv")):
        identity = _name_and_seed(path)
        if identity is None or identity in evaluated:
            continue
        history = read_history(path, paths.root)
        if history:
            results.orphan_histories[identity] = history
        if not paths.cls_metrics(*identity).is_file():
            results.missing.append(
                Missing(
                    what=f"classification {identity[0]} seed {identity[1]}",
                    path=fields.display(paths.cls_metrics(*identity), paths.root),
                    reason="absent: trained but not evaluated",
                )
            )

    reported = {m.path for m in results.missing}
    for model in expected_models:
        for seed in seeds:
            path = paths.cls_metrics(model, seed)
            if (model, seed) not in evaluated and fields.display(path, paths.root) not in reported:
                results.missing.append(Missing(what=f"classification {model} seed {seed}",
                                               path=fields.display(path, paths.root), reason="absent"))
    found_det = {(r.detector, r.backbone, r.seed) for r in results.detection}
    for detector, backbone in expected_detection:
        for seed in seeds:
            path = paths.det_metrics(detector, backbone, seed)
            if (detector, backbone, seed) not in found_det and fields.display(path, paths.root) not in reported:
                results.missing.append(
                    Missing(what=f"detection {detector} + {backbone} seed {seed}", path=fields.display(path, paths.root),
                            reason="absent")
                )
    return results
