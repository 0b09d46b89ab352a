"""Render a built report (schema.Report): its tables as text cells, rich tables on the console,
and report.md (report.html and the writing of reports/: sge_repro.report.files).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from sge_repro.report.activations import (
    ACTIVATION_HEADERS,
    ACTIVATION_LEAD,
    activation_line,
    activation_table,
)
from sge_repro.report.reference import split_model_name
from sge_repro.report.schema import DetRow, GainInterval, Report
from sge_repro.report.stats import detection_gain_verdict, is_reproduced, significance_label

if TYPE_CHECKING:
    from rich.console import Console

DASH = "-"

CLS_HEADERS = (
    "Model", "Dataset", "Seeds", "#Params (M)", "GFLOPs", "Top-1 %", "Top-5 %",
    "Gain vs plain [95% CI]", "Significance", "Paper top-1", "Paper gain", "Verdict",
)
DET_HEADERS = (
    "Detector", "Backbone", "Dataset", "Protocol", "Backbone weights", "Seeds", "AP", "AP50", "AP75", "APs", "APm", "APl", "Mask AP",
    "Gain vs plain [95% CI]", "Significance", "Paper AP", "Paper gain", "Verdict",
)


# ---------------------------------------------------------------- cell formatting

def _number(value: float | None, digits: int = 2) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return DASH
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _seeds(seeds: Sequence[int]) -> str:
    listed = ",".join(str(s) for s in seeds)
    return f"{listed} (single run)" if len(seeds) == 1 else listed


def _gain(gain: GainInterval | None, digits: int = 2) -> str:
    if gain is None:
        return DASH
    if gain.low is None or gain.high is None:
        return f"{gain.estimate:+.{digits}f}"
    return f"{gain.estimate:+.{digits}f} [{gain.low:+.{digits}f}, {gain.high:+.{digits}f}]"


def _paper_gain(value: float | None, source: str | None, own_name: str) -> str:
    if value is None:
        return DASH
    if source in (None, own_name):
        return f"{value:+.2f}"
    depth = split_model_name(source)[2]
    return f"{value:+.2f} (R{depth})" if depth is not None else f"{value:+.2f} ({source})"


def _protocol(protocol: str | None, engine: str | None) -> str:
    """The detection protocol, with the engine when it is not detectron2 (the one this project runs)."""
    text = protocol or DASH
    return text if engine in (None, "detectron2") else f"{text} ({engine})"


def classification_table(report: Report) -> list[list[str]]:
    """The classification table's rows as display strings (shared by console, md and html)."""
    return [[
        row.model,
        row.dataset,
        _seeds(row.seeds),
        _number(row.params_m),
        _number(row.gflops, 3),
        _mean_std(row.top1, row.top1_std),
        _mean_std(row.top5, row.top5_std),
        _gain(row.gain),
        significance_label(row.gain),
        _number(row.paper_top1, 3),
        _paper_gain(row.paper_gain, row.paper_gain_model, row.model),
        row.verdict,
    ] for row in report.classification]


def detection_table(report: Report) -> list[list[str]]:
    return [[
        row.detector,
        row.backbone,
        row.dataset,
        _protocol(row.protocol, row.engine),
        row.backbone_weights or DASH,
        _seeds(row.seeds),
        _mean_std(row.bbox["AP"], row.bbox_std["AP"]),
        *(_number(row.bbox[k]) for k in ("AP50", "AP75", "APs", "APm", "APl")),
        DASH if row.segm is None else _number(row.segm.get("AP")),
        _gain(row.gain),
        significance_label(row.gain),
        _number(row.paper_ap, 1),
        _paper_gain(row.paper_gain, row.paper_gain_backbone, row.backbone),
        row.verdict,
    ] for row in report.detection]


# The compact console view (the default): what a reader scans first, one line per row at 80 columns.
CLS_COMPACT_HEADERS = ("Model", "Top-1 %", "Gain [95% CI]", "Verdict")
DET_COMPACT_HEADERS = ("Detector", "Backbone", "AP", "Gain [95% CI]", "Verdict")


