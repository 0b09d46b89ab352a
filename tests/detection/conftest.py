"""Shared tiny fixtures: a COCO-format set written by the real generator, tiny classifiers
saved in each checkpoint format and converted to detectron2 weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sge_repro.atomic import torch_save

# Small enough that the four detectors train and evaluate in seconds on 2 cores.
IMAGE_SIZE = 64
WIDTH = 8
GROUPS = 4
NUM_CATEGORIES = 2


@pytest.fixture(scope="session")
def coco_set(tmp_path_factory) -> Path:
    """root/{train,val}/*.jpg + root/annotations/instances_{train,val}.json (embedded layout)."""
    from sge_repro.data.synthetic import generate_detection_set

    root = tmp_path_factory.mktemp("det") / "coco"
    generate_detection_set(root, num_train=8, num_val=4, image_size=IMAGE_SIZE,
                           num_categories=NUM_CATEGORIES, seed=0, max_objects=3)
    return root


@pytest.fixture(scope="session")
def classifier_checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """One of our classifier checkpoints (sge_resnet18 at width 8) and the model it holds."""
    from sge_repro.models import create_model
    from sge_repro.models.weight_files import make_classifier_checkpoint

    model = create_model("sge_resnet18", num_classes=5, groups=GROUPS, width=WIDTH, seed=1)
    # non-trivial BN statistics and SGE parameters, so a dropped or misnamed tensor shows up
    # (from a generator of their own: the same values whichever tests ran before)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_mean", "running_var")) or ".sge." in name:
                tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) + 0.5)
    path = tmp_path_factory.mktemp("cls") / "sge_resnet18.pt"
    torch_save(make_classifier_checkpoint("sge_resnet18", {"num_classes": 5, "groups": GROUPS, "width": WIDTH}, model), path)
    return path, model


@pytest.fixture(scope="session")
def detectron2_weights(classifier_checkpoint, tmp_path_factory) -> Path:
    from sge_repro.detection.convert import convert_classifier_to_detectron2

    path = tmp_path_factory.mktemp("d2") / "sge_resnet18.pth"
    convert_classifier_to_detectron2(classifier_checkpoint[0], path)
    return path


@pytest.fixture(scope="session")
def registered(coco_set) -> tuple[str, str]:
    from sge_repro.detection.data import register_split

    register_split("test_det_train", coco_set, "train", "embedded")
    register_split("test_det_val", coco_set, "val", "embedded")
    return "test_det_train", "test_det_val"


def tiny_overrides(**extra) -> dict:
    """A few iterations at the fixture's image size."""
    overrides = {
        "SOLVER.MAX_ITER": 2,
        "SOLVER.STEPS": (),
        "SOLVER.IMS_PER_BATCH": 2,
        "SOLVER.WARMUP_ITERS": 1,
        "SOLVER.CHECKPOINT_PERIOD": 1,
        "INPUT.MIN_SIZE_TRAIN": (IMAGE_SIZE,),
        "INPUT.MAX_SIZE_TRAIN": IMAGE_SIZE,
        "INPUT.MIN_SIZE_TEST": IMAGE_SIZE,
        "INPUT.MAX_SIZE_TEST": IMAGE_SIZE,
    }
    overrides.update(extra)
    return overrides
