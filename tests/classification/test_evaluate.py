"""evaluate_classifier on a checkpoint written by train_classifier (and the checkpoint's format)."""

import json

import pytest
import torch

from sge_repro.classification.evaluate import evaluate_classifier
from sge_repro.errors import UserError
from sge_repro.models import create_model
from sge_repro.params_sections import EvalClsParams

from .conftest import cls_manifest, outputs


def test_checkpoint_format_and_evaluation(finished_run, data_root, tmp_path):
    run, metrics, _ = finished_run
    run_dir, _, _ = outputs(run)
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["format"] == "sge-repro/classifier/v1" and state["model"] == "resnet18"
    assert state["model_kwargs"]["num_classes"] == 3 and state["model_kwargs"]["width"] == 8
    assert state["epoch"] == 6 and state["classes"] == ["n00000000", "n00000001", "n00000002"]
    assert {"optimizer", "scheduler", "rng", "history", "best"} <= set(state)
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["epoch"] == metrics["best_epoch"]

    model = create_model("resnet18", num_classes=3, width=8, checkpoint=run_dir / "best.pt")
    assert isinstance(model, torch.nn.Module)
    result = evaluate_classifier(EvalClsParams(image_size=32, batch_size=5), run_dir / "best.pt", data_root,
                                 tmp_path / "eval.json", tmp_path / "pred.json", dataset_name="embedded")
    # Evaluating best.pt reproduces the validation of its epoch during training.
    assert result["top1"] == pytest.approx(metrics["best_top1"], abs=1e-9)
    assert result["top5"] == pytest.approx(metrics["best_top5"], abs=1e-9)
    assert set(result) >= {"model", "dataset", "seed", "top1", "top5", "loss", "num_images"}
    assert result["dataset"] == "embedded" and result["seed"] == 3 and result["num_images"] == 30
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    predictions = json.loads((tmp_path / "pred.json").read_text())
    assert len(predictions["correct_top1"]) == len(predictions["files"]) == 30
    assert set(predictions["correct_top1"]) <= {0, 1}
    assert 100 * sum(predictions["correct_top1"]) / 30 == pytest.approx(result["top1"])
    assert predictions["files"][0].startswith("n00000000/")
    assert predictions["correct_top1"] == [int(p == t) for p, t in
                                           zip(predictions["predictions"], predictions["targets"])]


def test_a_val_subset_is_evaluated_recorded_and_named_in_the_report(finished_run, tmp_path):
    """max_val_images: the eval stage scores the manifest's evenly spaced val images, records how
    many of the split it took, and the report says so."""
    from sge_repro.paths import ProjectPaths
    from sge_repro.report import build_report
    from sge_repro.report.render import render_markdown

    best = outputs(finished_run[0])[0] / "best.pt"
    params = EvalClsParams(image_size=32, batch_size=5)
    project = ProjectPaths(tmp_path / "project")
    full = evaluate_classifier(params, best, cls_manifest(project.root), tmp_path / "m.json", tmp_path / "p.json")
    whole = json.loads((tmp_path / "p.json").read_text())
    assert full["num_images"] == 30 and "subset_of" not in full   # the whole split: the metrics as before

    manifest = cls_manifest(project.root, max_val_images=7)
    metrics = evaluate_classifier(params, best, manifest, project.cls_metrics("resnet18", 3),
                                  project.cls_predictions("resnet18", 3), dataset_name="embedded")
    assert metrics["num_images"] == 7 and metrics["subset_of"] == 30
    predictions = json.loads(project.cls_predictions("resnet18", 3).read_text())
    picked = [i * 30 // 7 for i in range(7)]   # the images every reader of the manifest takes
    assert predictions["files"] == [whole["files"][i] for i in picked]
    assert predictions["predictions"] == [whole["predictions"][i] for i in picked]
    assert predictions["classes"] == whole["classes"] and len(set(predictions["targets"])) == 3

    report = build_report(project.root, "rehearsal", bootstrap_samples=50,
                          complexity=lambda name: {"params_m": 1.0, "gflops": 1.0})
    note = ("Classification on embedded: top-1 / top-5 over 7 of its 30 validation images "
            "(data.classification.max_val_images), not the whole validation set.")
    assert note in report.summary.notes and note in render_markdown(report)


def test_evaluation_rejects_wrong_model_name(finished_run, data_root, tmp_path):
    run_dir, _, _ = outputs(finished_run[0])
    with pytest.raises(UserError, match="holds model 'resnet18', expected 'sge_resnet18'"):
        evaluate_classifier(EvalClsParams(image_size=32, batch_size=4), run_dir / "best.pt", data_root,
                            tmp_path / "m.json", tmp_path / "p.json", model_name="sge_resnet18")
    assert not (tmp_path / "m.json").exists()

