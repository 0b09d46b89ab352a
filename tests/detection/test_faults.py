"""Faults met by `sge-repro train det` / `eval det`, through the real CLI in
a project folder: an image broken after the data stage verified it, a full disk, wrong weights.
One line, exit 2, nothing half written; a rerun after the fault is fixed resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sge_repro.data.prepare import coco_source, write_manifests
from sge_repro.errors import UserError
from sge_repro.params_sections import DetectionParams
from sge_repro.params_yaml import dump_params, load_params, profile_params
from sge_repro.paths import ProjectPaths
from sge_repro.stage_status import read_status
from small_disk import resize, small_disk


REPO = Path(__file__).resolve().parents[2]
RUN = "runs/det/faster_rcnn-sge_resnet18-seed0"
TRAIN = ["train", "det", "--detector", "faster_rcnn", "--backbone", "sge_resnet18", "--seed", "0"]
EVAL = ["eval", "det", "--detector", "faster_rcnn", "--backbone", "sge_resnet18", "--seed", "0"]
TRAIN_STATUS = "logs/progress/train_faster_rcnn@sge_resnet18-0.json"  # dvc.yaml's name of the stage
EVAL_STATUS = "logs/progress/eval_faster_rcnn@sge_resnet18-0.json"


def write_params(project: Path, **changes) -> None:
    params = profile_params("smoke", REPO / "pipelines" / "profiles")
    one_run = {"detection": DetectionParams(faster_rcnn=["sge_resnet18"], retinanet=[]),
               "convert": params.convert.model_copy(update={"trained": ["sge_resnet18"]}), "cpu_threads": 1}
    params = params.model_copy(update=one_run)
    train_det = {"max_iter": 4, "checkpoint_period": 2, **({"workers": changes["workers"]} if "workers" in changes else {})}
    params = params.model_copy(update={"train_det": params.train_det.model_copy(update=train_det)})
    if "skip_corrupt" in changes:
        params = params.model_copy(update={"data": params.data.model_copy(update={"skip_corrupt": changes["skip_corrupt"]})})
    (project / "params.yaml").write_text(dump_params(params))
    assert load_params(project / "params.yaml").pairs() == [("faster_rcnn", "sge_resnet18")]  # one detector run


@pytest.fixture
def project(tmp_path, coco_set, detectron2_weights) -> Path:
    """A project folder at the train_det stage: params.yaml (smoke, one detector), data/det and the
    converted backbone weights in place."""
    project = tmp_path / "project"
    paths = ProjectPaths(project)
    shutil.copytree(coco_set, paths.det_data)
    data_stage(project)
    (project / "runs" / "convert").mkdir(parents=True)
    shutil.copy(detectron2_weights, project / "runs" / "convert" / "sge_resnet18-seed0.pth")
    write_params(project)
    return project


def data_stage(project: Path, skip_corrupt: bool = False) -> None:
    """What the data stage does for the detection set: scan, verify, write data/manifests/det.json."""
    paths = ProjectPaths(project)
    write_manifests([coco_source(paths, "synthetic", paths.det_data, "embedded")], paths, skip_corrupt=skip_corrupt)


def cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "sge-repro"), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)


def one_error_line(result: subprocess.CompletedProcess, progress_before: bool = False) -> str:
    """The error line; the only output unless the command had started training (`progress_before`:
    its progress log on stdout, but no traceback anywhere and one line on stderr)."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    output = result.stderr if progress_before else result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, "\n".join(lines[:40])
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def run_files(project: Path) -> list[str]:
    run = project / RUN
    return sorted(str(path.relative_to(run)) for path in run.rglob("*")) if run.exists() else []