def compact_classification_tables(report: Report) -> dict[str, list[list[str]]]:
    """{dataset: rows} of the compact classification view: mean top-1 (2 decimals), the gain
    with its CI at 1 decimal (the paper's precision), the verdict."""
    tables: dict[str, list[list[str]]] = {}
    for row in report.classification:
        tables.setdefault(row.dataset, []).append([row.model, _number(row.top1), _gain(row.gain, 1), row.verdict])
    return tables


def _compact_detection_verdict(row: DetRow) -> str:
    """A row judged on the gain (schema.DetRow.judged_on) has its verdict without the CI, which the
    Gain column shows: the full one ("gain below paper's +1.20: 95% CI [+0.40, +0.80]") does not
    fit 80 columns beside it. Other verdicts are short already."""
    if row.judged_on != "gain":
        return row.verdict
    return detection_gain_verdict(row.baseline is None, row.gain, row.paper_gain, row.bbox["AP"], row.paper_ap,
                                  compact=True)


def compact_detection_tables(report: Report) -> dict[str, list[list[str]]]:
    """{dataset: rows} of the compact detection view: mean bbox AP and gain at 1 decimal (COCO's
    usual precision), the verdict (in short where it is judged on the gain)."""
    tables: dict[str, list[list[str]]] = {}
    for row in report.detection:
        tables.setdefault(row.dataset, []).append([row.detector, row.backbone, _number(row.bbox["AP"], 1),
                                                   _gain(row.gain, 1), _compact_detection_verdict(row)])
    return tables


CLAIM_HEADERS = ("Claim of the paper", "Ours", "Paper", "Verdict")


def claim_table(report: Report) -> list[list[str]]:
    """One row per result the paper has a figure for (its top-1 / AP, or the gain of an attention
    model over its plain ResNet): what it is, ours, the paper's, the verdict."""
    rows = []
    for row in report.classification:
        if row.paper_top1 is None and row.paper_gain is None:
            continue
        paper_gain = _paper_gain(row.paper_gain, row.paper_gain_model, row.model)
        rows.append(_claim(f"{row.model} top-1", row.baseline, row.dataset, row.comparable, f"{row.top1:.2f}",
                           row.gain, _number(row.paper_top1, 2), paper_gain, row.verdict))
    for row in report.detection:
        if row.paper_ap is None and row.paper_gain is None:
            continue
        paper_gain = _paper_gain(row.paper_gain, row.paper_gain_backbone, row.backbone)
        ours = DASH if row.bbox["AP"] is None else f"{row.bbox['AP']:.1f}"
        rows.append(_claim(f"{row.detector} {row.backbone} AP", row.baseline, row.dataset, row.comparable, ours,
                           row.gain, _number(row.paper_ap, 1), paper_gain, row.verdict))
    return rows


def _claim(what: str, baseline: str | None, dataset: str, comparable: bool, ours: str, gain: GainInterval | None,
           paper: str, paper_gain: str, verdict: str) -> list[str]:
    """Absolute numbers where they compare (the paper's dataset), else the gain over the baseline."""
    claim = f"{what} gain over {baseline} ({dataset})" if baseline and not comparable else f"{what} ({dataset})"
    if comparable:
        ours_text = ours + (f", gain {_gain(gain)}" if gain is not None else "")
        paper_text = paper + (f", gain {paper_gain}" if baseline and paper_gain != DASH else "")
        return [claim, ours_text, paper_text, verdict]
    return [claim, _gain(gain), paper_gain, verdict]


