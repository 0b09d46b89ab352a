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


def test_reads_the_classification_engine_prediction_layout(tmp_path):
    """evaluate_checkpoint writes correct_top1 / correct_top5 / targets ...; seed may be null."""
    paths = ProjectPaths(tmp_path)
    write_cls(tmp_path, "resnet18", 0, "embedded", 50.0, 90.0)
    paths.cls_metrics("resnet18", 0).write_text(json.dumps(
        {"model": "resnet18", "dataset": "embedded", "seed": None, "top1": 50.0, "top5": 90.0, "loss": 1.0,
         "num_images": 4, "skipped_corrupt": 0}))
    paths.cls_predictions("resnet18", 0).parent.mkdir(parents=True)
    paths.cls_predictions("resnet18", 0).write_text(json.dumps(
        {"model": "resnet18", "dataset": "embedded", "seed": None, "classes": ["a", "b"], "files": ["1", "2", "3", "4"],
         "targets": [0, 0, 1, 1], "predictions": [0, 1, 1, 0], "correct_top1": [1, 0, 1, 0], "correct_top5": [1, 1, 1, 1]}))
    [run] = collect_results(tmp_path).classification
    assert run.predictions.correct.tolist() == [1, 0, 1, 0] and run.seed == 0


def test_nan_flags_of_the_detection_stage_become_absent_values(tmp_path):
    """eval det writes COCO NaN as 0.0 and lists the keys under flags.nan_reported_as_zero."""
    paths = ProjectPaths(tmp_path)
    path = paths.det_metrics("mask_rcnn", "sge_resnet18", 0)
    path.parent.mkdir(parents=True)
    bbox = {"AP": 12.0, "AP50": 30.0, "AP75": 8.0, "APs": 0.0, "APm": 10.0, "APl": 20.0}
    segm = {**bbox, "APl": 0.0}
    path.write_text(json.dumps({"detector": "mask_rcnn", "backbone": "sge_resnet18", "seed": 0, "dataset": "embedded",
                                "bbox": bbox, "segm": segm, "flags": {"no_detections": False,
                                "nan_reported_as_zero": {"bbox": ["APs"], "segm": ["APs", "APl"]}}}))
    blank = paths.det_metrics("mask_rcnn", "resnet18", 0)
    zeros = dict.fromkeys(bbox, 0.0)
    blank.write_text(json.dumps({"dataset": "embedded", "bbox": zeros, "flags": {"no_detections": True,
                                 "nan_reported_as_zero": {"bbox": list(zeros)}}}))
    results = collect_results(tmp_path)
    runs = {r.backbone: r for r in results.detection}
    assert runs["sge_resnet18"].bbox["APs"] is None and runs["sge_resnet18"].bbox["APm"] == 10.0
    assert runs["sge_resnet18"].segm["APl"] is None and runs["sge_resnet18"].segm["AP"] == 12.0
    assert runs["resnet18"].bbox["AP"] == 0.0  # found nothing: a real zero, with a note
    assert results.notes == ["detection mask_rcnn + resnet18 seed 0 made no detections on the validation set: its APs are 0."]
