import json

import pytest
import torch

from sge_repro.detection.config import build_detector_config
from sge_repro.detection.engine import COCO_METRICS, evaluate_detector, train_detector
from sge_repro.errors import UserError

from .conftest import NUM_CATEGORIES, tiny_overrides


@pytest.mark.parametrize("detector", ["faster_rcnn", "mask_rcnn", "cascade_rcnn", "retinanet"])
def test_detector_with_sge_backbone_trains_and_evaluates(detector, detectron2_weights, registered, tmp_path):
    torch.set_num_threads(1)
    cfg = build_detector_config(detector, "sge_resnet18", detectron2_weights, *registered, tmp_path / "run",
                                num_classes=NUM_CATEGORIES, seed=0, overrides=tiny_overrides())
    final = train_detector(cfg, resume=True)
    assert final == tmp_path / "run" / "model_final.pth" and final.is_file()
    run = tmp_path / "run"
    # periodic checkpoints, the resume marker and TensorBoard events are all there
    assert (run / "model_0000000.pth").is_file() and (run / "last_checkpoint").read_text() == "model_final.pth"
    assert list(run.glob("events.out.tfevents.*"))
    iterations = [json.loads(line)["iteration"] for line in (run / "metrics.json").read_text().splitlines()]
    assert max(iterations) == 1

    result = evaluate_detector(cfg, final, registered[1])
    tasks = ["bbox", "segm"] if detector == "mask_rcnn" else ["bbox"]
    for task in tasks:
        assert set(result[task]) == set(COCO_METRICS)
        assert all(isinstance(v, float) and 0.0 <= v <= 100.0 for v in result[task].values())
        assert set(result["nan_metrics"][task]) <= set(COCO_METRICS)
    assert ("segm" in result) == (detector == "mask_rcnn")
    assert result["num_images"] == 4
    assert result["no_detections"] == (result["num_detections"] == 0)
    json.dumps(result, allow_nan=False)  # the metrics contract: plain JSON, no NaN


def test_divergence_names_the_iteration_and_keeps_the_last_good_checkpoint(detectron2_weights, registered, tmp_path):
    torch.set_num_threads(1)
    cfg = build_detector_config(
        "retinanet", None, detectron2_weights, *registered, tmp_path / "run", NUM_CATEGORIES, 0,
        overrides=tiny_overrides(**{"SOLVER.MAX_ITER": 6, "SOLVER.BASE_LR": 1e12, "SOLVER.WARMUP_ITERS": 0,
                                    "SOLVER.CLIP_GRADIENTS.ENABLED": False}),
    )
    with pytest.raises(UserError, match=r"diverged: loss became NaN or infinite at iteration \d+.*last good checkpoint kept: .*model_\d+\.pth"):
        train_detector(cfg, resume=False)
    assert not (tmp_path / "run" / "model_final.pth").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_detector_trains_and_evaluates_on_cuda(detectron2_weights, registered, tmp_path):
    cfg = build_detector_config("mask_rcnn", None, detectron2_weights, *registered, tmp_path / "run",
                                NUM_CATEGORIES, 0, overrides=tiny_overrides(), device="cuda")
    final = train_detector(cfg, resume=False)
    result = evaluate_detector(cfg, final, registered[1])
    assert set(result["bbox"]) == set(COCO_METRICS) and set(result["segm"]) == set(COCO_METRICS)


def test_loader_workers_started_by_spawn_get_detectron2_with_its_shims(detectron2_weights, registered, tmp_path):
    """A rank the local launcher spawned starts its loader workers by spawn too: each rebuilds the
    dataset from its pickle in a fresh interpreter, where importing detectron2 needs compat's shims
    (Pillow >= 10 lacks the Image.LINEAR its transforms module reads at import)."""
    from sge_repro.detection.loader import build_train_loader, training_records

    torch.set_num_threads(1)
    cfg = build_detector_config("faster_rcnn", "sge_resnet18", detectron2_weights, *registered, tmp_path / "run",
                                num_classes=NUM_CATEGORIES, seed=0,
                                overrides=tiny_overrides(**{"DATALOADER.NUM_WORKERS": 1}))
    loader = build_train_loader(cfg, training_records(cfg), start_iter=0)
    loader.items.multiprocessing_context = "spawn"
    batch = next(iter(loader))
    assert len(batch) == 2 and all(item["image"].dtype == torch.uint8 for item in batch)
