import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from sge_repro.data.coco_json import validate_coco_json
from sge_repro.data.patterns import SHAPES, TEXTURES, pattern_table
from sge_repro.data.synthetic import generate_classification_set, generate_detection_set, read_manifest
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
    assert len(set(table)) == len(table) >= 1000
    first_ten = table[:10]
    # Neither the shape nor the texture alone identifies a class among the first ten.
    assert len({p.shape for p in first_ten}) < 10 and len({p.texture for p in first_ten}) < 10
    # The first 48 patterns (all the embedded sets use) are the original shape x texture table.
    original = [(shape, TEXTURES[(index + shift) % len(TEXTURES)])
                for shift in range(len(TEXTURES)) for index, shape in enumerate(SHAPES)]
    assert [(p.shape, p.texture) for p in table[:48]] == original
    assert all(p.scale == "medium" and p.colours is None for p in table[:48])
    assert table[0].name == "circle / hstripes"
    # The rest add a texture scale no base pattern has and a fixed colour pair.
    assert all(p.scale != "medium" and p.colours is not None for p in table[48:])
    assert len({p.name for p in table}) == len(table)


def test_a_thousand_classes_generate(tmp_path):
    counts = generate_classification_set(tmp_path / "cls", num_classes=1000, image_size=16, train_per_class=1,
                                         val_per_class=1, seed=0)
    assert counts == {"num_classes": 1000, "train": 1000, "val": 1000}
    manifest = read_manifest(tmp_path / "cls")
    assert len(set(manifest["classes"].values())) == 1000
    assert manifest["classes"]["n00000048"] == "circle / hstripes / fine / white-black"


def non_manifest_files(root: Path) -> dict[str, bytes]:
    return {name: data for name, data in tree_bytes(root).items() if not name.endswith("manifest.json")}


def test_a_square_pair_is_the_same_as_an_int(tmp_path):
    for name, cls_size, det_size in (("int", 48, 96), ("pair", [48, 48], [96, 96])):
        generate_classification_set(tmp_path / name / "cls", 3, cls_size, 2, 1, seed=4)
        generate_detection_set(tmp_path / name / "det", 3, 2, det_size, num_categories=3, seed=4)
    assert non_manifest_files(tmp_path / "int") == non_manifest_files(tmp_path / "pair")
    assert read_manifest(tmp_path / "pair" / "cls")["image_size"] == [48, 48]


def test_a_width_by_height_set_has_that_size_everywhere(tmp_path):
    generate_classification_set(tmp_path / "cls", 3, [40, 24], 2, 1, seed=0)
    for path in (tmp_path / "cls").rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.size == (40, 24)
    assert read_manifest(tmp_path / "cls")["image_size"] == [40, 24]

    root = tmp_path / "det"
    width, height = 160, 96
    generate_detection_set(root, 6, 2, [width, height], num_categories=3, seed=0)
    assert read_manifest(root)["image_size"] == [160, 96]
    for split in ("train", "val"):
        json_path = root / "annotations" / f"instances_{split}.json"
        document = json.loads(json_path.read_text())
        for image_info in document["images"]:
            assert (image_info["width"], image_info["height"]) == (width, height)
            with Image.open(root / split / image_info["file_name"]) as image:
                assert image.size == (width, height)
        for annotation in document["annotations"]:
            x, y, w, h = annotation["bbox"]
            assert 0 <= x and x + w <= width and 0 <= y and y + h <= height
            xs, ys = annotation["segmentation"][0][0::2], annotation["segmentation"][0][1::2]
            assert 0 <= min(xs) and max(xs) <= width and 0 <= min(ys) and max(ys) <= height
        # also checks every file's decoded size against the JSON
        assert validate_coco_json(json_path, root / split)["annotations"] == len(document["annotations"])


def test_eighty_detection_categories_generate(tmp_path):
    root = tmp_path / "det"
    counts = generate_detection_set(root, 6, 2, [128, 96], num_categories=80, seed=0)
    document = json.loads((root / "annotations" / "instances_train.json").read_text())
    names = [category["name"] for category in document["categories"]]
    assert len(set(names)) == 80 and names[0] == "circle-hstripes" and names[48] == "circle-hstripes-fine-white-black"
    assert counts["train_annotations"] >= 6
    validate_coco_json(root / "annotations" / "instances_train.json", root / "train")


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
    ({"num_classes": 1009}, "num_classes=1009: expected at most 1008 "),
    ({"image_size": 8}, "image_size=8: expected at least 16 pixels"),
    ({"image_size": [32, 8]}, r"image_size=\[32, 8\]: expected at least 16 pixels per side"),
    ({"image_size": [32, 32, 3]}, r"image_size=\[32, 32, 3\]: expected a size in pixels or \[width, height\]"),
    ({"train_per_class": -1}, "train_per_class=-1"),
])
def test_classification_arguments_are_checked(tmp_path, kwargs, message):
    arguments = {"num_classes": 3, "image_size": 32, "train_per_class": 2, "val_per_class": 1, "seed": 0}
    arguments.update(kwargs)
    with pytest.raises(UserError, match=message):
        generate_classification_set(tmp_path / "cls", **arguments)
    assert not (tmp_path / "cls").exists()


def test_detection_arguments_are_checked(tmp_path):
    with pytest.raises(UserError, match="num_categories=1009: expected at most 1008 "):
        generate_detection_set(tmp_path / "det", 2, 1, 96, 1009, seed=0)
    with pytest.raises(UserError, match="image_size=32: expected at least 64 pixels for detection"):
        generate_detection_set(tmp_path / "det", 2, 1, 32, 2, seed=0)
    with pytest.raises(UserError, match=r"image_size=\[640, 32\]: expected at least 64 pixels per side"):
        generate_detection_set(tmp_path / "det", 2, 1, [640, 32], 2, seed=0)
