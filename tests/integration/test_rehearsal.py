"""The paper profile rehearsed on 2 CPU cores (pipelines/profiles/rehearsal.yaml): `sge-repro run all
--profile rehearsal` runs what `--profile paper` runs (the five ImageNet models at width 64 with
1000-way heads, the four detectors at 800 x 1333, two processes per training stage, the report
against the paper's tables) on generated data at the real sizes, through real DVC, detectron2 and
pycocotools. Its numbers mean nothing; every assertion is about the path."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision
import yaml
from PIL import Image

from authors_reference import AuthorsResNet, randomize, release_file
from sge_repro.classification.transforms import eval_transform, to_model_input
from sge_repro.data.imagefolder import decode_rgb

from .conftest import REPO

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]
PAPER_MODELS = ["resnet50", "sge_resnet50", "resnet101", "se_resnet101", "sge_resnet101"]
DETECTORS = {"faster_rcnn", "mask_rcnn", "cascade_rcnn", "retinanet"}
# torchvision's ResNet50 / ResNet101 at 1000 classes; SGE adds 2 x G parameters per block (M)
PARAMS_M = {"resnet50": 25.557, "resnet101": 44.549}


def test_the_paper_profile_rehearsed_end_to_end(project, sge_repro_bin):
    result = subprocess.run([sge_repro_bin, "run", "all", "--profile", "rehearsal"], cwd=project,
                            capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    params = yaml.safe_load((project / "params.yaml").read_text())
    pairs = {(detector, backbone) for detector, backbones in params["detection"].items() for backbone in backbones}

    # generated data in the real formats at the real sizes
    manifest = json.loads((project / "data" / "manifests" / "cls.json").read_text())
    assert len(manifest["classes"]) == 1000 and manifest["counts"]["train"] >= 1000
    assert manifest["subset"] == {"train": 8, "val": 8}
    jpeg = next((project / "data" / "cls" / "train").rglob("*.jpg"))
    assert Image.open(jpeg).size == (500, 375)
    coco = json.loads((project / "data" / "det" / "annotations" / "instances_train.json").read_text())
    assert len(coco["categories"]) == 80
    assert {(image["width"], image["height"]) for image in coco["images"]} == {(640, 480)}
    assert all(isinstance(a["segmentation"], list) and a["segmentation"] for a in coco["annotations"])

    # the five classifiers at the paper's size, evaluated on the val subset
    summary = json.loads((project / "reports" / "summary.json").read_text())
    classification = {row["model"]: row for row in summary["classification"]}
    assert sorted(classification) == sorted(PAPER_MODELS)
    for name, row in classification.items():
        base = PARAMS_M[name.split("_")[-1]]
        assert base <= row["params_m"] < base * 1.2, name   # SE adds ~10 %, SGE ~0.01 %
    for name in PAPER_MODELS:
        evaluated = json.loads((project / "metrics" / "eval_cls" / f"{name}-seed0.json").read_text())
        assert (evaluated["num_images"], evaluated["subset_of"]) == (8, 1000)
        trained = json.loads((project / "metrics" / "train_cls" / f"{name}-seed0.json").read_text())
        assert (trained["epochs"], trained["num_train_images"]) == (2, 8)

    # every detector and every backbone, trained at 800 x 1333; Mask R-CNN also has segm AP
    detection = {(row["detector"], row["backbone"]): row for row in summary["detection"]}
    assert set(detection) == pairs
    assert {d for d, _ in pairs} == DETECTORS and {b for _, b in pairs} == set(PAPER_MODELS)
    for (detector, backbone), row in detection.items():
        assert ("segm" in row) == (detector == "mask_rcnn")
        assert (row["protocol"], row["backbone_weights"]) == ("controlled", "trained")
        config = yaml.safe_load((project / "runs" / "det" / f"{detector}-{backbone}-seed0" / "config.yaml").read_text())
        assert (config["INPUT"]["MIN_SIZE_TRAIN"], config["INPUT"]["MAX_SIZE_TRAIN"]) == ([800], 1333)
        assert (config["SOLVER"]["MAX_ITER"], config["SOLVER"]["IMS_PER_BATCH"]) == (2, 2)

    # the training stages ran on two processes through the launcher
    stages = {run["stage"]: run for run in summary["provenance"]["stages"]}
    trained = [name for name in stages if name.split("@")[0] in ("train_cls", *(f"train_{d}" for d in DETECTORS))]
    assert len(trained) == len(PAPER_MODELS) + len(pairs)
    assert {stages[name]["world_size"] for name in trained} == {2}

    # laid out against the paper's tables: each gain beside the paper's (generated data: gains only)
    comparison = {row["model"]: row for row in summary["comparison"]["classification"]}
    assert {name for name, row in comparison.items() if row["paper_gain"] is not None} == {
        "sge_resnet50", "se_resnet101", "sge_resnet101"}
    gains = {(row["detector"], row["backbone"]) for row in summary["comparison"]["detection"]
             if row["paper_gain"] is not None}
    assert gains == {("faster_rcnn", "sge_resnet50"), ("cascade_rcnn", "sge_resnet101")}
    assert "profile `rehearsal`" in (project / "reports" / "report.md").read_text()

    assert stale_stages(project) == set()
    shutil.rmtree(project)   # about 10 GB of checkpoints and DVC cache at these sizes


def stale_stages(project) -> set[str]:
    """What DVC would rerun, apart from the data stage's standing rescan (always_changed)."""
    status = subprocess.run([*DVC, "status", "--json"], cwd=project, capture_output=True, text=True, check=True)
    return {name for name, why in json.loads(status.stdout or "{}").items() if why != ["always changed"]}


