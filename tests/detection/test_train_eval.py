import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sge_repro.detection.config import build_detector_config
from sge_repro.detection.engine import COCO_METRICS, evaluate_detector, train_detector
from sge_repro.errors import UserError

from .conftest import NUM_CATEGORIES, tiny_overrides

REPO = Path(__file__).resolve().parents[2]


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


def test_two_process_gloo_training_under_torchrun(detectron2_weights, coco_set, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from sge_repro.detection.config import build_detector_config
        from sge_repro.detection.data import register_split
        from sge_repro.detection.engine import train_detector
        from tests.detection.conftest import tiny_overrides
        register_split("ddp_train", {str(coco_set)!r}, "train")
        cfg = build_detector_config("faster_rcnn", None, {str(detectron2_weights)!r}, "ddp_train", None,
                                    {str(tmp_path / "run")!r}, 2, 0, overrides=tiny_overrides())
        train_detector(cfg, resume=False)
        import torch.distributed as dist
        open(f"rank{{dist.get_rank()}}.txt", "w").write(str(dist.get_world_size()))
    """))
    with socket.socket() as probe:  # torchrun's --master_port 0 does not work with its static rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # own process group, so a hang cannot leave orphaned workers behind
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), str(script)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    completed = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # both processes joined one world of two (stdout interleaves, so each rank writes a file)
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["2", "2"]
    assert (tmp_path / "run" / "model_final.pth").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_detector_trains_and_evaluates_on_cuda(detectron2_weights, registered, tmp_path):
    cfg = build_detector_config("mask_rcnn", None, detectron2_weights, *registered, tmp_path / "run",
                                NUM_CATEGORIES, 0, overrides=tiny_overrides(), device="cuda")
    final = train_detector(cfg, resume=False)
    result = evaluate_detector(cfg, final, registered[1])
    assert set(result["bbox"]) == set(COCO_METRICS) and set(result["segm"]) == set(COCO_METRICS)
