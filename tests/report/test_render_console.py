"""The console tables: compact by default (every row one line at 80 and 100 columns), all columns with --wide."""

from pathlib import Path

import pytest
from rich.console import Console

from sge_repro.report import build_report, render_console
from sge_repro.report.render import (CLS_HEADERS, compact_classification_tables, compact_detection_tables,
                                     classification_table)
from sge_repro.report.schema import GainInterval
from sge_repro.report.stats import gain_vs_paper_verdict

from .conftest import fixture_complexity


@pytest.fixture
def report(results_root):
    return build_report(results_root, "embedded", bootstrap_samples=300, complexity=fixture_complexity)


def rendered(report, width: int, wide: bool = False) -> list[str]:
    console = Console(record=True, width=width)
    render_console(report, console, wide=wide)
    return console.export_text().splitlines()


def one_line_each(lines: list[str], rows: list[list[str]]) -> None:
    """Every row's cells, untruncated, on one line of the output."""
    for cells in rows:
        matching = [line for line in lines if all(cell in line for cell in cells)]
        assert len(matching) == 1, (cells, lines)
        assert "…" not in matching[0]


def test_compact_tables_fit_80_and_100_columns(report):
    # the fixture has embedded, ImageNet and COCO rows, verdicts like "same sign, 12.5x paper, n.s."
    cls_tables, det_tables = compact_classification_tables(report), compact_detection_tables(report)
    assert set(cls_tables) == {"embedded", "imagenet"} and set(det_tables) == {"embedded", "coco"}
    for width in (80, 100):
        lines = rendered(report, width)
        table_lines = [line for line in lines if not line.startswith(("note:", "  - "))]
        assert all(len(line) <= width for line in lines)
        for rows in [*cls_tables.values(), *det_tables.values()]:
            one_line_each(table_lines, rows)
        titles = {line.strip() for line in lines}
        assert {"Classification (imagenet)", "Detection (coco, bbox AP)"} <= titles
    sge = next(r for r in cls_tables["embedded"] if r[0] == "sge_resnet18")
    assert sge[1] == "80.00" and sge[3] == "same sign, 12.5x paper, n.s."
    assert sge[2].startswith("+15.0 [+0.0, +")  # the gain and its CI at the paper's precision


def test_longest_names_and_verdicts_still_fit_100_columns(report):
    # the longest detector and backbone, a two-digit negative gain with its CI, and the longest
    # verdicts: of a gain on data the paper did not use, and of a COCO gain (judged on the gain, its
    # compact verdict leaves the CI to the Gain column)
    gain = GainInterval(gain=-12.34, ci_low=-15.67, ci_high=-10.01, method="m", units=3, samples=100)
    wide_gain = GainInterval(gain=-12.34, ci_low=-15.67, ci_high=10.01, method="m", units=3, samples=100)
    coco, embedded = report.detection[1], report.detection[3]
    assert (coco.dataset, coco.judged_on, embedded.dataset) == ("coco", "gain", "embedded")
    added = [
        coco.model_copy(update={"detector": "cascade_rcnn", "backbone": "sge_resnet101", "gain": gain,
                                "paper_gain": 1.8, "verdict": gain_vs_paper_verdict(gain, 1.8)}),
        coco.model_copy(update={"detector": "cascade_rcnn", "backbone": "se_resnet101", "gain": wide_gain,
                                "paper_gain": -1.8, "verdict": gain_vs_paper_verdict(wide_gain, -1.8)}),
        embedded.model_copy(update={"detector": "cascade_rcnn", "backbone": "sge_resnet101", "gain": gain,
                                    "verdict": "same sign, 10.3x paper, n.s."}),
    ]
    report.summary.comparison.detection.extend(added)
    lines = rendered(report, 100)
    one_line_each(lines, [["cascade_rcnn", "sge_resnet101", "-12.3 [-15.7, -10.0]", "opposite to paper's +1.80"],
                          ["cascade_rcnn", "se_resnet101", "-12.3 [-15.7, +10.0]", "gain reproduced: paper -1.80"],
                          ["cascade_rcnn", "sge_resnet101", "-12.3 [-15.7, -10.0]", "same sign, 10.3x paper, n.s."]])


def test_wide_view_has_every_column(report):
    text = "\n".join(rendered(report, 300, wide=True))
    assert all(header in text for header in CLS_HEADERS)
    assert classification_table(report)[1][7] in text  # the gain at 2 decimals
    compact = "\n".join(rendered(report, 300))
    assert "Significance" not in compact and "Top-5 %" not in compact


def test_what_reproduced_lists_each_claim_with_ours_the_papers_and_the_verdict(report):
    from sge_repro.report.files import render_html
    from sge_repro.report.render import claim_table

    claims = {row[0]: row[1:] for row in claim_table(report)}
    # the paper's dataset: absolute numbers, and the gain beside them
    assert claims["resnet50 top-1 (imagenet)"] == ["76.50", "76.38", "reproduced"]
    assert claims["sge_resnet50 top-1 (imagenet)"] == ["77.00, gain +0.50", "77.58, gain +1.20", "-0.58 vs paper"]
    # COCO from detectron2 under protocol controlled: judged on the gain's CI, the plain detector not judged
    assert claims["faster_rcnn sge_resnet50 AP (coco)"] == [
        "38.1, gain +0.60 [+0.60, +0.60]", "38.7, gain +1.20", "gain below paper's +1.20: 95% CI [+0.60, +0.60]"]
    assert claims["faster_rcnn resnet50 AP (coco)"] == ["37.5", "37.5", "baseline; AP +0.00 vs paper, not judged"]
    # data the paper did not use: the gain over the plain ResNet against the paper's gain
    embedded = claims["sge_resnet18 top-1 gain over resnet18 (embedded)"]
    assert embedded[1:] == ["+1.20 (R50)", "same sign, 12.5x paper, n.s."] and embedded[0].startswith("+15.00 [")
    assert "resnet18 top-1 (embedded)" not in claims  # a baseline on other data claims nothing
    html = render_html(report)
    assert html.index("<h2>What reproduced</h2>") < html.index("<h2>Classification</h2>")
    assert "7 result(s) compared with the paper; 2 reproduced within &plusmn;0.3 points" in html
    assert "COCO detectors judged on the gain: 0 of 1 gains reproduced" in html


@pytest.mark.parametrize("dataset", ["my [final] set", "a [/x] set", "[bold]b[/bold]"])
def test_names_print_as_written_never_as_markup(results_root, dataset):
    """A dataset or file name with square brackets is printed as it is: rich neither drops
    `[final]` as a tag nor fails on a closing tag `[/x]` with nothing open."""
    from .conftest import write_cls

    write_cls(results_root, "resnet18", 5, dataset, top1=50.0, top5=90.0)
    report = build_report(results_root, "embedded", bootstrap_samples=300, complexity=fixture_complexity)
    report.summary.notes.append(f"note about {dataset}")
    report.files["report.md"] = Path(f"reports/{dataset}.md")
    for wide in (False, True):
        text = "\n".join(rendered(report, 200, wide=wide))
        assert dataset in text
        assert f"note about {dataset}" in text and f"reports/{dataset}.md" in text
