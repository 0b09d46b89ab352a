import json
import shutil

import pytest

from sge_repro.data.coco_json import coco_split_paths
from sge_repro.detection.compat import import_detectron2
from sge_repro.detection.data import register_coco_dataset, register_split
from sge_repro.errors import UserError

import_detectron2()
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402


def test_split_paths_of_both_layouts(tmp_path):
    assert coco_split_paths(tmp_path, "train", "coco2017") == (
        tmp_path / "annotations" / "instances_train2017.json", tmp_path / "train2017")
    assert coco_split_paths(tmp_path, "val", "embedded") == (
        tmp_path / "annotations" / "instances_val.json", tmp_path / "val")
    with pytest.raises(UserError, match="layout"):
        coco_split_paths(tmp_path, "val", "voc")
    with pytest.raises(UserError, match="split"):
        coco_split_paths(tmp_path, "test", "coco2017")


def test_official_coco_layout_registers_through_the_same_function(coco_set, tmp_path):
    # a tiny tree with COCO 2017's names: train2017/, val2017/, annotations/instances_*2017.json
    root = tmp_path / "coco"
    for split in ("train", "val"):
        shutil.copytree(coco_set / split, root / f"{split}2017")
        (root / "annotations").mkdir(exist_ok=True)
        shutil.copy(coco_set / "annotations" / f"instances_{split}.json",
                    root / "annotations" / f"instances_{split}2017.json")
    counts = register_split("test_coco2017_val", root, "val", "coco2017")
    assert counts["images"] == 4 and counts["categories"] == 2
    records = DatasetCatalog.get("test_coco2017_val")
    assert len(records) == 4
    assert records[0]["file_name"].startswith(str((root / "val2017").resolve()))
    assert MetadataCatalog.get("test_coco2017_val").json_file == str(
        (root / "annotations" / "instances_val2017.json").resolve())
    # same name, same files: a no-op; other files: replaced
    register_split("test_coco2017_val", root, "val", "coco2017")
    register_split("test_coco2017_val", root, "train", "coco2017")
    assert len(DatasetCatalog.get("test_coco2017_val")) == 8


def test_excluded_images_are_left_out_of_the_registered_dataset(coco_set):
    """data.skip_corrupt: the files the data stage found corrupt never reach detectron2."""
    image_root = (coco_set / "val").resolve()
    names = sorted(p.name for p in image_root.iterdir())
    register_split("test_excluded_val", coco_set, "val", "embedded", validate=False)
    assert len(DatasetCatalog.get("test_excluded_val")) == len(names)
    excluded = frozenset({str(image_root / names[1])})
    register_split("test_excluded_val", coco_set, "val", "embedded", validate=False, exclude=excluded)
    records = DatasetCatalog.get("test_excluded_val")
    assert len(records) == len(names) - 1 and str(image_root / names[1]) not in {r["file_name"] for r in records}
    assert MetadataCatalog.get("test_excluded_val").evaluator_type == "coco"


def _broken_copy(coco_set, tmp_path, edit):
    root = tmp_path / "broken"
    shutil.copytree(coco_set, root)
    json_file = root / "annotations" / "instances_val.json"
    data = json.loads(json_file.read_text())
    edit(data, root)
    json_file.write_text(json.dumps(data))
    return json_file, root / "val"


def test_malformed_json_names_the_file(coco_set, tmp_path):
    json_file, image_root = _broken_copy(coco_set, tmp_path, lambda data, root: None)
    json_file.write_text('{"images": [')
    with pytest.raises(UserError, match=rf"{json_file}: malformed JSON at line 1"):
        register_coco_dataset("test_broken", json_file, image_root)


def test_missing_image_file_names_the_image_id(coco_set, tmp_path):
    json_file, image_root = _broken_copy(
        coco_set, tmp_path, lambda data, root: (root / "val" / data["images"][2]["file_name"]).unlink())
    with pytest.raises(UserError, match=rf"{json_file}: image id 3: file .* not found"):
        register_coco_dataset("test_broken", json_file, image_root)


