"""The `data` stage on real-format sources: an ImageNet ImageFolder tree and a COCO 2017 root."""

import json
import shutil
from pathlib import Path

import pytest

from sge_repro.data.prepare import prepare_data
from sge_repro.data.synthetic import generate_classification_set, generate_detection_set
from sge_repro.errors import UserError
from sge_repro.params import Params
from sge_repro.paths import ProjectPaths


def imagenet_like_tree(root: Path) -> list[str]:
    generate_classification_set(root, num_classes=3, image_size=32, train_per_class=2, val_per_class=1, seed=0)
    return sorted(p.name for p in (root / "train").iterdir())


def coco2017_like_root(root: Path) -> Path:
    generated = root.parent / "generated"
    generate_detection_set(generated, num_train=3, num_val=2, image_size=64, num_categories=2, seed=0)
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(generated / split, root / f"{split}2017")
        shutil.copy(generated / "annotations" / f"instances_{split}.json",
                    root / "annotations" / f"instances_{split}2017.json")
    return root


def real_params(imagenet: Path, coco: Path, subset: list[str] | None) -> Params:
    raw = Params().model_dump(mode="json")
    raw["data"]["classification"].update(source="imagenet", source_path=str(imagenet), subset_classes=subset)
    raw["data"]["detection"].update(source="coco", source_path=str(coco))
    return Params.model_validate(raw)


def test_data_stage_prepares_imagenet_subset_and_validates_coco(tmp_path):
    classes = imagenet_like_tree(tmp_path / "imagenet")
    coco = coco2017_like_root(tmp_path / "coco")
    paths = ProjectPaths(tmp_path / "project")
    manifest = prepare_data(real_params(tmp_path / "imagenet", coco, classes).data, paths)

    assert manifest["classification_source"] == "imagenet"
    assert manifest["datasets"]["classification"]["train_images"] == 6
    assert manifest["datasets"]["classification"]["val_images"] == 3
    assert sorted(p.name for p in (paths.cls_data / "train").iterdir()) == classes
    assert manifest["datasets"]["detection"]["val2017"]["images"] == 2
    record = json.loads((paths.det_data / "coco_root.json").read_text())
    assert record["root"] == str(coco.resolve())
    assert json.loads(paths.data_manifest.read_text()) == manifest


def test_data_stage_refuses_a_broken_coco_root(tmp_path):
    classes = imagenet_like_tree(tmp_path / "imagenet")
    coco = coco2017_like_root(tmp_path / "coco")
    (coco / "annotations" / "instances_val2017.json").write_text("{not json")
    paths = ProjectPaths(tmp_path / "project")
    with pytest.raises(UserError, match="instances_val2017.json"):
        prepare_data(real_params(tmp_path / "imagenet", coco, classes).data, paths)
    assert not paths.data_manifest.exists()


def test_data_stage_names_a_missing_source_path(tmp_path):
    params = real_params(tmp_path / "nowhere", tmp_path / "coco", None)
    with pytest.raises(UserError, match=r"data.classification.source_path: .*nowhere does not exist"):
        prepare_data(params.data, ProjectPaths(tmp_path / "project"))
