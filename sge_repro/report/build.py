"""Build the comparison report: collect results, aggregate over seeds, compute gains and verdicts.

Pure: `build_report` reads the metrics files and returns a `Report` (schema.py); it writes
nothing. sge_repro.report.render writes reports/ and prints the tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from pydantic import ValidationError

from sge_repro.errors import UserError
from sge_repro.models.complexity import model_table
from sge_repro.paths import ProjectPaths
from sge_repro.report.checked_json import read_json_object
from sge_repro.report.collect import (
    ClsRun,
    CollectedResults,
    DetRun,
    collect_activations,
    collect_results,
    read_train_metrics,
)
from sge_repro.report.reference import (
    BBOX_KEYS,
    PaperResults,
    detection_setup_difference,
    is_paper_dataset,
    load_paper_results,
    plain_baseline,
    split_model_name,
)
from sge_repro.report.schema import (
    ClsEntry,
    ClsRow,
    Comparison,
    CurveSet,
    DetEntry,
    DetRow,
    GainInterval,
    Missing,
    PaperSource,
    Report,
    Summary,
)
from sge_repro.report.stats import (
    detection_gain_verdict,
    gain_verdict,
    mean_std,
    paired_image_bootstrap,
    paper_verdict,
    seed_bootstrap,
)

# `complexity(name) -> {"params_m": float, "gflops": float, ...}` for a model as trained.
ComplexityFn = Callable[[str], Mapping]

# PNGs of SGE attention maps (sge_repro.report.visualize) that the HTML report embeds: from a
# `visualize` stage (runs/visualize) or a manual `sge-repro visualize` into reports/visualize.
ATTENTION_DIRS = (Path("runs") / "visualize", Path("reports") / "visualize")
MAX_ATTENTION_IMAGES = 12

EMBEDDED_NOTE = (
    "Absolute numbers on the embedded sets are not comparable with the paper's ImageNet / COCO "
    "figures; there the verdict compares the sign and size of the gain over the plain ResNet of "
    "the same depth with the paper's gain (for the same attention at the nearest depth the paper "
    "reports)."
)


DET_GAIN_NOTE = (
    "COCO detection rows are judged on the gain, not on absolute AP: the paper's figures come from the "
    "authors' mmdetection (2019) fork with their settings, and these runs differ ({differences}); "
    "detectron2's baselines alone differ from mmdetection's by about a point whatever SGE does. "
    "\"gain reproduced\" means the paper's gain (same detector and backbone) lies inside the 95% "
    "bootstrap CI (over seeds) of ours; a single seed gives no CI and is not judged."
)
PRETRAINING_NOTE = (
    "The paper's detection gain is not SGE's alone: the authors' plain detectors start from "
    "torchvision's ImageNet ResNet weights (top-1 about 76.1) and their SGE detectors from their own "
    "SGE-ResNet checkpoint (top-1 77.58), so it mixes SGE with a different, stronger pretraining. "
    "Protocol \"authors\" repeats that mix (backbone weights: torchvision for plain, file for SGE); "
    "protocol \"controlled\" starts both backbones from our own runs of one recipe (backbone weights: "
    "trained), which measures SGE alone. Each detection row names its protocol and backbone weights."
)


def _model_order(name: str) -> tuple:
    attention, base, depth = split_model_name(name)
    return (depth or 0, base, attention is not None, attention or "")


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def resolve_complexity(
    names: Sequence[str], complexity: ComplexityFn | None, notes: list[str]
) -> dict[str, tuple[float | None, float | None]]:
    """{name: (params_m, gflops)}; a model the counter does not know is a note, not a crash."""
    if not names:
        return {}
    if complexity is None:
        notes.append("#params / GFLOPs are those at 224x224 with 1000 classes (the paper's setting).")

        def complexity(name: str) -> Mapping:
            return model_table([name], image_size=224)[0]

    found: dict[str, tuple[float | None, float | None]] = {}
    for name in names:
        try:
            row = complexity(name)
        except UserError as error:  # a model the counter does not know: say so, keep the report
            notes.append(f"#params / GFLOPs of {name} not shown: {error}")
            continue
        found[name] = (_round(row.get("params_m")), _round(row.get("gflops")))
    return found


def _cls_gain(
    runs: list[ClsRun], base_runs: list[ClsRun], samples: int, seed: int, notes: list[str]
) -> GainInterval:
    everything = runs + base_runs
    scored = all(r.predictions is not None for r in everything)
    if scored and all(r.predictions.files == everything[0].predictions.files for r in everything):  # type: ignore[union-attr]
        return paired_image_bootstrap(
            [r.predictions.correct for r in runs],  # type: ignore[union-attr]
            [r.predictions.correct for r in base_runs],  # type: ignore[union-attr]
            samples=samples,
            seed=seed,
        )
    if scored:
        notes.append(
            f"{runs[0].model} and {base_runs[0].model} were scored on different validation images: "
            "their top-1 gain is bootstrapped over seeds, not paired over images."
        )
    return seed_bootstrap(
        {r.seed: r.top1 for r in runs}, {r.seed: r.top1 for r in base_runs}, samples=samples, seed=seed
    )


def _classification_rows(
    results: CollectedResults,
    paper: PaperResults,
    complexity: dict[str, tuple[float | None, float | None]],
    tolerance: float,
    samples: int,
    seed: int,
    missing: list[Missing],
    notes: list[str],
) -> list[tuple[ClsRow, list[ClsRun]]]:
    """One row per (dataset, model), with the runs it aggregates (seed order)."""
    groups: dict[tuple[str, str], list[ClsRun]] = {}
    for run in results.classification:
        groups.setdefault((run.dataset, run.model), []).append(run)
    rows = []
    for (dataset, model), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], _model_order(kv[0][1]))):
        runs.sort(key=lambda r: r.seed)
        top1, top1_std = mean_std([r.top1 for r in runs])
        top5, top5_std = mean_std([r.top5 for r in runs])
        measured = [(r.params_m, r.gflops) for r in runs if r.params_m is not None]
        params_m, gflops = measured[0] if measured else complexity.get(model, (None, None))
        baseline = plain_baseline(model)
        gain = None
        if baseline is not None:
            base_runs = sorted(groups.get((dataset, baseline), []), key=lambda r: r.seed)
            if base_runs:
                gain = _cls_gain(runs, base_runs, samples, seed, notes)
            else:
                missing.append(
                    Missing(what=f"baseline {baseline} on {dataset}", path=f"metrics/eval_cls/{baseline}-seed*.json",
                            reason=f"absent: no gain for {model}")
                )
        comparable = is_paper_dataset(dataset, "cls")
        if comparable:
            paper_entry = paper.classification.get(model)
            paper_top1 = None if paper_entry is None else paper_entry.top1
            paper_gain = paper.cls_gain(model)
            paper_gain_model = model if paper_gain is not None else None
            verdict = paper_verdict(top1, paper_top1, tolerance)
        else:
            paper_top1 = None
            nearest = paper.nearest_cls_gain(model)
            paper_gain, paper_gain_model = nearest if nearest else (None, None)
            verdict = "baseline" if baseline is None else gain_verdict(gain, paper_gain)
        rows.append((
            ClsRow(model=model, dataset=dataset, seeds=[r.seed for r in runs], top1=top1, top1_std=top1_std,
                   top5=top5, top5_std=top5_std, params_m=params_m, gflops=gflops, baseline=baseline, gain=gain,
                   comparable=comparable, paper_top1=paper_top1, paper_gain=paper_gain,
                   paper_gain_model=paper_gain_model, verdict=verdict),
            runs,
        ))
    return rows


def _joined(values: Iterable[str | None]) -> str | None:
    """One value of the runs of a row, or "a+b" when its seeds differ (None when none recorded)."""
    distinct = sorted({value for value in values if value is not None})
    return "+".join(distinct) if distinct else None


def _detection_rows(
    results: CollectedResults,
    paper: PaperResults,
    tolerance: float,
    samples: int,
    seed: int,
    missing: list[Missing],
    differences: list[str] | None = None,
) -> list[tuple[DetRow, list[DetRun]]]:
    """One row per (dataset, detector, backbone), with the runs it aggregates (seed order)."""
    groups: dict[tuple[str, str, str], list[DetRun]] = {}
    for run in results.detection:
        groups.setdefault((run.dataset, run.detector, run.backbone), []).append(run)
    rows = []
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], _model_order(kv[0][2])))
    for (dataset, detector, backbone), runs in ordered:
        runs.sort(key=lambda r: r.seed)
        bbox: dict[str, float | None] = {}
        bbox_std: dict[str, float | None] = {}
        for key in BBOX_KEYS:
            values = [r.bbox[key] for r in runs if r.bbox.get(key) is not None]
            bbox[key], bbox_std[key] = mean_std(values) if values else (None, None)
        segm = None
        if any(r.segm is not None for r in runs):
            segm = {}
            for key in BBOX_KEYS:
                values = [r.segm[key] for r in runs if r.segm is not None and r.segm.get(key) is not None]
                segm[key] = mean_std(values)[0] if values else None
        baseline = plain_baseline(backbone)
        gain = None
        if baseline is not None:
            base_runs = groups.get((dataset, detector, baseline), [])
            if base_runs:
                gain = seed_bootstrap(
                    {r.seed: r.bbox["AP"] for r in runs}, {r.seed: r.bbox["AP"] for r in base_runs},
                    samples=samples, seed=seed,
                )
            else:
                missing.append(
                    Missing(what=f"baseline {detector} + {baseline} on {dataset}",
                            path=f"metrics/eval_det/{detector}-{baseline}-seed*.json",
                            reason=f"absent: no gain for {backbone}")
                )
        engine = _joined(r.engine for r in runs)
        protocol = _joined(r.protocol for r in runs)
        comparable = is_paper_dataset(dataset, "det")
        if comparable:
            entry = paper.detection.get((detector, backbone))
            paper_ap = None if entry is None else entry.AP
            paper_gain = paper.det_gain(detector, backbone)
            paper_gain_backbone = backbone if paper_gain is not None else None
            difference = detection_setup_difference(engine, protocol)
            if difference is None:
                judged_on = "AP"
                verdict = paper_verdict(bbox["AP"], paper_ap, tolerance)  # type: ignore[arg-type]
            else:
                judged_on = "gain"
                if differences is not None and difference not in differences:
                    differences.append(difference)
                verdict = detection_gain_verdict(baseline is None, gain, paper_gain, bbox["AP"], paper_ap)
        else:
            paper_ap = None
            nearest = paper.nearest_det_gain(detector, backbone)
            paper_gain, paper_gain_backbone = nearest if nearest else (None, None)
            judged_on = "gain sign and size"
            verdict = "baseline" if baseline is None else gain_verdict(gain, paper_gain)
        rows.append((
            DetRow(detector=detector, backbone=backbone, dataset=dataset, seeds=[r.seed for r in runs], bbox=bbox,
                   bbox_std=bbox_std, segm=segm, baseline=baseline, gain=gain, comparable=comparable,
                   paper_ap=paper_ap, paper_gain=paper_gain, paper_gain_backbone=paper_gain_backbone,
                   verdict=verdict, engine=engine, protocol=protocol,
                   backbone_weights=_joined(r.backbone_weights for r in runs), judged_on=judged_on),
            runs,
        ))
    return rows


def _curves(results: CollectedResults, root: Path) -> list[CurveSet]:
    by_model: dict[str, CurveSet] = {}
    for run in results.classification:
        if run.history:
            curve = by_model.setdefault(run.model, CurveSet(run.model, run.dataset, {}))
            curve.histories[run.seed] = run.history
    paths = ProjectPaths(root)
    for (model, seed), history in results.orphan_histories.items():
        curve = by_model.setdefault(model, CurveSet(model, None, {}))
        if curve.dataset is None:
            train = read_train_metrics(paths.cls_train_metrics(model, seed), root)
            if train is not None and train.get("dataset") is not None:
                curve.dataset = train["dataset"]
        curve.histories[seed] = history
    return [by_model[m] for m in sorted(by_model, key=_model_order)]


def _cls_entries(rows: list[tuple[ClsRow, list[ClsRun]]]) -> list[ClsEntry]:
    """The contract's per-run entries; #params / GFLOPs those of the model's row."""
    complexity = {row.model: (row.params_m, row.gflops) for row, _ in rows}
    return [
        ClsEntry(model=run.model, dataset=run.dataset, seed=run.seed, top1=run.top1, top5=run.top5,
                 params_m=complexity[run.model][0], gflops=complexity[run.model][1])
        for _, runs in rows for run in runs
    ]


def _det_entry(run: DetRun) -> DetEntry:
    """The contract holds numbers: an AP COCOeval left undefined (NaN: no detections, or no objects
    of that size) is 0 here, and named under flags."""
    tasks = {task: values for task, values in (("bbox", run.bbox), ("segm", run.segm)) if values is not None}
    zeroed = {task: {key: 0.0 if value is None else value for key, value in values.items()}
              for task, values in tasks.items()}
    undefined = {task: [key for key, value in values.items() if value is None] for task, values in tasks.items()}
    undefined = {task: keys for task, keys in undefined.items() if keys}
    return DetEntry(detector=run.detector, backbone=run.backbone, dataset=run.dataset, seed=run.seed,
                    bbox=zeroed["bbox"], segm=zeroed.get("segm"),
                    flags={"nan_reported_as_zero": undefined} if undefined else None,
                    engine=run.engine, protocol=run.protocol, backbone_weights=run.backbone_weights)


def build_report(
    root: Path,
    profile: str,
    tolerance: float = 0.3,
    bootstrap_samples: int = 10_000,
    seed: int = 0,
    complexity: ComplexityFn | None = None,
    expected_models: Iterable[str] = (),
    expected_detection: Iterable[tuple[str, str]] = (),
    seeds: Sequence[int] = (),
) -> Report:
    """Collect every metrics file under `root` and compare with the paper; writes nothing
    (sge_repro.report.files.write_report_files writes reports/).

    tolerance: |ours - paper| in points within which a result on the paper's dataset counts as
    reproduced. bootstrap_samples / seed: the bootstrap of the gains. complexity: a
    `model_table`-like callable giving #params / GFLOPs of the models as trained (default:
    sge_repro.models.complexity.model_table at 224x224 and 1000 classes, when available). expected_* / seeds:
    runs that should exist; any without metrics is listed as missing.
    """
    if tolerance < 0:
        raise UserError(f"report tolerance: expected a non-negative number of points, got {tolerance}")
    if bootstrap_samples < 1:
        raise UserError(f"report bootstrap_samples: expected a positive integer, got {bootstrap_samples}")
    root = Path(root)
    paper = load_paper_results()
    results = collect_results(root, expected_models, expected_detection, seeds)
    missing = list(results.missing)
    notes: list[str] = list(results.notes)
    models = sorted({r.model for r in results.classification if r.params_m is None}, key=_model_order)
    table = resolve_complexity(models, complexity, notes)
    classification = _classification_rows(results, paper, table, tolerance, bootstrap_samples, seed, missing, notes)
    subsets = {(r.dataset, r.num_images, r.subset_of): None for r in results.classification if r.subset_of is not None}
    for dataset, evaluated, total in subsets:  # once each, in the runs' order
        notes.append(f"Classification on {dataset}: top-1 / top-5 over {evaluated} of its {total} validation images "
                     "(data.classification.max_val_images), not the whole validation set.")
    differences: list[str] = []
    detection = _detection_rows(results, paper, tolerance, bootstrap_samples, seed, missing, differences)
    if any(not r.comparable for r, _ in classification) or any(not r.comparable for r, _ in detection):
        notes.append(EMBEDDED_NOTE)
    if differences:
        notes.append(DET_GAIN_NOTE.format(differences=" / ".join(differences)))
    if detection:
        notes.append(PRETRAINING_NOTE)
    if not results.classification and not results.detection:
        notes.append("No evaluated runs found under metrics/: run the pipeline first (sge-repro run all).")
    attention_images = [
        path for folder in ATTENTION_DIRS if (root / folder).is_dir() for path in sorted((root / folder).rglob("*.png"))
    ][:MAX_ATTENTION_IMAGES]
    summary = Summary(
        profile=profile,
        classification=_cls_entries(classification),
        detection=[_det_entry(run) for _, runs in detection for run in runs],
        comparison=Comparison(tolerance=tolerance, classification=[row for row, _ in classification],
                              detection=[row for row, _ in detection]),
        missing=missing,
        notes=notes,
        paper=PaperSource(source=paper.source),
        activations=collect_activations(root) or None,
    )
    return Report(summary=summary, curves=_curves(results, root), attention_images=attention_images)


def load_saved_report(root: Path) -> Report:
    """The report last written to reports/summary.json (for printing its tables without rebuilding)."""
    root = Path(root)
    path = ProjectPaths(root).summary
    data = read_json_object(path, root)
    if data is None:
        raise UserError(f"{path}: no report yet; expected one written by `sge-repro report`")
    try:
        return Report(summary=Summary.model_validate(data))
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise UserError(
            f"{path}: key '{key}': {first['msg']}; expected a report written by this version "
            "(rerun `sge-repro report`)"
        ) from error
