"""Detector runs that stop and start again: kill before model_final, a changed config, pruning of
periodic checkpoints, and a resume that computes exactly what an uninterrupted run computes.
Real detectron2 training on the tiny set; kills are real SIGKILLs or the exact on-disk state."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from sge_repro.detection.checkpoint import FINAL_WEIGHTS, prune_checkpoints
from sge_repro.detection.config import build_detector_config
from sge_repro.detection.data import register_split
from sge_repro.detection.engine import train_detector
from sge_repro.detection.loader import GroupedBatches, ResumedStreamSampler, rank_keys, resume_point
from sge_repro.errors import UserError

from .conftest import IMAGE_SIZE, NUM_CATEGORIES, tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def run_config(weights, train_name, run_dir, detector="faster_rcnn", **overrides):
    return build_detector_config(detector, None, weights, train_name, None, run_dir, NUM_CATEGORIES, 0,
                                 overrides=tiny_overrides(**overrides))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in sorted(folder.iterdir())}


def without_log(files: dict) -> dict:
    return {name: value for name, value in files.items() if name != "log.txt"}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(actual: dict, expected: dict) -> None:
    """Bit for bit: every model tensor, every optimizer buffer, the scheduler, the iteration."""
    assert actual["iteration"] == expected["iteration"]
    assert actual["model"].keys() == expected["model"].keys()
    different = [name for name in expected["model"] if not torch.equal(actual["model"][name], expected["model"][name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    optimizer_a = actual["trainer"]["_trainer"]["optimizer"]["state"]
    optimizer_e = expected["trainer"]["_trainer"]["optimizer"]["state"]
    assert optimizer_a.keys() == optimizer_e.keys()
    for key in optimizer_e:
        for name, value in optimizer_e[key].items():
            assert torch.equal(optimizer_a[key][name], value), (key, name)
    assert actual["trainer"]["hooks"] == expected["trainer"]["hooks"]  # the LR scheduler's state


# --------------------------------------------------------------------------- killed before model_final
def test_kill_after_the_last_checkpoint_before_model_final_finishes_on_rerun(detectron2_weights, registered, tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    cfg = run_config(detectron2_weights, registered[0], run, **{"SOLVER.MAX_ITER": 2, "SOLVER.CHECKPOINT_PERIOD": 1})
    final = train_detector(cfg)
    expected = load(final)
    # the on-disk state of a SIGKILL after model_0000001.pth, before model_final.pth was renamed
    # into place: its temp left behind by the dead process, last_checkpoint naming the periodic one
    final.unlink()
    stale = run / f".{FINAL_WEIGHTS}.tmp-{dead_pid()}-123"
    stale.write_bytes(b"half a checkpoint")
    (run / "last_checkpoint").write_text("model_0000001.pth")

    assert train_detector(cfg) == final  # before the fix: RuntimeError "training ended without writing"
    assert (run / "last_checkpoint").read_text() == FINAL_WEIGHTS and not stale.exists()
    assert_same_state(load(final), expected)
    before = snapshot(run)
    train_detector(cfg)  # finished: nothing to do, nothing rewritten (DVC's output stays the same)
    # (log.txt aside: the earlier calls' log handlers in this test process still write to it)
    assert without_log(snapshot(run)) == without_log(before)


@pytest.mark.parametrize("damaged", [["model_final.pth"], ["model_final.pth", "model_0000003.pth"]])
def test_checkpoints_that_do_not_load_are_not_a_finished_run(detectron2_weights, registered, tmp_path, damaged):
    """model_final (and the newest periodic checkpoint) cut short after training: the rerun resumes
    from the newest checkpoint that loads and ends with the uninterrupted run's state; with none
    left that loads, one line says so and how to start over."""
    torch.set_num_threads(1)
    run = tmp_path / "run"
    cfg = run_config(detectron2_weights, registered[0], run, **{"SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 1})
    final = train_detector(cfg, keep_checkpoints=3)
    expected = load(final)
    for name in damaged:
        with open(run / name, "r+b") as handle:
            handle.truncate(1000)
    assert train_detector(cfg, keep_checkpoints=3) == final
    assert_same_state(load(final), expected)
    assert f"Starting training from iteration {4 - len(damaged) + 1}" in (run / "log.txt").read_text()

    for entry in run.glob("model_*.pth"):
        with open(entry, "r+b") as handle:
            handle.truncate(10)
    with pytest.raises(UserError, match=r"model_final\.pth: not a valid checkpoint.*no other checkpoint of .* loads: "
                                        r"delete .* to train from scratch"):
        train_detector(cfg, keep_checkpoints=3)


# --------------------------------------------------------------------------- runs of another config are moved aside
def superseded(tmp_path: Path) -> list[Path]:
    """The run folders moved aside from tmp_path/det/run (paths.superseded_run_dir)."""
    return sorted((tmp_path / "superseded" / "det").glob("run-*"))


def test_a_run_of_another_config_is_moved_aside_naming_the_keys_and_trained_again(
        detectron2_weights, registered, tmp_path, caplog):
    torch.set_num_threads(1)
    run = tmp_path / "det" / "run"
    train_detector(run_config(detectron2_weights, registered[0], run, **{"SOLVER.MAX_ITER": 2}))
    before = snapshot(run)
    changed = {"SOLVER.MAX_ITER": 3, "SOLVER.BASE_LR": 0.01}
    with caplog.at_level("WARNING", logger="sge_repro.superseded"):
        assert train_detector(run_config(detectron2_weights, registered[0], run, **changed)) == run / FINAL_WEIGHTS
    [moved] = superseded(tmp_path)
    # the old run as it was (renamed, not rewritten; log.txt aside: in this one process the first
    # run's log handler still appends to it)
    assert without_log(snapshot(moved)) == without_log(before)
    [warning] = [record.getMessage() for record in caplog.records if record.name == "sge_repro.superseded"]
    assert "\n" not in warning and str(run) in warning and str(moved) in warning
    assert "SOLVER.MAX_ITER: 2 -> 3" in warning and "SOLVER.BASE_LR: 0.02 -> 0.01" in warning
    fingerprint = load(run / FINAL_WEIGHTS)["sge_repro"]["fingerprint"]
    assert (fingerprint["SOLVER.MAX_ITER"], fingerprint["SOLVER.BASE_LR"]) == (3, 0.01)
    assert load(run / FINAL_WEIGHTS)["iteration"] == 2  # trained from iteration 0 to the new MAX_ITER

    # what leaves the weights unchanged may differ: workers, checkpoint period, test sizes, device
    after = snapshot(run)
    same = run_config(detectron2_weights, registered[0], run, **changed, **{
        "DATALOADER.NUM_WORKERS": 1, "SOLVER.CHECKPOINT_PERIOD": 5, "INPUT.MIN_SIZE_TEST": 48})
    assert train_detector(same) == run / FINAL_WEIGHTS
    assert without_log(snapshot(run)) == without_log(after) and superseded(tmp_path) == [moved]


def test_new_initial_weights_are_a_changed_config(detectron2_weights, registered, tmp_path, caplog):
    torch.set_num_threads(1)
    run = tmp_path / "det" / "run"
    train_detector(run_config(detectron2_weights, registered[0], run, **{"SOLVER.MAX_ITER": 1}))
    # the classifier was retrained and converted again: same path, other bytes
    weights = tmp_path / "weights.pth"
    saved = load(detectron2_weights)
    saved["model"] = {name: tensor * 1.001 if tensor.is_floating_point() else tensor
                      for name, tensor in saved["model"].items()}
    torch.save(saved, weights)
    with caplog.at_level("WARNING", logger="sge_repro.superseded"):
        train_detector(run_config(weights, registered[0], run, **{"SOLVER.MAX_ITER": 1}))
    assert len(superseded(tmp_path)) == 1
    assert re.search(r"MODEL\.WEIGHTS \(sha256\): '[0-9a-f]{64}' -> '[0-9a-f]{64}'", caplog.text)


def test_a_checkpoint_without_fingerprint_is_refused(detectron2_weights, registered, tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    cfg = run_config(detectron2_weights, registered[0], run, **{"SOLVER.MAX_ITER": 1})
    train_detector(cfg)
    saved = load(run / FINAL_WEIGHTS)
    del saved["sge_repro"]["fingerprint"]  # what sge-repro wrote before fingerprints
    torch.save(saved, run / FINAL_WEIGHTS)
    with pytest.raises(UserError, match="without a config fingerprint .* delete .* to train from scratch"):
        train_detector(cfg)


def test_only_the_newest_periodic_checkpoints_are_kept(detectron2_weights, registered, tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    train_detector(run_config(detectron2_weights, registered[0], run, **{"SOLVER.MAX_ITER": 5}), keep_checkpoints=2)
    assert sorted(path.name for path in run.glob("*.pth")) == ["model_0000003.pth", "model_0000004.pth", FINAL_WEIGHTS]


def test_pruning_never_deletes_what_last_checkpoint_names(tmp_path):
    for iteration in (1, 3, 5, 7):
        (tmp_path / f"model_{iteration:07d}.pth").write_bytes(b"x")
    (tmp_path / FINAL_WEIGHTS).write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    deleted = prune_checkpoints(tmp_path, keep=1)
    assert [path.name for path in deleted] == ["model_0000003.pth", "model_0000005.pth"]
    assert sorted(path.name for path in tmp_path.glob("*.pth")) == ["model_0000001.pth", "model_0000007.pth", FINAL_WEIGHTS]


# --------------------------------------------------------------------------- the batch stream and a SIGKILL resume
@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1), (3, 2)])
def test_replayed_grouping_resumes_the_batch_stream_exactly(world_size, rank):
    """The loader of iteration k yields what an uninterrupted loader yields from its k-th batch,
    with two aspect groups, so batches are formed out of stream order and leave images waiting."""
    rng = random.Random(world_size)
    records = [{"width": 80 if rng.random() < 0.4 else 64, "height": 64, "i": i} for i in range(23)]
    groups = [0 if record["width"] > record["height"] else 1 for record in records]

    def batches(start: int, waiting: list) -> list[list[tuple[int, int]]]:
        sampler = ResumedStreamSampler(len(records), 7, rank, world_size, start, waiting)
        items = ({**records[index], "key": (position, index)} for position, index in sampler)
        stream = iter(GroupedBatches(items, 3, grouping=True))
        return [[item["key"] for item in next(stream)] for _ in range(40)]

    uninterrupted = batches(0, [])
    assert any(batch != sorted(batch) or batch[-1][0] - batch[0][0] > 3 * world_size for batch in uninterrupted)
    for done in (1, 5, 17):
        start, waiting = resume_point(groups, 7, rank, world_size, 3, done)
        assert batches(start, waiting)[: 40 - done] == uninterrupted[done:]
    # the stream itself is detectron2's TrainingSampler's
    from detectron2.data.samplers import TrainingSampler

    theirs = iter(TrainingSampler(len(records), seed=7))
    assert [index for _, index in itertools.islice(rank_keys(len(records), 7, 0, 1), 100)] == [next(theirs) for _ in range(100)]


@pytest.fixture(scope="module")
def mixed_aspect_set(coco_set, tmp_path_factory) -> str:
    """The tiny set with every third training image widened to 80 px (w > h): two aspect groups."""
    root = tmp_path_factory.mktemp("mixed") / "coco"
    shutil.copytree(coco_set, root)
    annotations = root / "annotations" / "instances_train.json"
    document = json.loads(annotations.read_text())
    for image in document["images"][::3]:
        path = root / "train" / image["file_name"]
        widened = Image.new("RGB", (IMAGE_SIZE + 16, IMAGE_SIZE), (127, 127, 127))
        with Image.open(path) as original:
            widened.paste(original, (0, 0))
        widened.save(path, quality=95)
        image["width"] = IMAGE_SIZE + 16
    annotations.write_text(json.dumps(document))
    register_split("mixed_train", root, "train")
    return "mixed_train"


@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet", "mask_rcnn", "cascade_rcnn"])
def test_resumed_after_sigkill_equals_uninterrupted(detector, detectron2_weights, mixed_aspect_set, tmp_path):
    """Real SIGKILL of a training process as soon as its first checkpoint is on disk, a rerun,
    and the final weights / optimizer / scheduler equal an uninterrupted run's bit for bit (two
    aspect groups, so images wait in the buckets at the checkpoint; an LR step after it). Every
    detector: RetinaNet keeps a moving average of its foreground count outside its state_dict."""
    overrides = {"SOLVER.MAX_ITER": 8, "SOLVER.CHECKPOINT_PERIOD": 2, "SOLVER.IMS_PER_BATCH": 2, "SOLVER.STEPS": (5,)}
    torch.set_num_threads(1)
    expected = load(train_detector(run_config(detectron2_weights, mixed_aspect_set, tmp_path / "whole", detector,
                                              **overrides)))

    run = tmp_path / "killed"
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from sge_repro.detection.config import build_detector_config
        from sge_repro.detection.data import register_split
        from sge_repro.detection.engine import train_detector
        from tests.detection.conftest import tiny_overrides
        register_split("mixed_train", {str(mixed_root(mixed_aspect_set))!r}, "train")
        cfg = build_detector_config({detector!r}, None, {str(detectron2_weights)!r}, "mixed_train", None,
                                    {str(run)!r}, {NUM_CATEGORIES}, 0, overrides=tiny_overrides(**{overrides!r}))
        train_detector(cfg)
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "last_checkpoint").exists():
            assert child.poll() is None and time.monotonic() < deadline, "the child ended before its first checkpoint"
            time.sleep(0.005)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert not (run / FINAL_WEIGHTS).exists(), "killed too late: the run had finished"
    killed_at = (run / "last_checkpoint").read_text()

    # resumed with 2 loader workers: each image's augmentation depends on its stream position only
    final = train_detector(run_config(detectron2_weights, mixed_aspect_set, run, detector,
                                      **overrides, **{"DATALOADER.NUM_WORKERS": 2}))
    assert f"Starting training from iteration {int(killed_at[6:13]) + 1}" in (run / "log.txt").read_text()
    assert_same_state(load(final), expected)
    assert load(final)["model_attributes"] == expected["model_attributes"]


def mixed_root(train_name: str) -> Path:
    from detectron2.data import MetadataCatalog

    return Path(MetadataCatalog.get(train_name).image_root).parent


def test_a_negative_seed_is_refused_before_anything_is_written(detectron2_weights, registered, tmp_path):
    cfg = build_detector_config("faster_rcnn", None, detectron2_weights, registered[0], None, tmp_path / "run",
                                NUM_CATEGORIES, -1, overrides=tiny_overrides())
    with pytest.raises(UserError, match=r"SEED=-1: expected a seed >= 0"):
        train_detector(cfg)  # detectron2 would read it as "a new random seed each run"
    assert not (tmp_path / "run").exists()
