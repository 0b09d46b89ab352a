"""Build the comparison report: collect results, aggregate over seeds, compute gains and verdicts,
write reports/summary.json, report.md and report.html.

The CLI calls `build_report(...)` then `render_console(report, console)` (sge_repro.report.render).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from sge_repro.errors import UserError
from sge_repro.paths import ProjectPaths
from sge_repro.report.collect import ClsRun, CollectedResults, DetRun, Missing, collect_results, read_json_object
from sge_repro.report.reference import (
    BBOX_KEYS,
    PaperResults,
    is_paper_dataset,
    load_paper_results,
    plain_baseline,
    split_model_name,
)
from sge_repro.report.stats import (
    GainInterval,
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


@dataclass
class ClsRow:
    """One classification model on one dataset, aggregated over its seeds."""

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
    comparable: bool  # the paper's dataset: absolute numbers can be compared
    paper_top1: float | None
    paper_gain: float | None
    paper_gain_model: str | None
    verdict: str
    runs: list[ClsRun] = field(repr=False, default_factory=list)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "seeds": self.seeds,
            "top1": self.top1,
            "top1_std": self.top1_std,
            "top5": self.top5,
            "top5_std": self.top5_std,
            "params_m": self.params_m,
            "gflops": self.gflops,
            "baseline": self.baseline,
            "gain": None if self.gain is None else self.gain.to_json(),
            "comparable_with_paper": self.comparable,
            "paper_top1": self.paper_top1,
            "paper_gain": self.paper_gain,
            "paper_gain_model": self.paper_gain_model,
            "verdict": self.verdict,
        }


@dataclass
class DetRow:
    """One detector + backbone on one dataset, aggregated over its seeds."""

    detector: str
    backbone: str
    dataset: str
    seeds: list[int]
    bbox: dict[str, float | None]
    bbox_std: dict[str, float | None]
    segm: dict[str, float | None] | None
    baseline: str | None
    gain: GainInterval | None
    comparable: bool
    paper_ap: float | None
    paper_gain: float | None
    paper_gain_backbone: str | None
    verdict: str
    runs: list[DetRun] = field(repr=False, default_factory=list)

    def to_json(self) -> dict:
        return {
            "detector": self.detector,
            "backbone": self.backbone,
            "dataset": self.dataset,
            "seeds": self.seeds,
            "bbox": self.bbox,
            "bbox_std": self.bbox_std,
            **({"segm": self.segm} if self.segm is not None else {}),
            "baseline": self.baseline,
            "gain": None if self.gain is None else self.gain.to_json(),
            "comparable_with_paper": self.comparable,
            "paper_AP": self.paper_ap,
            "paper_gain": self.paper_gain,
            "paper_gain_backbone": self.paper_gain_backbone,
            "verdict": self.verdict,
        }


@dataclass
class CurveSet:
    """Training histories of one model (one per seed), and its dataset when known."""

    model: str
    dataset: str | None
    histories: dict[int, list[dict[str, float]]]


@dataclass
class Report:
    profile: str
    root: Path
    tolerance: float
    classification: list[ClsRow]
    detection: list[DetRow]
    curves: list[CurveSet]
    missing: list[Missing]
    notes: list[str]
    paper: PaperResults
    results: CollectedResults = field(repr=False)
    attention_images: list[Path] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def _model_order(name: str) -> tuple:
    attention, base, depth = split_model_name(name)
    return (depth or 0, base, attention is not None, attention or "")


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def resolve_complexity(
    names: Sequence[str], complexity: ComplexityFn | None, notes: list[str]
) -> dict[str, tuple[float | None, float | None]]:
    """{name: (params_m, gflops)}; an absent complexity module or an unknown model is a note, not a crash."""
    if not names:
        return {}
    if complexity is None:
        try:
            from sge_repro.models.complexity import model_table
        except ImportError:
            notes.append("#params / GFLOPs not shown: sge_repro.models.complexity is not available.")
            return {}
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


def _same_images(runs: Sequence[ClsRun]) -> bool:
    first = runs[0].predictions
    return all(r.predictions is not None and r.predictions.files == first.files for r in runs)  # type: ignore[union-attr]


def _cls_gain(
    runs: list[ClsRun], base_runs: list[ClsRun], samples: int, seed: int, notes: list[str]
) -> GainInterval:
    everything = runs + base_runs
    if all(r.predictions is not None for r in everything) and _same_images(everything):
        return paired_image_bootstrap(
            [r.predictions.correct for r in runs],  # type: ignore[union-attr]
            [r.predictions.correct for r in base_runs],  # type: ignore[union-attr]
            samples=samples,
            seed=seed,
        )
    if all(r.predictions is not None for r in everything):
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
) -> list[ClsRow]:
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
                    Missing(f"baseline {baseline} on {dataset}", f"metrics/eval_cls/{baseline}-seed*.json",
                            f"absent: no gain for {model}")
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
        rows.append(
            ClsRow(model, dataset, [r.seed for r in runs], top1, top1_std, top5, top5_std, params_m, gflops,
                   baseline, gain, comparable, paper_top1, paper_gain, paper_gain_model, verdict, runs)
        )
    return rows


def _detection_rows(
    results: CollectedResults,
    paper: PaperResults,
    tolerance: float,
    samples: int,
    seed: int,
    missing: list[Missing],
) -> list[DetRow]:
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
                    Missing(f"baseline {detector} + {baseline} on {dataset}",
                            f"metrics/eval_det/{detector}-{baseline}-seed*.json", f"absent: no gain for {backbone}")
                )
        comparable = is_paper_dataset(dataset, "det")
        if comparable:
            entry = paper.detection.get((detector, backbone))
            paper_ap = None if entry is None else entry.AP
            paper_gain = paper.det_gain(detector, backbone)
            paper_gain_backbone = backbone if paper_gain is not None else None
            verdict = paper_verdict(bbox["AP"], paper_ap, tolerance)  # type: ignore[arg-type]
        else:
            paper_ap = None
            nearest = paper.nearest_det_gain(detector, backbone)
            paper_gain, paper_gain_backbone = nearest if nearest else (None, None)
            verdict = "baseline" if baseline is None else gain_verdict(gain, paper_gain)
        rows.append(
            DetRow(detector, backbone, dataset, [r.seed for r in runs], bbox, bbox_std, segm, baseline, gain,
                   comparable, paper_ap, paper_gain, paper_gain_backbone, verdict, runs)
        )
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
            train = read_json_object(paths.cls_train_metrics(model, seed), root)
            if isinstance(train, dict) and isinstance(train.get("dataset"), str):
                curve.dataset = train["dataset"]
        curve.histories[seed] = history
    return [by_model[m] for m in sorted(by_model, key=_model_order)]


def summary_json(report: Report) -> dict:
    """reports/summary.json: the DESIGN.md contract (per-run entries) plus the comparison."""
    complexity = {row.model: (row.params_m, row.gflops) for row in report.classification}
    classification = []
    for row in report.classification:
        for run in row.runs:
            classification.append({
                "model": run.model,
                "dataset": run.dataset,
                "seed": run.seed,
                "top1": run.top1,
                "top5": run.top5,
                "params_m": complexity[run.model][0],
                "gflops": complexity[run.model][1],
            })
    detection = []
    for row in report.detection:
        for run in row.runs:
            # The contract holds numbers: an AP COCOeval left undefined (NaN: no detections, or no
            # objects of that size) is 0 here, and named under flags.
            undefined = {}
            entry = {
                "detector": run.detector,
                "backbone": run.backbone,
                "dataset": run.dataset,
                "seed": run.seed,
            }
            for task, values in (("bbox", run.bbox), ("segm", run.segm)):
                if values is None:
                    continue
                entry[task] = {key: 0.0 if value is None else value for key, value in values.items()}
                undefined.update({task: [key for key, value in values.items() if value is None]})
            if any(undefined.values()):
                entry["flags"] = {"nan_reported_as_zero": {t: keys for t, keys in undefined.items() if keys}}
            detection.append(entry)
    return {
        "profile": report.profile,
        "classification": classification,
        "detection": detection,
        "comparison": {
            "tolerance": report.tolerance,
            "classification": [row.to_json() for row in report.classification],
            "detection": [row.to_json() for row in report.detection],
        },
        "missing": [{"what": m.what, "path": m.path, "reason": m.reason} for m in report.missing],
        "notes": list(report.notes),
        "paper": {"source": report.paper.source},
    }


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
    write: bool = True,
) -> Report:
    """Collect every metrics file under `root`, compare with the paper, and write
    reports/summary.json, reports/report.md and reports/report.html (atomically).

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
    detection = _detection_rows(results, paper, tolerance, bootstrap_samples, seed, missing)
    if any(not r.comparable for r in classification) or any(not r.comparable for r in detection):
        notes.append(EMBEDDED_NOTE)
    if not results.classification and not results.detection:
        notes.append("No evaluated runs found under metrics/: run the pipeline first (sge-repro run all).")
    attention_images = [
        path for folder in ATTENTION_DIRS if (root / folder).is_dir() for path in sorted((root / folder).rglob("*.png"))
    ][:MAX_ATTENTION_IMAGES]
    report = Report(
        profile=profile,
        root=root,
        tolerance=tolerance,
        classification=classification,
        detection=detection,
        curves=_curves(results, root),
        missing=missing,
        notes=notes,
        paper=paper,
        results=results,
        attention_images=attention_images,
    )
    report.summary = summary_json(report)
    if write:
        write_report(report, ProjectPaths(root).reports)
    return report