# --------------------------------------------------------------------------- images broken after the data stage
def test_a_training_image_broken_after_the_data_stage_is_named_when_loaded(project):
    """train det decodes no image to check it (the data stage did); a file broken since fails where
    its batch is loaded (here in a loader worker), in one line naming it. The data stage then names
    it, or with data.skip_corrupt leaves it out, and training runs on the rest."""
    write_params(project, workers=1)
    bad = project / "data" / "det" / "train" / "train_000003.jpg"
    truncate(bad)
    line = one_error_line(cli(project, *TRAIN), progress_before=True)
    assert line.startswith(f"error: {bad}: corrupt or unreadable image (") and "changed after the data stage" in line, line
    assert not (project / RUN / "model_final.pth").exists()
    assert read_status(project / TRAIN_STATUS)["state"] == "failed"

    with pytest.raises(UserError, match=f"1 corrupt image.*{bad}"):
        data_stage(project)
    data_stage(project, skip_corrupt=True)  # listed as corrupt in det.json, left out of the dataset
    result = cli(project, *TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(project / RUN / "model_final.pth", weights_only=True)
    assert saved["sge_repro"]["fingerprint"]["training images used"] == 7


def test_a_val_image_broken_after_the_data_stage_in_eval_det(project):
    assert cli(project, *TRAIN).returncode == 0
    bad = project / "data" / "det" / "val" / "val_000001.jpg"
    truncate(bad)
    before = run_files(project)
    line = one_error_line(cli(project, *EVAL), progress_before=True)  # inference had started
    assert line.startswith(f"error: {bad}: corrupt or unreadable image (") and "changed after the data stage" in line, line
    assert not (project / "metrics").exists() and run_files(project) == before
    assert read_status(project / EVAL_STATUS)["state"] == "failed"

    truncate(project / "data" / "det" / "train" / "train_000002.jpg")  # left out of training: not evaluation's
    data_stage(project, skip_corrupt=True)
    result = cli(project, *EVAL)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((project / "metrics" / "eval_det" / "faster_rcnn-sge_resnet18-seed0.json").read_text())
    # AP over the 3 readable images; the left-out one is listed, its objects not counted as missed
    assert metrics["num_images"] == 3 and metrics["skipped_images"] == [str(bad)]
    assert run_files(project) == before
    assert read_status(project / EVAL_STATUS)["state"] == "done"


# --------------------------------------------------------------------------- wrong weights, import warnings
def test_eval_det_with_wrong_weights_is_one_line(project, classifier_checkpoint):
    (project / RUN).mkdir(parents=True)
    # a classifier checkpoint where the trained detector should be
    shutil.copy(classifier_checkpoint[0], project / RUN / "model_final.pth")
    line = one_error_line(cli(project, *EVAL))  # was: a 130-line model dump first
    assert "model_final.pth" in line


def test_no_torch_jit_warnings_on_import():
    result = subprocess.run([sys.executable, "-c", "import sge_repro.detection.engine"], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr


# --------------------------------------------------------------------------- a full disk
def test_full_disk_is_one_line_leaves_no_partial_file_and_a_rerun_resumes(project, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(project, reference)
    assert cli(reference, *TRAIN).returncode == 0  # the same run on a roomy disk
    checkpoint_size = (reference / RUN / "model_0000001.pth").stat().st_size

    run = project / RUN
    # room for config, logs and one checkpoint; the second one does not fit
    with small_disk(run, checkpoint_size + (3 << 20)):
        line = one_error_line(cli(project, *TRAIN), progress_before=True)
        assert line.startswith(f"error: {RUN}/model_0000003.pth: no space left on device"), line
        assert sorted(path.name for path in run.iterdir() if path.name.startswith(".")) == []  # no temp left
        assert (run / "last_checkpoint").read_text() == "model_0000001.pth"
        for text in (run / "metrics.json").read_text().splitlines():
            json.loads(text)  # whole lines only

        resize(run, 64 << 20)  # space freed
        result = cli(project, *TRAIN)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Starting training from iteration 2" in (run / "log.txt").read_text()
        resumed = torch.load(run / "model_final.pth", weights_only=True)
    expected = torch.load(reference / RUN / "model_final.pth", weights_only=True)
    assert all(torch.equal(resumed["model"][name], tensor) for name, tensor in expected["model"].items())
