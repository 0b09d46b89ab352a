import base64
import json
from html.parser import HTMLParser

import pytest
from rich.console import Console

from sge_repro.errors import UserError
from sge_repro.paths import ProjectPaths
from sge_repro.report import (
    build_report,
    load_saved_report,
    render_console,
    write_report_files,
)
from sge_repro.report.figures import curve_series
from sge_repro.report.render import classification_table, detection_table
from sge_repro.report.schema import CurveSet

from .conftest import fixture_complexity


def _bbox(ap):
    return {"AP": ap, "AP50": ap + 20, "AP75": ap + 2, "APs": ap - 15, "APm": ap, "APl": ap + 10}


def _cls(model, dataset, seed, top1, top5, params_m, gflops):
    return {"model": model, "dataset": dataset, "seed": seed, "top1": top1, "top5": top5,
            "params_m": params_m, "gflops": gflops}


GOLDEN_CLASSIFICATION = [
    _cls("resnet18", "embedded", 0, 60.0, 100.0, 0.7, 0.05),
    _cls("resnet18", "embedded", 1, 70.0, 100.0, 0.7, 0.05),
    _cls("sge_resnet18", "embedded", 0, 80.0, 100.0, 0.7001, 0.05),
    _cls("sge_resnet18", "embedded", 1, 80.0, 100.0, 0.7001, 0.05),
    _cls("resnet50", "imagenet", 0, 76.5, 93.0, 25.56, 0.05),
    _cls("sge_resnet50", "imagenet", 0, 77.0, 93.5, 25.56, 0.05),
    _cls("se_resnet101", "imagenet", 0, 78.5, 94.0, None, None),
]

# APs undefined in the fixture (NaN flagged by eval det): 0 in the contract, named under flags
_SEGM = {"AP50": 50.0, "AP75": 30.0, "APs": 0.0, "APm": 30.0, "APl": 40.0}
_SEGM_FLAGS = {"flags": {"nan_reported_as_zero": {"segm": ["APs"]}}}
_TRAINED = {"engine": "detectron2", "protocol": "controlled", "backbone_weights": "trained"}
_UNRECORDED = {"engine": None, "protocol": None, "backbone_weights": None}  # metrics from before eval det wrote them
GOLDEN_DETECTION = [
    {"detector": "faster_rcnn", "backbone": "resnet50", "dataset": "coco", "seed": 0, "bbox": _bbox(37.4), **_TRAINED},
    {"detector": "faster_rcnn", "backbone": "resnet50", "dataset": "coco", "seed": 1, "bbox": _bbox(37.6), **_TRAINED},
    {"detector": "faster_rcnn", "backbone": "sge_resnet50", "dataset": "coco", "seed": 0, "bbox": _bbox(38.0),
     **_TRAINED},
    {"detector": "faster_rcnn", "backbone": "sge_resnet50", "dataset": "coco", "seed": 1, "bbox": _bbox(38.2),
     **_TRAINED},
    {"detector": "mask_rcnn", "backbone": "resnet18", "dataset": "embedded", "seed": 0, "bbox": _bbox(20.0),
     "segm": {"AP": 18.0, **_SEGM}, **_SEGM_FLAGS, **_UNRECORDED},
    {"detector": "mask_rcnn", "backbone": "sge_resnet18", "dataset": "embedded", "seed": 0, "bbox": _bbox(19.5),
     "segm": {"AP": 18.5, **_SEGM}, **_SEGM_FLAGS, **_UNRECORDED},
]


@pytest.fixture
def report(results_root):
    built = build_report(results_root, "embedded", bootstrap_samples=2000, seed=0, complexity=fixture_complexity)
    write_report_files(built, results_root / "reports")
    return built


def _approx_tree(value):
    if isinstance(value, dict):
        return {k: _approx_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_approx_tree(v) for v in value]
    return pytest.approx(value) if isinstance(value, float) else value


def test_summary_json_follows_the_contract_with_known_values(report, results_root):
    summary = json.loads(ProjectPaths(results_root).summary.read_text())
    assert summary["profile"] == "embedded"
    assert summary["classification"] == _approx_tree(GOLDEN_CLASSIFICATION)
    assert summary["detection"] == _approx_tree(GOLDEN_DETECTION)
    for entry in summary["classification"]:
        assert set(entry) == {"model", "dataset", "seed", "top1", "top5", "params_m", "gflops"}
    for entry in summary["detection"]:
        # the contract's keys, plus how each run was trained (fields may be added, none removed)
        assert set(entry) - {"segm", "flags"} == {"detector", "backbone", "dataset", "seed", "bbox",
                                                  "engine", "protocol", "backbone_weights"}


