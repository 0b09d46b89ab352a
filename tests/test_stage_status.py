"""A stage's status file (sge_repro.stage_status): what it holds, how often it is written, who writes it."""

import json
import subprocess
import sys

import pytest
import yaml

from sge_repro.stage_status import FORMAT, StageStatus, read_status, stage_name, tracking

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_progress_fields_eta_and_images_per_second(tmp_path):
    clock = Clock()
    path = tmp_path / "progress" / "eval_cls@m-0.json"
    status = StageStatus(path, "eval_cls@m-0", clock=clock, min_interval=0.0)
    first = read_status(path)
    assert first["format"] == FORMAT and first["state"] == "running" and first["phase"] == "starting"
    status.update(0, 10, unit="batch", phase="eval", images_per_unit=32)
    for done in range(1, 5):
        clock.now += 2.0  # 2 s per batch of 32 images
        status.update(done, 10, unit="batch", phase="eval", images_per_unit=32)
    record = read_status(path)
    assert (record["done"], record["total"], record["unit"]) == (4, 10, "batch")
    assert record["eta_s"] == pytest.approx(6 * 2.0)  # 6 batches left at this process's pace
    assert record["images_per_s"] == pytest.approx(16.0)
    assert record["updated"] == clock.now and record["elapsed_s"] == pytest.approx(8.0)


def test_eta_follows_this_process_pace_after_a_resume(tmp_path):
    clock = Clock()
    status = StageStatus(tmp_path / "s.json", "train_cls@m-0", clock=clock, min_interval=0.0)
    status.update(900, 1000, unit="step", phase="train")  # resumed at step 900
    clock.now += 10.0
    status.update(910, 1000, unit="step", phase="train", loss=1.5, lr=0.1, epoch=10, epochs=10)
    record = read_status(tmp_path / "s.json")
    assert record["eta_s"] == pytest.approx(90.0)  # 1 step/s, not 910 steps in 10 s
    assert (record["loss"], record["lr"], record["epoch"]) == (1.5, 0.1, 10)


def test_writes_are_throttled_but_the_first_last_and_phase_changes_go_out(tmp_path):
    clock, path = Clock(), tmp_path / "s.json"
    status = StageStatus(path, "train_faster_rcnn@b-0", clock=clock, min_interval=5.0)
    status.update(1, 4, unit="iter", phase="train")  # new phase: written
    assert read_status(path)["done"] == 1
    clock.now += 1.0
    status.update(2, 4, unit="iter", phase="train")
    assert read_status(path)["done"] == 1  # within 5 s: not written
    clock.now += 5.0
    status.update(3, 4, unit="iter", phase="train")
    assert read_status(path)["done"] == 3
    clock.now += 0.1
    status.update(4, 4, unit="iter", phase="train")  # the last unit
    assert read_status(path)["done"] == 4


def test_tracking_records_done_failed_and_only_rank_zero_writes(tmp_path, monkeypatch):
    with tracking(tmp_path / "ok.json", "a") as status:
        status.update(3, 3, unit="step", phase="train")
    assert read_status(tmp_path / "ok.json")["state"] == "done" and read_status(tmp_path / "ok.json")["eta_s"] == 0
    with pytest.raises(ValueError):
        with tracking(tmp_path / "bad.json", "b"):
            raise ValueError("loss is nan\nsecond line")
    failed = read_status(tmp_path / "bad.json")
    assert failed["state"] == "failed" and failed["error"] == "ValueError: loss is nan"

    monkeypatch.setenv("RANK", "1")
    with tracking(tmp_path / "rank1.json", "c") as status:
        status.update(1, 1, unit="step", phase="train")
    assert not (tmp_path / "rank1.json").exists()
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert not StageStatus(tmp_path / "slurm.json", "d").enabled
    monkeypatch.setenv("RANK", "0")
    assert StageStatus(tmp_path / "slurm.json", "d").enabled


def test_unreadable_or_foreign_files_read_as_none(tmp_path):
    (tmp_path / "half.json").write_text('{"format": "sge-repro/sta')
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    assert read_status(tmp_path / "half.json") is None
    assert read_status(tmp_path / "other.json") is None
    assert read_status(tmp_path / "absent.json") is None


def test_stage_names_are_dvc_names():
    """The status file of a matrix stage is named as DVC names the stage (what `run` reads)."""
    listed = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    seeds, models = params["seeds"], params["models"]
    expected = [stage_name(group, m, s) for group in ("train_cls", "eval_cls") for m in models for s in seeds]
    expected += [stage_name("convert", b, s) for b in params["convert"]["trained"] for s in seeds]
    expected += [stage_name(f"{group}_{d}", b, s) for group in ("train", "eval")
                 for d, backbones in params["detection"].items() for b in backbones for s in seeds]
    assert any(name.startswith("train_faster_rcnn@") for name in expected)  # params.yaml runs a detector
    assert set(expected) <= set(listed)
    assert stage_name("report") == "report"
