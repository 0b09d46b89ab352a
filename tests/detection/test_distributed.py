"""`train_detector` in each of 2 env:// worker processes on CPU (gloo), started with torch's elastic
launcher through its Python API (what sge_repro.launch uses): a 2-process run writes exactly the
files a 1-process run writes, from rank 0 only."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest
import torch

from .conftest import NUM_CATEGORIES, tiny_overrides

OVERRIDES = {"SOLVER.MAX_ITER": 3, "SOLVER.CHECKPOINT_PERIOD": 2, "SOLVER.IMS_PER_BATCH": 2}


def train_in_worker(coco_root: str, weights: str, run_dir: str) -> dict:
    """The target each worker runs (module level: the launcher pickles it)."""
    torch.set_num_threads(1)
    from sge_repro.detection.config import build_detector_config
    from sge_repro.detection.data import register_split
    from sge_repro.detection.engine import train_detector

    register_split("ddp_train", coco_root, "train")
    cfg = build_detector_config("faster_rcnn", None, weights, "ddp_train", None, run_dir, NUM_CATEGORIES, 0,
                                overrides=tiny_overrides(**OVERRIDES))
    final = train_detector(cfg, keep_checkpoints=1)
    from detectron2.utils import comm

    return {"rank": comm.get_rank(), "world_size": comm.get_world_size(), "local_rank": comm.get_local_rank(),
            "local_size": comm.get_local_size(), "final": str(final)}


def written_files(run_dir: Path) -> list[str]:
    """Every file under run_dir; TensorBoard's name (host, pid, time) reduced to its kind."""
    return sorted(re.sub(r"^events\.out\.tfevents\..*", "events.out.tfevents.*", str(path.relative_to(run_dir)))
                  for path in run_dir.rglob("*") if path.is_file())


@pytest.mark.timeout(600)
def test_two_gloo_workers_train_and_write_what_one_process_writes(coco_set, detectron2_weights, tmp_path, monkeypatch):
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from sge_repro.launch.local import own_signal_handlers

    # one process, in this process
    torch.set_num_threads(1)
    train_in_worker(str(coco_set), str(detectron2_weights), str(tmp_path / "one"))

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    with own_signal_handlers():   # torch elastic would leave its handlers in pytest's process
        results = elastic_launch(config, train_in_worker)(str(coco_set), str(detectron2_weights), str(tmp_path / "two"))

    assert sorted(results) == [0, 1]
    for rank, result in results.items():
        assert (result["rank"], result["world_size"], result["local_rank"], result["local_size"]) == (rank, 2, rank, 2)
        assert result["final"] == str(tmp_path / "two" / "model_final.pth")
    one, two = written_files(tmp_path / "one"), written_files(tmp_path / "two")
    assert two == one  # no log.txt.rank1, no second events file, the same checkpoints
    assert one == sorted(["config.yaml", "events.out.tfevents.*", "last_checkpoint", "log.txt", "metrics.json",
                          "model_0000001.pth", "model_final.pth"])
    assert (tmp_path / "two" / "config.yaml").read_text().replace(str(tmp_path / "two"), "RUN") == \
        (tmp_path / "one" / "config.yaml").read_text().replace(str(tmp_path / "one"), "RUN")
    saved = torch.load(tmp_path / "two" / "model_final.pth", weights_only=True)
    assert saved["sge_repro"]["world_size"] == 2 and len(saved["rng"]) == 2  # every rank's RNG states
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])
    assert os.environ.get("WORLD_SIZE") is None  # the launcher left this process alone
