"""The files of reports/: a self-contained report.html (tables, and every plot as a base64 PNG data
URI), and `write_report_files`, which writes it with summary.json and report.md, each once, atomically."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence


from sge_repro.atomic import write_json, write_text
from sge_repro.report.activations import (
    ACTIVATION_HEADERS,
    ACTIVATION_LEAD,
    activation_table,
    variance_figure,
)
from sge_repro.report.schema import Report
from sge_repro.report.stats import is_reproduced

from sge_repro.report.figures import curve_figure, gains_figure
from sge_repro.report.render import (CLAIM_HEADERS, CLS_HEADERS, DET_HEADERS, STAGE_RUN_HEADERS, claim_table,
                                     classification_table, detection_table, missing_lines, provenance_lines,
                                     render_markdown, stage_run_rows)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, td:nth-child(2) { text-align: left; }
tr.reproduced td { background: #e8f6e8; }
img { max-width: 100%; }
.note { color: #555; }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_table(headers: Sequence[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for cells in rows:
        css = ' class="reproduced"' if is_reproduced(cells[-1]) else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure_html(title: str, png: bytes) -> str:
    return f'<figure><img alt="{html.escape(title)}" src="{_data_uri(png)}"><figcaption>{html.escape(title)}</figcaption></figure>'


def _what_reproduced_html(report: Report) -> list[str]:
    """The page's opening: each claim of the paper with ours, the paper's and the verdict."""
    claims = claim_table(report)
    if not claims:
        return ["<h2>What reproduced</h2><p>No result here has a figure in the paper to compare with.</p>"]
    rows = [*report.classification, *report.detection]
    lead = f"{len(claims)} result(s) compared with the paper"
    if any(row.comparable for row in rows):
        reproduced = sum(1 for claim in claims if claim[-1] == "reproduced")
        lead += f"; {reproduced} reproduced within &plusmn;{report.tolerance:g} points on the paper's datasets"
    judged_on_gain = [row for row in report.detection
                      if row.judged_on == "gain" and row.baseline is not None and row.paper_gain is not None]
    if judged_on_gain:
        gains = sum(1 for row in judged_on_gain if is_reproduced(row.verdict))
        lead += (f"; COCO detectors judged on the gain: {gains} of {len(judged_on_gain)} gains reproduced "
                 "(the paper's gain inside our 95% CI; their plain detectors are not judged)")
    if not all(row.comparable for row in rows):
        lead += ("; on data the paper did not use, the verdict compares the sign and size of the gain "
                 "over the plain ResNet with the paper's gain")
    return ["<h2>What reproduced</h2>", f"<p>{lead}.</p>", _html_table(CLAIM_HEADERS, claims)]


def render_html(report: Report) -> str:
    """A self-contained page: the tables and every plot inline (no external file or server)."""
    escape = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>SGE reproduction report ({escape(report.profile)})</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>SGE reproduction report <small>(profile {escape(report.profile)})</small></h1>",
        *_what_reproduced_html(report),
        f'<p class="note">Paper figures: {escape(report.summary.paper.source)}. Verdict on the paper\'s datasets: '
        f"&ldquo;reproduced&rdquo; when |ours &minus; paper| &le; {report.tolerance:g} points, else the signed gap; "
        "COCO detectors trained with another engine or protocol than the authors' are judged on their gain "
        "instead (&ldquo;gain reproduced&rdquo;: the paper's gain inside our gain's 95% CI; see the notes). "
        "Means &plusmn; sample std over seeds; gains with 95% bootstrap CIs (top-1: paired over validation "
        "images; AP: over seeds).</p>",
        "<h2>Classification</h2>",
        _html_table(CLS_HEADERS, classification_table(report)) if report.classification else "<p>No evaluated runs.</p>",
        "<h2>Detection</h2>",
        _html_table(DET_HEADERS, detection_table(report)) if report.detection else "<p>No evaluated runs.</p>",
    ]
    activations = report.summary.activations
    if activations:
        parts += ["<h2>Activation analysis</h2>",
                  f'<p class="note">{escape(ACTIVATION_LEAD.format(threshold=activations[0].weak_threshold))}</p>',
                  _html_table(ACTIVATION_HEADERS, activation_table(activations)),
                  _figure_html("Per-group variance across positions, before vs after SGE", variance_figure(activations))]
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("<h2>Missing</h2>")
    lines = missing_lines(report)
    parts.append("<ul>" + "".join(f"<li>{escape(line)}</li>" for line in lines) + "</ul>" if lines else "<p>Nothing missing.</p>")
    if report.summary.provenance is not None:
        parts.append("<h2>Provenance</h2><table><tbody>" + "".join(
            f"<tr><th>{escape(what)}</th><td>{escape(value)}</td></tr>" for what, value in provenance_lines(report))
            + "</tbody></table>")
        if stage_run_rows(report):
            parts += ["<h3>Stage runs (their last run, from logs/progress)</h3>",
                      _html_table(STAGE_RUN_HEADERS, stage_run_rows(report))]
    gains = gains_figure(report)
    if gains is not None:
        parts += ["<h2>Gains over the plain baseline</h2>", _figure_html("Gains with 95% bootstrap CIs", gains)]
    if report.curves:
        parts.append("<h2>Training curves</h2>")
        for curve in report.curves:
            parts.append(_figure_html(f"{curve.model} training curves", curve_figure(curve)))
    if report.attention_images:
        parts.append("<h2>SGE attention maps</h2>")
        for path in report.attention_images:
            parts.append(_figure_html(path.stem, path.read_bytes()))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report_files(report: Report, reports_dir: Path) -> dict[str, Path]:
    """Write summary.json, report.md and report.html atomically, each once; returns {kind: path}
    (also kept as report.files, which the console lists)."""
    reports_dir = Path(reports_dir)
    report.files = {
        "summary": write_json(reports_dir / "summary.json", report.summary.model_dump()),
        "markdown": write_text(reports_dir / "report.md", render_markdown(report)),
        "html": write_text(reports_dir / "report.html", render_html(report)),
    }
    return report.files
