import json

import pytest

from sge_repro.errors import UserError
from sge_repro.paths import ProjectPaths
from sge_repro.report.collect import collect_results

from .conftest import populate, write_cls


def test_collects_runs_grouped_with_predictions_and_history(results_root):
    results = collect_results(results_root)
    cls = {(r.model, r.seed): r for r in results.classification}
    assert set(cls) == {("resnet18", 0), ("resnet18", 1), ("sge_resnet18", 0), ("sge_resnet18", 1),
                        ("resnet50", 0), ("sge_resnet50", 0), ("se_resnet101", 0)}
    run = cls[("resnet18", 1)]
    assert (run.dataset, run.top1, run.num_images) == ("embedded", 70.0, 10)
    assert run.predictions is not None and run.predictions.correct.sum() == 7
    assert run.train == {"best_epoch": 3, "best_val_top1": 70.0}
    assert [row["epoch"] for row in run.history] == [1.0, 2.0, 3.0]
    assert "extra" not in run.history[0]  # non-numeric columns are ignored, numeric extras kept
    assert run.history[0]["images_per_s"] == 50.0
    det = {(r.detector, r.backbone, r.seed): r for r in results.detection}
    assert len(det) == 6
    assert det[("mask_rcnn", "resnet18", 0)].segm["APs"] is None
    assert det[("faster_rcnn", "resnet50", 0)].segm is None
    # ImageNet runs were written without per-image predictions: listed, not fatal.
    absent = {m.path for m in results.missing}
    assert "runs/eval_cls/resnet50-seed0.json" in absent


def test_partial_and_absent_metrics_are_missing_not_fatal(tmp_path):
    paths = ProjectPaths(tmp_path)
    write_cls(tmp_path, "resnet18", 0, "embedded", 50.0, 90.0, correct=[1, 0] * 5)
    paths.cls_metrics("sge_resnet18", 0).write_text(json.dumps({"model": "sge_resnet18", "top1": 55.0}))
    paths.det_metrics("faster_rcnn", "resnet18", 0).parent.mkdir(parents=True)
    paths.det_metrics("faster_rcnn", "resnet18", 0).write_text(json.dumps({"dataset": "embedded", "bbox": {"AP": 1.0}}))
    paths.cls_metrics("resnet50", 0).write_text("")  # an empty file
    # Trained but never evaluated.
    paths.cls_history("se_resnet18", 0).write_text("epoch\tval_top1\n1\t10.0\n")
    results = collect_results(tmp_path, expected_models=["resnet18", "sge_resnet18"], seeds=[0, 1])
    assert [(r.model, r.seed) for r in results.classification] == [("resnet18", 0)]
    reasons = {m.path: m.reason for m in results.missing}
    assert reasons["metrics/eval_cls/sge_resnet18-seed0.json"] == "incomplete: no dataset, top5"
    assert reasons["metrics/eval_det/faster_rcnn-resnet18-seed0.json"].startswith("incomplete: no bbox.AP50")
    assert reasons["metrics/eval_cls/resnet50-seed0.json"] == "empty file"
    assert reasons["metrics/eval_cls/se_resnet18-seed0.json"] == "absent: trained but not evaluated"
    assert reasons["metrics/eval_cls/resnet18-seed1.json"] == "absent"
    assert reasons["metrics/eval_cls/sge_resnet18-seed1.json"] == "absent"
    assert ("se_resnet18", 0) in results.orphan_histories


def test_malformed_json_is_a_user_error_naming_the_file(results_root):
    path = ProjectPaths(results_root).cls_metrics("sge_resnet18", 1)
    path.write_text('{"model": "sge_resnet18", "top1": 80.0,')
    with pytest.raises(UserError, match=r"metrics/eval_cls/sge_resnet18-seed1\.json: not valid JSON"):
        collect_results(results_root)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"dataset": "embedded", "top1": "high", "top5": 90.0}, "key 'top1' should be a number"),
        ({"dataset": "embedded", "top1": 0.76, "top5": 190.0}, r"key 'top5' should be a percentage in \[0, 100\]"),
        ({"model": "resnet50", "dataset": "embedded", "top1": 1.0, "top5": 2.0}, "file name says 'resnet18'"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_wrong_types_are_user_errors(tmp_path, record, message):
    path = ProjectPaths(tmp_path).cls_metrics("resnet18", 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    with pytest.raises(UserError, match=message) as error:
        collect_results(tmp_path)
    assert "metrics/eval_cls/resnet18-seed0.json" in str(error.value)


def test_predictions_inconsistent_with_metrics_are_user_errors(tmp_path):
    populate(tmp_path)
    paths = ProjectPaths(tmp_path)
    paths.cls_predictions("resnet18", 0).write_text(json.dumps({"correct": [1, 0, 2], "files": ["a", "b", "c"]}))
    with pytest.raises(UserError, match=r"runs/eval_cls/resnet18-seed0\.json: 'correct' should hold only 0/1"):
        collect_results(tmp_path)
    paths.cls_predictions("resnet18", 0).write_text(json.dumps({"correct": [1, 0], "files": ["a", "b"]}))
    with pytest.raises(UserError, match="2 images, but metrics/eval_cls/resnet18-seed0.json says num_images=10"):
        collect_results(tmp_path)