def test_comparison_gains_and_verdicts(report):
    comparison = report.summary.model_dump()["comparison"]
    rows = {(r["dataset"], r["model"]): r for r in comparison["classification"]}
    embedded_sge = rows[("embedded", "sge_resnet18")]
    # Paired over the 10 images: per-image difference of the seed means is 0.5 on one image,
    # 1 on another, 0 elsewhere -> +15 points; P(resample misses both) = 0.8^10 > 2.5% -> CI from 0.
    assert embedded_sge["gain"]["gain"] == pytest.approx(15.0)
    assert embedded_sge["gain"]["ci_low"] == pytest.approx(0.0)
    assert embedded_sge["gain"]["significant"] is False
    assert embedded_sge["gain"]["method"] == "paired bootstrap over 10 validation images (2 vs 2 seeds)"
    assert embedded_sge["top1_std"] == 0.0 and rows[("embedded", "resnet18")]["top1_std"] == pytest.approx(7.0711, abs=1e-4)
    assert embedded_sge["verdict"] == "same sign, 12.5x paper, n.s."
    assert embedded_sge["paper_gain_model"] == "sge_resnet50"
    assert rows[("imagenet", "resnet50")]["verdict"] == "reproduced"
    assert rows[("imagenet", "sge_resnet50")]["verdict"] == "-0.58 vs paper"
    assert rows[("imagenet", "sge_resnet50")]["gain"]["method"] == "single run"
    assert rows[("imagenet", "se_resnet101")]["gain"] is None
    det = {(r["detector"], r["backbone"], r["dataset"]): r for r in comparison["detection"]}
    faster = det[("faster_rcnn", "sge_resnet50", "coco")]
    assert faster["gain"]["gain"] == pytest.approx(0.6)
    assert (faster["gain"]["ci_low"], faster["gain"]["ci_high"]) == (pytest.approx(0.6), pytest.approx(0.6))
    # detectron2 + protocol controlled on COCO: judged on the gain, not on the absolute AP (38.1 vs 38.7)
    assert faster["verdict"] == "gain below paper's +1.20: 95% CI [+0.60, +0.60]"
    assert faster["paper_gain"] == pytest.approx(1.2) and faster["judged_on"] == "gain"
    assert (faster["protocol"], faster["backbone_weights"], faster["engine"]) == ("controlled", "trained", "detectron2")
    assert det[("faster_rcnn", "resnet50", "coco")]["verdict"] == "baseline; AP +0.00 vs paper, not judged"
    assert det[("mask_rcnn", "sge_resnet18", "embedded")]["verdict"] == "opposite sign, single run"
    assert det[("mask_rcnn", "sge_resnet18", "embedded")]["judged_on"] == "gain sign and size"
    assert det[("mask_rcnn", "sge_resnet18", "embedded")]["protocol"] is None


def test_tables_have_the_golden_cells(report):
    row = classification_table(report)[1]
    # The exact bootstrap distribution puts its 97.5th percentile at 35 (CDF 0.9755 there, 0.9447
    # at 30, 0.9906 at 40); 2000 resamples land within one support step of it.
    upper = report.classification[1].gain.high
    assert 30.0 <= upper <= 40.0
    assert row == [
        "sge_resnet18", "embedded", "0,1", "0.70", "0.050", "80.00 ± 0.00", "100.00 ± 0.00",
        f"+15.00 [+0.00, +{upper:.2f}]", "not significant", "-", "+1.20 (R50)", "same sign, 12.5x paper, n.s.",
    ]
    assert classification_table(report)[3][2] == "0 (single run)"
    assert detection_table(report)[1] == [
        "faster_rcnn", "sge_resnet50", "coco", "controlled", "trained", "0,1", "38.10 ± 0.14", "58.10", "40.10",
        "23.10", "38.10", "48.10", "-", "+0.60 [+0.60, +0.60]", "significant", "38.7", "+1.20",
        "gain below paper's +1.20: 95% CI [+0.60, +0.60]",
    ]
    assert detection_table(report)[3][3:5] == ["-", "-"]  # protocol and weights not recorded
    assert detection_table(report)[3][12] == "18.50"  # mask AP


def test_missing_and_notes_are_reported(report, results_root):
    missing = {m.path: m.reason for m in report.missing}
    assert missing["metrics/eval_cls/resnet101-seed*.json"] == "absent: no gain for se_resnet101"
    assert missing["runs/eval_cls/sge_resnet50-seed0.json"].startswith("absent: no paired bootstrap")
    assert any("se_resnet101 not shown" in note for note in report.notes)
    assert any("not comparable" in note for note in report.notes)
    markdown = (results_root / "reports" / "report.md").read_text()
    assert "baseline resnet101 on imagenet: absent: no gain for se_resnet101" in markdown
    assert "| sge_resnet50 | imagenet | 0 (single run) |" in markdown


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.cells, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("link", "script") and (attrs.get("href") or attrs.get("src")):
            self.external.append(tag)

    def handle_data(self, data):
        self.cells.append(data)


def test_html_is_self_contained_and_every_image_is_embedded(report, results_root):
    parser = _Collector()
    parser.feed((results_root / "reports" / "report.html").read_text())
    parser.close()
    assert not parser.external
    # 1 gains chart + training curves of the 5 models that have a history.
    assert len(parser.images) == 6
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    for cell in classification_table(report)[1] + detection_table(report)[1]:
        assert cell in parser.cells