def headline_metrics(report: Report) -> dict[str, dict[str, float]]:
    """metrics/report.json: mean top-1 and bbox AP per model / detector + backbone, and each gain
    over the plain baseline (2 decimals; the key gains `@dataset` when a name is on several)."""
    def key(name: str, dataset: str, names: list[str]) -> str:
        return name if names.count(name) == 1 else f"{name}@{dataset}"

    models = [row.model for row in report.classification]
    detectors = [f"{row.detector}-{row.backbone}" for row in report.detection]
    out: dict[str, dict[str, float]] = {"top1": {}, "gain_top1": {}, "AP": {}, "gain_AP": {}}
    for row in report.classification:
        name = key(row.model, row.dataset, models)
        out["top1"][name] = round(row.top1, 2)
        if row.gain is not None:
            out["gain_top1"][name] = round(row.gain.estimate, 2)
    for row in report.detection:
        name = key(f"{row.detector}-{row.backbone}", row.dataset, detectors)
        if row.bbox.get("AP") is not None:
            out["AP"][name] = round(row.bbox["AP"], 2)
        if row.gain is not None:
            out["gain_AP"][name] = round(row.gain.estimate, 2)
    return {group: values for group, values in out.items() if values}


def provenance_lines(report: Report) -> list[tuple[str, str]]:
    """(what, value) pairs of summary.json's provenance, for md / html; [] when absent."""
    made = report.summary.provenance
    if made is None:
        return []
    if made.git_commit is None:
        code = "not a git work tree"
    else:
        code = made.git_commit[:12] + (" (dirty: " + ", ".join(made.git_changed) + ")" if made.git_dirty else " (clean)")
    hw = made.hardware
    gpus = f"{hw.gpu_count} x {hw.gpus[0]}" if hw.gpus else "none"
    return [
        ("code (git)", code),
        ("params.yaml sha256", made.params_sha256 or "absent"),
        ("profile", made.profile),
        ("packages", ", ".join(f"{k} {v}" for k, v in made.packages.items())),
        ("report built on", f"{hw.cpu} ({hw.cpu_count} CPUs), GPUs: {gpus}; {hw.platform}"),
    ]


def stage_run_rows(report: Report) -> list[list[str]]:
    made = report.summary.provenance
    if made is None:
        return []
    return [[r.stage, r.state, f"{r.wall_time_s:.1f}", r.finished, r.host, str(r.world_size), r.devices or "cpu"]
            for r in made.stages]


STAGE_RUN_HEADERS = ("Stage", "State", "Wall time (s)", "Finished (UTC)", "Host", "Processes", "Devices")


def missing_lines(report: Report) -> list[str]:
    return [f"{m.what}: {m.reason} ({m.path})" for m in report.missing]


# ---------------------------------------------------------------- console

def render_console(report: Report, console: Console, wide: bool = False) -> None:
    """Print the report's tables, notes and what is missing with rich.

    By default the compact tables (one per dataset; every row one line at 80 columns); with
    `wide`, every column of report.md / report.html (cells fold on a narrow terminal)."""
    def full_table(title: str, headers: Sequence[str], rows: list[list[str]]) -> Table:
        out = Table(title=Text(title), title_justify="left", header_style="bold")
        for index, header in enumerate(headers):
            out.add_column(header, justify="right" if 3 <= index < len(headers) - 1 else "left", overflow="fold")
        for cells in rows:
            out.add_row(*map(Text, cells), style="green" if is_reproduced(cells[-1]) else None)
        return out

    def compact_table(title: str, headers: Sequence[str], rows: list[list[str]]) -> Table:
        out = Table(title=Text(title), title_justify="left", header_style="bold", box=box.SIMPLE_HEAD,
                    show_edge=False, pad_edge=False, collapse_padding=True)
        for header in headers:
            numeric = header in ("Top-1 %", "AP", "Gain [95% CI]")
            # never wrapped: a cell too long for the terminal ends in an ellipsis (--wide shows all)
            out.add_column(header, justify="right" if numeric else "left", no_wrap=True, overflow="ellipsis")
        for cells in rows:
            out.add_row(*map(Text, cells), style="green" if is_reproduced(cells[-1]) else None)
        return out

    console.print(f"[bold]SGE reproduction report[/bold] - profile [cyan]{escape(report.profile)}[/cyan], "
                  f"tolerance ±{report.tolerance:g} points")
    if not report.classification:
        console.print("Classification: no evaluated runs.")
    elif wide:
        console.print(full_table("Classification", CLS_HEADERS, classification_table(report)))
    else:
        for dataset, rows in compact_classification_tables(report).items():
            console.print(compact_table(f"Classification ({dataset})", CLS_COMPACT_HEADERS, rows))
    if not report.detection:
        console.print("Detection: no evaluated runs.")
    elif wide:
        console.print(full_table("Detection (COCO-style bbox AP)", DET_HEADERS, detection_table(report)))
    else:
        for dataset, rows in compact_detection_tables(report).items():
            console.print(compact_table(f"Detection ({dataset}, bbox AP)", DET_COMPACT_HEADERS, rows))
    if not wide and (report.classification or report.detection):
        console.print("[dim]means over seeds; --wide (and reports/report.md, report.html): every column[/dim]")
    for row in report.summary.activations or ():
        console.print(activation_line(row), highlight=False, markup=False)
    made = report.summary.provenance
    if made is not None:
        code = "no git" if made.git_commit is None else made.git_commit[:10] + (" dirty" if made.git_dirty else "")
        console.print(f"[dim]made by: code {code}, params.yaml sha256 {(made.params_sha256 or '-')[:12]}, "
                      f"{len(made.stages)} stage runs (summary.json: provenance)[/dim]", highlight=False)
    for note in report.notes:
        console.print(f"[dim]note:[/dim] {escape(note)}", highlight=False)
    if report.missing:
        console.print(f"[yellow]Missing ({len(report.missing)}):[/yellow]")
        for line in missing_lines(report):
            console.print(f"  - {line}", highlight=False, markup=False)
    for name, path in report.files.items():
        console.print(f"[dim]wrote {name}:[/dim] {escape(str(path))}", highlight=False)