def test_unknown_category_names_the_annotation_id(coco_set, tmp_path):
    def edit(data, root):
        data["annotations"][1]["category_id"] = 99

    json_file, image_root = _broken_copy(coco_set, tmp_path, edit)
    annotation_id = json.loads(json_file.read_text())["annotations"][1]["id"]
    with pytest.raises(UserError, match=rf"{json_file}: annotation id {annotation_id} points at unknown category id 99"):
        register_coco_dataset("test_broken", json_file, image_root)


@pytest.mark.parametrize("box", [[5, 5, 0, 10], [5, 5, 10, -2]])
def test_non_positive_box_names_the_annotation_id(coco_set, tmp_path, box):
    def edit(data, root):
        data["annotations"][0]["bbox"] = box

    json_file, image_root = _broken_copy(coco_set, tmp_path, edit)
    annotation_id = json.loads(json_file.read_text())["annotations"][0]["id"]
    with pytest.raises(UserError, match=rf"annotation id {annotation_id} has bbox .* non-positive"):
        register_coco_dataset("test_broken", json_file, image_root)
    assert "test_broken" not in DatasetCatalog.list()


# ------------------------------------------------------------ faults the data stage refuses (issue item 5)


@pytest.mark.parametrize("orientation, stored, seen", [
    (None, (48, 64), (48, 64)), (3, (48, 64), (48, 64)), (6, (48, 64), (64, 48)), (8, (40, 56), (56, 40)),
    (5, (64, 40), (40, 64)), (7, (30, 20), (20, 30)),
])
def test_the_data_stage_measures_an_image_as_detectron2_reads_it(tmp_path, orientation, stored, seen):
    """The size the data stage's single verification pass records is the one detectron2's
    read_image + check_image_size compare with the JSON (EXIF orientation applied)."""
    from detectron2.data.detection_utils import SizeMismatchError, check_image_size, read_image
    from PIL import Image

    from sge_repro.data.verify import check_file

    path = tmp_path / "image.jpg"
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.new("RGB", stored, (10, 200, 30)).save(path, "JPEG", exif=exif.tobytes())
    digest, error, dims = check_file(str(path))
    assert error is None and len(digest) == 32 and dims == list(seen)
    image = read_image(str(path), format="BGR")
    check_image_size({"file_name": str(path), "width": dims[0], "height": dims[1]}, image)
    if stored != seen:
        with pytest.raises(SizeMismatchError):
            check_image_size({"file_name": str(path), "width": stored[0], "height": stored[1]}, image)


@pytest.mark.parametrize("section, position, key, value, named", [
    ("annotations", 0, "image_id", [1], "image_id"),
    ("annotations", 2, "category_id", {"id": 1}, "category_id"),
    ("annotations", 1, "image_id", True, "image_id"),
    ("images", 1, "file_name", "../train/{name}", "file_name"),
    ("images", 0, "file_name", "{absolute}", "file_name"),
])
def test_register_refuses_what_the_data_stage_refuses(coco_set, tmp_path, section, position, key, value, named):
    """One validator: registering a split by hand refuses the same id types and file names."""
    train_name = sorted(p.name for p in (coco_set / "train").iterdir())[0]

    def edit(data, root):
        value_here = value.format(name=train_name, absolute=root / "train" / train_name) \
            if isinstance(value, str) else value
        data[section][position][key] = value_here

    json_file, image_root = _broken_copy(coco_set, tmp_path, edit)
    record = json.loads(json_file.read_text())[section][position]
    singular = section[:-1]
    with pytest.raises(UserError) as error:
        register_coco_dataset("test_broken_ids", json_file, image_root)
    message = str(error.value)
    assert "\n" not in message and str(json_file) in message
    assert f"{singular} id {record['id']}" in message and named in message
    assert "test_broken_ids" not in DatasetCatalog.list()
