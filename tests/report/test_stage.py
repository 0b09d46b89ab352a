"""The report stage function with params.yaml's run lists: a run it asks for without metrics is
reported missing in the files the real `sge-repro report` writes."""

import json

from sge_repro.params import Params
from sge_repro.paths import ProjectPaths
from sge_repro.stage_status import tracking
from sge_repro.stages.report import report as report_stage

from .conftest import write_cls, write_det

CORRECT = [1, 0, 1, 1, 0, 1, 0, 1, 1, 0]


def _params() -> Params:
    return Params.model_validate({
        "profile": "embedded", "seeds": [0], "models": ["resnet18", "sge_resnet18"],
        "detection": {"faster_rcnn": ["resnet18", "sge_resnet18"], "retinanet": []},
        "report": {"bootstrap_samples": 100},
    })


def _write_all_runs(root) -> None:
    for model in ("resnet18", "sge_resnet18"):
        write_cls(root, model, 0, "embedded", top1=60.0, top5=100.0, correct=CORRECT)
        write_det(root, "faster_rcnn", model, 0, "embedded", 20.0)


def test_report_stage_lists_an_expected_run_whose_metrics_file_is_deleted(tmp_path):
    paths = ProjectPaths(tmp_path)
    _write_all_runs(tmp_path)
    complete = report_stage(_params(), paths)
    assert complete.missing == []
    assert complete.files["summary"] == paths.summary

    paths.det_metrics("faster_rcnn", "sge_resnet18", 0).unlink()  # eval_faster_rcnn output of one expected run
    result = report_stage(_params(), paths)
    expected = {"what": "detection faster_rcnn + sge_resnet18 seed 0",
                "path": "metrics/eval_det/faster_rcnn-sge_resnet18-seed0.json", "reason": "absent"}
    summary = json.loads(paths.summary.read_text())
    assert summary["missing"] == [expected]
    assert [(e["detector"], e["backbone"]) for e in summary["detection"]] == [("faster_rcnn", "resnet18")]
    assert [m.model_dump() for m in result.missing] == [expected]
    markdown = (paths.reports / "report.md").read_text()
    assert "- detection faster_rcnn + sge_resnet18 seed 0: absent (metrics/eval_det/faster_rcnn-sge_resnet18-seed0.json)" in markdown


def test_report_stage_provenance_finds_the_detector_stages_under_their_dvc_names(tmp_path):
    """train_<detector>@<backbone>-<seed> / eval_<detector>@...: the names the stages' status files have."""
    paths = ProjectPaths(tmp_path)
    _write_all_runs(tmp_path)
    stages = ["convert@sge_resnet18-0", "train_faster_rcnn@sge_resnet18-0", "eval_faster_rcnn@sge_resnet18-0"]
    for stage in [*stages, "train_retinanet@sge_resnet18-0"]:  # retinanet: not run by these params
        with tracking(paths.stage_status(stage), stage) as status:
            status.update(1, 1, unit="step", phase="train")
    report_stage(_params(), paths)
    summary = json.loads(paths.summary.read_text())
    assert [run["stage"] for run in summary["provenance"]["stages"]] == stages