# ---------------------------------------------------------------- markdown

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(headers: Sequence[str], rows: list[list[str]]) -> str:
    text_columns = {"Model", "Dataset", "Seeds", "Detector", "Backbone", "Protocol", "Backbone weights",
                    "Significance", "Verdict", "Stage", "State", "Finished (UTC)", "Host", "Devices",
                    "Claim of the paper", "Ours", "Paper", "Layer", "Gate weak / strong"}
    align = ["--:" if h not in text_columns else ":--" for h in headers]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in cells) + " |" for cells in rows]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    parts = [
        f"# SGE reproduction report (profile `{report.profile}`)",
        "",
        f"Paper figures: {report.summary.paper.source}. Verdict on the paper's datasets: \"reproduced\" when "
        f"|ours - paper| <= {report.tolerance:g} points, else the signed gap; COCO detectors trained with "
        "another engine or protocol than the authors' are judged on their gain instead (\"gain reproduced\": "
        "the paper's gain inside our gain's 95% CI; see the notes). Means ± sample std over "
        "seeds; gains with 95% bootstrap confidence intervals (top-1: paired over validation images; "
        "AP: over seeds).",
        "",
        "## Classification",
        "",
        _md_table(CLS_HEADERS, classification_table(report)) if report.classification else "No evaluated runs.",
        "",
        "## Detection",
        "",
        _md_table(DET_HEADERS, detection_table(report)) if report.detection else "No evaluated runs.",
        "",
    ]
    activations = report.summary.activations
    if activations:
        parts += ["## Activation analysis", "", ACTIVATION_LEAD.format(threshold=activations[0].weak_threshold), "",
                  _md_table(ACTIVATION_HEADERS, activation_table(activations)), ""]
    if report.notes:
        parts += ["## Notes", ""] + [f"- {note}" for note in report.notes] + [""]
    parts += ["## Missing", ""]
    parts += [f"- {_md_cell(line)}" for line in missing_lines(report)] or ["Nothing missing."]
    if report.summary.provenance is not None:
        parts += ["", "## Provenance", ""] + [f"- {what}: {_md_cell(value)}" for what, value in provenance_lines(report)]
        if stage_run_rows(report):
            parts += ["", _md_table(STAGE_RUN_HEADERS, stage_run_rows(report))]
    parts += ["", "Plots (training curves, gains with CIs): see `report.html`.", ""]
    return "\n".join(parts)
