"""The `released` profile end to end through real DVC, detectron2 and pycocotools, on generated data:
checkpoint files made here (the authors' release format for CBAM and SGE, a torchvision state dict
for the plain ResNet50) are evaluated without training any classifier, and Faster R-CNN trains from
a torchvision backbone (fetched from a local HTTP server) and from the authors' SGE file."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from authors_reference import AuthorsResNet, randomize, release_file
from sge_repro.classification.transforms import eval_transform, to_model_input
from sge_repro.data.imagefolder import decode_rgb

from .conftest import REPO

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]
CLASSES, IMAGE_SIZE, WIDTH = 4, 64, 16


def _test_profile(released: dict, base_url: str, sha256: str) -> dict:
    """pipelines/profiles/released.yaml with generated-data sizes and the files made here."""
    profile = yaml.safe_load((REPO / "pipelines" / "profiles" / "released.yaml").read_text())
    smoke = yaml.safe_load((REPO / "pipelines" / "profiles" / "smoke.yaml").read_text())
    profile.update(
        released=released,
        data={**smoke["data"], "classification": {**smoke["data"]["classification"], "num_classes": CLASSES,
                                                  "image_size": IMAGE_SIZE}},
        model=smoke["model"], eval_cls={"image_size": IMAGE_SIZE},
        train_det=smoke["train_det"], eval_det={}, report=smoke["report"])
    profile["convert"]["files"] = {"sge_resnet50": released["sge_resnet50"]}
    profile["convert"]["torchvision_weights"] = {"resnet50": {"url": f"{base_url}/resnet50-0676ba61.pth",
                                                              "sha256": sha256}}
    return profile


def _predictions_of(model: torch.nn.Module, project: Path, name: str) -> tuple[list[int], list[int]]:
    """(predictions the pipeline wrote, argmax of `model` on the same val images)."""
    written = json.loads((project / "runs" / "eval_cls" / f"{name}-seed0.json").read_text())
    transform = eval_transform(IMAGE_SIZE)
    images = to_model_input(torch.stack([transform(decode_rgb(project / "data" / "cls" / "val" / file))
                                         for file in written["files"]]), torch.device("cpu"))
    with torch.no_grad():
        return written["predictions"], model.eval()(images).argmax(dim=1).tolist()


def test_released_profile_end_to_end(project, weights_server, sge_repro_bin):
    folder, base_url = weights_server
    released_dir = project / "released"
    released_dir.mkdir()
    plain = torchvision.models.resnet50(num_classes=CLASSES)
    randomize(plain, seed=1)
    torch.save(plain.state_dict(), released_dir / "resnet50-tv.pth")  # torchvision's format
    cbam = randomize(AuthorsResNet("cbam", 50, width=WIDTH, num_classes=CLASSES), seed=2)
    release_file(cbam, released_dir / "cbam_resnet50.pth.tar")  # the authors' format
    sge = randomize(AuthorsResNet("sge", 50, width=WIDTH, num_classes=CLASSES), seed=3)
    release_file(sge, released_dir / "sge_resnet50.pth.tar")
    torch.save(torchvision.models.resnet50().state_dict(), folder / "resnet50-0676ba61.pth")  # made up
    digest = hashlib.sha256((folder / "resnet50-0676ba61.pth").read_bytes()).hexdigest()

    released = {"resnet50": "released/resnet50-tv.pth", "cbam_resnet50": "released/cbam_resnet50.pth.tar",
                "sge_resnet50": "released/sge_resnet50.pth.tar"}
    (project / "pipelines" / "profiles" / "released_test.yaml").write_text(
        yaml.safe_dump(_test_profile(released, base_url, digest), sort_keys=False))
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    result = subprocess.run([sge_repro_bin, "run", "all", "--profile", "released_test"], cwd=project,
                            capture_output=True, text=True, timeout=1800, env=env)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    stages = subprocess.run([*DVC, "stage", "list", "--name-only"], cwd=project, capture_output=True, text=True,
                            check=True).stdout.split()
    assert not [stage for stage in stages if stage.startswith(("train_cls", "eval_cls@"))]  # nothing trains
    assert {"import_cls@cbam_resnet50", "eval_released@resnet50", "fetch_weights@resnet50",
            "copy_weights@sge_resnet50", "convert_torchvision@resnet50-0", "convert_file@sge_resnet50-0",
            "train_faster_rcnn@sge_resnet50-0"} <= set(stages)

    # the report shows the released classifiers and the detectors as usual
    summary = json.loads((project / "reports" / "summary.json").read_text())
    assert summary["profile"] == "released_test"
    assert {row["model"] for row in summary["classification"]} == set(released)
    assert {(row["detector"], row["backbone"]) for row in summary["detection"]} == {
        ("faster_rcnn", "resnet50"), ("faster_rcnn", "sge_resnet50")}

    # what was evaluated is the given models' own computation (independent forwards here)
    for model, name in ((plain, "resnet50"), (cbam, "cbam_resnet50"), (sge, "sge_resnet50")):
        written, expected = _predictions_of(model, project, name)
        assert written == expected, name
    record = json.loads((project / "metrics" / "train_cls" / "cbam_resnet50-seed0.json").read_text())
    assert record["released"] == "released/cbam_resnet50.pth.tar" and record["epochs_trained_here"] == 0

    # the detectors' backbones: torchvision's file and the authors' SGE release
    headers = {name: torch.load(project / "runs" / "convert" / f"{name}-seed0.pth", weights_only=True)["sge_repro"]
               for name in ("resnet50", "sge_resnet50")}
    assert headers["resnet50"]["backbone_source"] == "torchvision"
    assert headers["sge_resnet50"]["backbone_source"] == "file"
    assert headers["sge_resnet50"]["model_kwargs"]["width"] == WIDTH
    assert sorted((project / "runs" / "visualize" / "sge_resnet50-seed0").glob("*.png"))

    # the given files are DVC dependencies: changing one makes exactly its stages stale
    release_file(randomize(AuthorsResNet("cbam", 50, width=WIDTH, num_classes=CLASSES), seed=4),
                 released_dir / "cbam_resnet50.pth.tar")
    assert _stale(project) == {"import_cls@cbam_resnet50"}
    # the SGE file is both a released classifier and a detection backbone's weights
    release_file(randomize(AuthorsResNet("sge", 50, width=WIDTH, num_classes=CLASSES), seed=5),
                 released_dir / "sge_resnet50.pth.tar")
    assert _stale(project) == {"import_cls@cbam_resnet50", "import_cls@sge_resnet50", "copy_weights@sge_resnet50"}


def _stale(project: Path) -> set[str]:
    status = subprocess.run([*DVC, "status", "--json"], cwd=project, capture_output=True, text=True, check=True)
    return {name.split(":", 1)[-1] for name, why in json.loads(status.stdout or "{}").items()
            if why != ["always changed"]}  # the data stage rescans on every repro (dvc.yaml)
