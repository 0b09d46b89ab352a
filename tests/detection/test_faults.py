"""Faults met by `sge-repro train det` / `eval det` (issue 16 items 5, 6, 9), through the real CLI in
a project folder: a truncated image, a full disk, wrong weights. One line, exit 2, nothing half
written; a rerun after the fault is fixed resumes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sge_repro.data.prepare import coco_source, write_manifests
from sge_repro.params import dump_params, profile_params
from sge_repro.paths import ProjectPaths

from .conftest import NUM_CATEGORIES

REPO = Path(__file__).resolve().parents[2]
RUN = "runs/det/faster_rcnn-sge_resnet18-seed0"
TRAIN = ["train", "det", "--detector", "faster_rcnn", "--backbone", "sge_resnet18", "--seed", "0"]
EVAL = ["eval", "det", "--detector", "faster_rcnn", "--backbone", "sge_resnet18", "--seed", "0"]


def write_params(project: Path, **changes) -> None:
    params = profile_params("smoke", REPO / "pipelines" / "profiles")
    params = params.model_copy(update={"detection_backbones": ["sge_resnet18"], "detectors": ["faster_rcnn"],
                                       "cpu_threads": 1})
    params = params.model_copy(update={"train_det": params.train_det.model_copy(update={"max_iter": 4, "checkpoint_period": 2})})
    if "skip_corrupt" in changes:
        params = params.model_copy(update={"data": params.data.model_copy(update={"skip_corrupt": changes["skip_corrupt"]})})
    (project / "params.yaml").write_text(dump_params(params))


@pytest.fixture
def project(tmp_path, coco_set, detectron2_weights) -> Path:
    """A project folder at the train_det stage: params.yaml (smoke, one detector), data/det and the
    converted backbone weights in place."""
    project = tmp_path / "project"
    paths = ProjectPaths(project)
    shutil.copytree(coco_set, paths.det_data)
    write_manifests([coco_source(paths, "synthetic", paths.det_data, "embedded")], paths)  # the data stage's index
    (project / "runs" / "convert").mkdir(parents=True)
    shutil.copy(detectron2_weights, project / "runs" / "convert" / "sge_resnet18-seed0.pth")
    write_params(project)
    return project


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


# --------------------------------------------------------------------------- issue 16 item 5
def test_truncated_training_image_is_one_line_and_nothing_is_written(project):
    bad = project / "data" / "det" / "train" / "train_000003.jpg"
    truncate(bad)
    line = one_error_line(cli(project, *TRAIN))
    assert line.startswith(f"error: {bad}: corrupt or unreadable image") or str(bad) in line, line
    assert "data.skip_corrupt" in line
    assert not (project / RUN).exists()  # no config.yaml, log.txt, events or metrics.json

    # skip_corrupt: trained without it, the run folder complete
    write_params(project, skip_corrupt=True)
    result = cli(project, *TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_000003.jpg" in result.stdout + result.stderr  # the warning names what was left out
    assert (project / RUN / "model_final.pth").is_file()
    saved = torch.load(project / RUN / "model_final.pth", weights_only=True)
    assert saved["sge_repro"]["fingerprint"]["training images used"] == 7


def test_truncated_val_image_in_eval_det(project):
    write_params(project, skip_corrupt=True)
    assert cli(project, *TRAIN).returncode == 0
    bad = project / "data" / "det" / "val" / "val_000001.jpg"
    truncate(bad)
    write_params(project, skip_corrupt=False)
    before = run_files(project)
    line = one_error_line(cli(project, *EVAL))
    assert str(bad) in line and "corrupt or unreadable image" in line
    assert not (project / "metrics").exists() and run_files(project) == before

    write_params(project, skip_corrupt=True)
    result = cli(project, *EVAL)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((project / "metrics" / "eval_det" / "faster_rcnn-sge_resnet18-seed0.json").read_text())
    assert metrics["num_images"] == 3 and metrics["skipped_images"] == [str(bad)]


# --------------------------------------------------------------------------- issue 16 item 9
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


# --------------------------------------------------------------------------- issue 16 item 6
@contextlib.contextmanager
def small_disk(folder: Path, size_bytes: int):
    """A tmpfs of `size_bytes` mounted at `folder` (needs root, as in CI); unmounted afterwards."""
    folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


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

        subprocess.run(["mount", "-o", "remount,size=64m", str(run)], check=True)  # space freed
        result = cli(project, *TRAIN)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Starting training from iteration 2" in (run / "log.txt").read_text()
        resumed = torch.load(run / "model_final.pth", weights_only=True)
    expected = torch.load(reference / RUN / "model_final.pth", weights_only=True)
    assert all(torch.equal(resumed["model"][name], tensor) for name, tensor in expected["model"].items())