def test_the_released_profile_and_the_authors_protocol_rehearsed_end_to_end(project, weights_server, sge_repro_bin):
    """The released profile's 12 files (the authors' format, width 64, G = 64, 1000 classes) imported
    and evaluated, Faster R-CNN at 800 x 1333 under `protocol: authors` from torchvision's ResNet50
    weights (fetched from a server on 127.0.0.1, checksum-verified) and from the SGE release file."""
    folder, base_url = weights_server
    released = yaml.safe_load((REPO / "pipelines" / "profiles" / "released.yaml").read_text())["released"]
    compared = {}
    for seed, (name, path) in enumerate(released.items()):
        attention, _, depth = name.rpartition("_resnet") if "_" in name else ("none", "", name[len("resnet"):])
        model = randomize(AuthorsResNet(attention, int(depth)), seed)
        (project / path).parent.mkdir(exist_ok=True)
        release_file(model, project / path)
        if name in ("sge_resnet50", "bam_resnet101"):
            compared[name] = model
    torch.save(torchvision.models.resnet50().state_dict(), folder / "resnet50-0676ba61.pth")  # made up
    digest = hashlib.sha256((folder / "resnet50-0676ba61.pth").read_bytes()).hexdigest()
    (project / "pipelines" / "profiles" / "rehearsal_released_here.yaml").write_text(yaml.safe_dump({
        "extends": "rehearsal_released",
        "convert": {"torchvision_weights": {"resnet50": {"url": f"{base_url}/resnet50-0676ba61.pth",
                                                         "sha256": digest}}}}))
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    result = subprocess.run([sge_repro_bin, "run", "all", "--profile", "rehearsal_released_here"], cwd=project,
                            capture_output=True, text=True, timeout=2400, env=env)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    # nothing trained; every file imported and evaluated on the val subset with its own computation
    summary = json.loads((project / "reports" / "summary.json").read_text())
    assert {row["model"] for row in summary["classification"]} == set(released)
    stages = {run["stage"] for run in summary["provenance"]["stages"]}
    assert not [stage for stage in stages if stage.startswith("train_cls")]
    for name in released:
        evaluated = json.loads((project / "metrics" / "eval_cls" / f"{name}-seed0.json").read_text())
        assert (evaluated["num_images"], evaluated["subset_of"]) == (8, 1000)
    for name, model in compared.items():
        written = json.loads((project / "runs" / "eval_cls" / f"{name}-seed0.json").read_text())
        images = torch.stack([eval_transform(224)(decode_rgb(project / "data" / "cls" / "val" / file))
                              for file in written["files"]])
        with torch.no_grad():
            expected = model.eval()(to_model_input(images, torch.device("cpu"))).argmax(dim=1).tolist()
        assert written["predictions"] == expected, name

    # the authors' protocol: the plain backbone from torchvision's weights, SGE from their file
    detection = {row["backbone"]: row for row in summary["detection"]}
    assert set(detection) == {"resnet50", "sge_resnet50"}
    assert {(row["protocol"], row["backbone_weights"]) for row in detection.values()} == {
        ("authors", "torchvision"), ("authors", "file")}
    assert detection["resnet50"]["backbone_weights"] == "torchvision"
    for backbone in detection:
        config = yaml.safe_load((project / "runs" / "det" / f"faster_rcnn-{backbone}-seed0" / "config.yaml").read_text())
        assert (config["INPUT"]["MIN_SIZE_TRAIN"], config["INPUT"]["MAX_SIZE_TRAIN"]) == ([800], 1333)
    assert sorted((project / "runs" / "visualize" / "sge_resnet101-seed0").glob("*.png"))
    assert stale_stages(project) == set()
    shutil.rmtree(project)
