import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from sge_repro.data.coco_json import validate_coco_json
from sge_repro.data.synthetic import (
    generate_classification_set,
    generate_detection_set,
    pattern_table,
    read_manifest,
)
from sge_repro.errors import UserError


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make_cls(root, seed=0):
    return generate_classification_set(root, num_classes=3, image_size=32, train_per_class=3, val_per_class=2,
                                       seed=seed)


def make_det(root, seed=0):
    return generate_detection_set(root, num_train=4, num_val=2, image_size=96, num_categories=3, seed=seed,
                                  max_objects=5)


def test_classification_set_layout_and_counts(tmp_path):
    counts = make_cls(tmp_path / "cls")
    assert counts == {"num_classes": 3, "train": 9, "val": 6}
    root = tmp_path / "cls"
    for split, per_class in (("train", 3), ("val", 2)):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == ["n00000000", "n00000001", "n00000002"]
        for name in classes:
            files = sorted((root / split / name).glob("*.jpg"))
            assert len(files) == per_class
            with Image.open(files[0]) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
    manifest = read_manifest(root)
    assert manifest["counts"] == {"train": 9, "val": 6}
    assert manifest["classes"]["n00000000"] == "circle / hstripes"


def test_classification_set_is_deterministic(tmp_path):
    make_cls(tmp_path / "a", seed=7)
    make_cls(tmp_path / "b", seed=7)
    make_cls(tmp_path / "c", seed=8)
    a, b, c = (tree_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    differing = [name for name in a if name.endswith(".jpg") and a[name] != c[name]]
    assert len(differing) == 15  # every image changes with the seed


def test_classes_are_distinct_patterns():
    table = pattern_table()
    assert len(set(table)) == len(table) == 48
    first_ten = table[:10]
    # Neither the shape nor the texture alone identifies a class among the first ten.
    assert len({shape for shape, _ in first_ten}) < 10 and len({texture for _, texture in first_ten}) < 10


def test_detection_set_is_valid_coco(tmp_path):
    root = tmp_path / "det"
    counts = make_det(root)
    assert counts["train_images"] == 4 and counts["val_images"] == 2 and counts["train_annotations"] >= 4
    for split in ("train", "val"):
        json_path = root / "annotations" / f"instances_{split}.json"
        coco = COCO(str(json_path))
        assert len(coco.getImgIds()) == counts[f"{split}_images"]
        assert len(coco.getAnnIds()) == counts[f"{split}_annotations"]
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [
            "circle-hstripes", "triangle-vstripes", "square-dstripes"]
        for annotation in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = annotation["bbox"]
            assert w > 0 and h > 0 and 0 <= x and x + w <= 96 and 0 <= y and y + h <= 96
            assert annotation["iscrowd"] == 0
            # The polygon mask is the painted object: its pixel area agrees with the stored area
            # and lies inside the box.
            mask = coco.annToMask(annotation)
            assert abs(mask.sum() - annotation["area"]) <= 0.15 * annotation["area"] + 4
            ys, xs = np.nonzero(mask)
            assert xs.min() >= int(x) - 1 and xs.max() <= x + w + 1
        stats = validate_coco_json(json_path, root / split)
        assert stats["images"] == counts[f"{split}_images"]
        assert stats["annotations"] == counts[f"{split}_annotations"]


def test_detection_objects_span_coco_size_ranges(tmp_path):
    root = tmp_path / "det"
    generate_detection_set(root, num_train=30, num_val=1, image_size=128, num_categories=3, seed=0)
    stats = validate_coco_json(root / "annotations" / "instances_train.json", root / "train")
    assert stats["small"] > 0 and stats["medium"] > 0
    assert all(count > 0 for count in stats["annotations_per_category"].values())


def test_detection_set_is_deterministic(tmp_path):
    make_det(tmp_path / "a", seed=3)
    make_det(tmp_path / "b", seed=3)
    make_det(tmp_path / "c", seed=4)
    a, b, c = (tree_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]
    assert a["train/train_000000.jpg"] != c["train/train_000000.jpg"]


def test_killed_generation_leaves_no_complete_looking_tree(tmp_path):
    root = tmp_path / "cls"

    def interrupt(split, done, total):
        if done == 4:
            raise KeyboardInterrupt  # what Ctrl-C or a stage timeout looks like inside the loop

    with pytest.raises(KeyboardInterrupt):
        generate_classification_set(root, 3, 32, 3, 2, seed=0, progress=interrupt)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind either
    with pytest.raises(UserError, match="manifest.json: missing"):
        read_manifest(root)


def test_failed_regeneration_keeps_the_previous_set(tmp_path):
    root = tmp_path / "cls"
    make_cls(root, seed=1)
    before = tree_bytes(root)

    def interrupt(split, done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_classification_set(root, 3, 32, 3, 2, seed=2, progress=interrupt)
    assert tree_bytes(root) == before
    make_cls(root, seed=2)
    assert json.loads((root / "manifest.json").read_text())["seed"] == 2


def test_stale_staging_folder_of_a_dead_process_is_removed(tmp_path):
    stale = tmp_path / ".cls.tmp-999999999-1"
    (stale / "train").mkdir(parents=True)
    make_cls(tmp_path / "cls")
    assert not stale.exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 0}, "num_classes=0"),
    ({"num_classes": 49}, "num_classes=49: expected at most 48"),
    ({"image_size": 8}, "image_size=8"),
    ({"train_per_class": -1}, "train_per_class=-1"),
])
def test_classification_arguments_are_checked(tmp_path, kwargs, message):
    arguments = {"num_classes": 3, "image_size": 32, "train_per_class": 2, "val_per_class": 1, "seed": 0}
    arguments.update(kwargs)
    with pytest.raises(UserError, match=message):
        generate_classification_set(tmp_path / "cls", **arguments)
    assert not (tmp_path / "cls").exists()


def test_detection_arguments_are_checked(tmp_path):
    with pytest.raises(UserError, match="num_categories=9"):
        generate_detection_set(tmp_path / "det", 2, 1, 96, 9, seed=0)
    with pytest.raises(UserError, match="image_size=32"):
        generate_detection_set(tmp_path / "det", 2, 1, 32, 2, seed=0)