def test_attention_maps_are_embedded_in_the_html(results_root):
    from sge_repro.atomic import write_bytes

    from .test_visualize import PNG_SIGNATURE

    write_bytes(results_root / "runs" / "visualize" / "val_0001-layer3.1.png", PNG_SIGNATURE + b"fake")
    write_report_files(build_report(results_root, "embedded", bootstrap_samples=100, complexity=fixture_complexity),
                       results_root / "reports")
    parser = _Collector()
    parser.feed((results_root / "reports" / "report.html").read_text())
    assert len(parser.images) == 7
    assert parser.images[-1] == "data:image/png;base64," + base64.b64encode(PNG_SIGNATURE + b"fake").decode()
    assert "val_0001-layer3.1" in parser.cells


def test_training_curves_overlay_the_authors_log_only_on_imagenet(report):
    curves = {c.model: c for c in report.curves}
    imagenet = curve_series(curves["resnet50"])
    authors = [s for s in imagenet if s.authors]
    assert [s.label for s in authors] == ["authors train_loss", "authors val_loss", "authors val_top1"]
    assert max(authors[2].values) == pytest.approx(76.384, abs=1e-3)
    embedded = curve_series(curves["sge_resnet18"])
    assert not any(s.authors for s in embedded)
    assert {s.label for s in embedded} >= {"ours seed 0 val_top1", "ours seed 1 train_loss"}
    assert curve_series(CurveSet("resnet18", "imagenet", {})) == []  # no authors' log for R18


def test_console_output_and_saved_report_round_trip(report, results_root):
    console = Console(record=True, width=260)
    render_console(report, console, wide=True)
    text = console.export_text()
    assert "reproduced" in text and classification_table(report)[1][7] in text
    assert "Missing (4)" in text
    saved = load_saved_report(results_root)
    assert classification_table(saved) == classification_table(report)
    assert detection_table(saved) == detection_table(report)
    assert [m.path for m in saved.missing] == [m.path for m in report.missing]


def test_build_writes_nothing_and_writing_gives_the_three_files(results_root):
    built = build_report(results_root, "embedded", bootstrap_samples=100, complexity=fixture_complexity)
    assert not (results_root / "reports").exists()
    reports = results_root / "reports"
    files = write_report_files(built, reports)
    assert files == built.files == {"summary": reports / "summary.json", "markdown": reports / "report.md",
                                    "html": reports / "report.html"}
    assert sorted(p.name for p in reports.iterdir()) == ["report.html", "report.md", "summary.json"]
    assert json.loads((reports / "summary.json").read_text()) == built.summary.model_dump()


def test_saved_summary_reads_back_into_the_same_model(report, results_root):
    text = ProjectPaths(results_root).summary.read_text()
    saved = load_saved_report(results_root)
    assert saved.summary == report.summary
    assert json.dumps(saved.summary.model_dump(), indent=2, allow_nan=False) + "\n" == text
    # the optional keys stay absent when absent (no segm for faster_rcnn, no flags without NaN)
    faster = json.loads(text)["detection"][0]
    assert "segm" not in faster and "flags" not in faster
    assert "segm" not in json.loads(text)["comparison"]["detection"][0]


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda s: s["comparison"]["classification"][1].update(top1="high"), "comparison.classification.1.top1"),
        (lambda s: s["detection"][0]["bbox"].update(AP=None), "detection.0.bbox.AP"),
        (lambda s: s.pop("profile"), "profile"),
    ],
)
def test_malformed_saved_summary_is_a_user_error_naming_file_and_key(report, results_root, edit, key):
    path = ProjectPaths(results_root).summary
    summary = json.loads(path.read_text())
    edit(summary)
    path.write_text(json.dumps(summary))
    with pytest.raises(UserError, match=rf"summary\.json: key '{key}': ") as error:
        load_saved_report(results_root)
    assert "rerun `sge-repro report`" in str(error.value)


def test_empty_project_gives_a_report_that_says_so(tmp_path):
    report = build_report(tmp_path, "smoke", bootstrap_samples=10, complexity=fixture_complexity,
                          expected_models=["resnet18"], seeds=[0])
    write_report_files(report, tmp_path / "reports")
    assert report.summary.classification == [] and report.summary.detection == []
    assert report.summary.model_dump()["missing"] == [
        {"what": "classification resnet18 seed 0", "path": "metrics/eval_cls/resnet18-seed0.json", "reason": "absent"}
    ]
    assert "No evaluated runs." in (tmp_path / "reports" / "report.md").read_text()


def test_malformed_metrics_stop_the_report_with_the_file_name(results_root):
    path = ProjectPaths(results_root).det_metrics("faster_rcnn", "resnet50", 1)
    path.write_text("{not json")
    with pytest.raises(UserError, match=r"metrics/eval_det/faster_rcnn-resnet50-seed1\.json: not valid JSON"):
        build_report(results_root, "embedded", complexity=fixture_complexity)
    assert not (results_root / "reports").exists()


def test_bad_report_arguments_and_missing_saved_report(tmp_path):
    with pytest.raises(UserError, match="tolerance"):
        build_report(tmp_path, "embedded", tolerance=-1)
    with pytest.raises(UserError, match="summary.json: no report yet"):
        load_saved_report(tmp_path)