def write_report(report: Report, reports_dir: Path) -> dict[str, Path]:
    """Write summary.json, report.md, report.html under `reports_dir` (atomically), once per report."""
    from sge_repro.report.render import write_report_files

    reports_dir = Path(reports_dir)
    if not report.files or any(path.parent != reports_dir for path in report.files.values()):
        report.files = write_report_files(report, reports_dir)
    return report.files


def load_saved_report(root: Path) -> Report:
    """The report last written to reports/summary.json (for printing its tables without rebuilding)."""
    root = Path(root)
    path = ProjectPaths(root).summary
    data = read_json_object(path, root)
    if data is None:
        raise UserError(f"{path}: no report yet; expected one written by `sge-repro report`")
    try:
        comparison = data["comparison"]
        classification = [
            ClsRow(
                model=r["model"], dataset=r["dataset"], seeds=list(r["seeds"]), top1=r["top1"],
                top1_std=r["top1_std"], top5=r["top5"], top5_std=r["top5_std"], params_m=r["params_m"],
                gflops=r["gflops"], baseline=r["baseline"],
                gain=None if r["gain"] is None else GainInterval.from_json(r["gain"]),
                comparable=r["comparable_with_paper"], paper_top1=r["paper_top1"], paper_gain=r["paper_gain"],
                paper_gain_model=r["paper_gain_model"], verdict=r["verdict"],
            )
            for r in comparison["classification"]
        ]
        detection = [
            DetRow(
                detector=r["detector"], backbone=r["backbone"], dataset=r["dataset"], seeds=list(r["seeds"]),
                bbox=r["bbox"], bbox_std=r["bbox_std"], segm=r.get("segm"), baseline=r["baseline"],
                gain=None if r["gain"] is None else GainInterval.from_json(r["gain"]),
                comparable=r["comparable_with_paper"], paper_ap=r["paper_AP"], paper_gain=r["paper_gain"],
                paper_gain_backbone=r["paper_gain_backbone"], verdict=r["verdict"],
            )
            for r in comparison["detection"]
        ]
        missing = [Missing(m["what"], m["path"], m["reason"]) for m in data.get("missing", [])]
        return Report(
            profile=str(data["profile"]), root=root, tolerance=float(comparison["tolerance"]),
            classification=classification, detection=detection, curves=[], missing=missing,
            notes=list(data.get("notes", [])), paper=load_paper_results(), results=CollectedResults(),
            summary=data,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: not a report written by this version ({error!r}); rerun `sge-repro report`") from error
