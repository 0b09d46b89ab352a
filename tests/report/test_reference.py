import pytest

from sge_repro.errors import UserError
from sge_repro.report.reference import (
    is_paper_dataset,
    load_paper_results,
    official_log,
    parse_official_log,
    parse_paper_results,
    plain_baseline,
    split_model_name,
)


def test_packaged_paper_numbers_and_gains():
    paper = load_paper_results()
    assert "1905.09646" in paper.source
    assert len(paper.classification) == 12 and len(paper.detection) == 15
    assert paper.classification["sge_resnet50"].top1 == 77.584
    assert paper.cls_gain("sge_resnet50") == pytest.approx(1.2)  # the abstract's +1.2 top-1
    assert paper.cls_gain("resnet50") is None
    assert paper.det_gain("cascade_rcnn", "sge_resnet101") == pytest.approx(1.8)
    assert paper.det_gain("retinanet", "sge_resnet50") is None


def test_nearest_paper_gain_for_models_the_paper_does_not_have():
    paper = load_paper_results()
    assert paper.nearest_cls_gain("sge_resnet18") == (pytest.approx(1.2), "sge_resnet50")
    assert paper.nearest_cls_gain("sge_resnet152") == (pytest.approx(0.598), "sge_resnet101")
    assert paper.nearest_det_gain("mask_rcnn", "sge_resnet18") == (pytest.approx(1.0), "sge_resnet50")
    assert paper.nearest_cls_gain("resnet18") is None
    assert paper.nearest_det_gain("retinanet", "sge_resnet50") is None


def test_model_names_and_baselines():
    assert split_model_name("cbam_resnet101") == ("cbam", "resnet101", 101)
    assert plain_baseline("sge_resnet50") == "resnet50"
    assert plain_baseline("se_resnet18") == "resnet18"
    assert plain_baseline("resnet50") is None
    assert is_paper_dataset("imagenet", "cls") and is_paper_dataset("ImageNet-1k", "cls")
    assert is_paper_dataset("coco", "det") and not is_paper_dataset("embedded", "det")


def test_official_logs_match_the_paper_best_epochs():
    paper = load_paper_results()
    with_logs = [m for m in paper.classification if official_log(m) is not None]
    assert len(with_logs) == 11  # every model but SE-ResNet50
    for model in with_logs:
        log = official_log(model)
        assert len(log) == 100 and log[0]["epoch"] == 1.0 and log[0]["lr"] == pytest.approx(0.1)
        best = max(row["val_top1"] for row in log)
        assert best == pytest.approx(paper.classification[model].top1, abs=0.1), model
    assert official_log("resnet18") is None


def test_bad_reference_files_raise_user_errors_naming_them():
    with pytest.raises(UserError, match="custom.yaml: missing key 'detection'"):
        parse_paper_results("source: x\nclassification: {results: []}\n", where="custom.yaml")
    with pytest.raises(UserError, match="x.tsv: unexpected log columns"):
        parse_official_log("Epoch\tTop1\n1\t2\n", where="x.tsv")
