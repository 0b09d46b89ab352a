"""COCO annotation faults the data stage must refuse itself (issue "Faults that still get through",
item 5), each as one UserError line naming the annotation file, the id / key and what was expected,
before any manifest is written or changed: an image size in the JSON that is not the file's (as
detectron2 reads it, EXIF orientation applied), a split without annotations, ids that are not
integers, a file_name outside its split's image folder.

Each fault is tried on a project rerun (the previous manifests must stay byte for byte, mtime
included) and on a COCO 2017 root read in place by a fresh project (no manifest at all)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from sge_repro.data.prepare import prepare_data
from sge_repro.errors import UserError
from sge_repro.params import Params
from sge_repro.paths import ProjectPaths
from sge_repro.stages.data import data

EXIF_ORIENTATION = 0x0112
MODES = ("rerun", "coco2017")


def small_params(detection_root: Path | None = None) -> Params:
    raw = Params().model_dump(mode="json")
    raw["data"]["classification"].update(num_classes=2, image_size=32, train_per_class=2, val_per_class=1)
    raw["data"]["detection"].update(num_train=3, num_val=2, image_size=64, num_categories=2)
    if detection_root is not None:
        raw["data"]["detection"].update(source="coco", source_path=str(detection_root))
    return Params.model_validate(raw)


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Verification caches of sets read in place go to the test's folder, not ~/.cache."""
    monkeypatch.setenv("SGE_REPRO_CACHE", str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A project whose data stage ran once on the embedded sets (manifests written)."""
    root = tmp_path_factory.mktemp("pristine") / "project"
    prepare_data(small_params().data, ProjectPaths(root), workers=1)
    return root


class Dataset:
    """One copy of the detection set in either mode, with the paths a fault edits."""

    def __init__(self, pristine: Path, tmp_path: Path, mode: str):
        self.mode = mode
        self.paths = ProjectPaths(tmp_path / "project")
        if mode == "rerun":
            shutil.copytree(pristine, self.paths.root, symlinks=True)
            self.params = small_params()
            self.root = self.paths.det_data
        else:
            self.root = tmp_path / "coco"
            (self.root / "annotations").mkdir(parents=True)
            for split in ("train", "val"):
                shutil.copytree(pristine / "data" / "det" / split, self.root / f"{split}2017")
                shutil.copy(pristine / "data" / "det" / "annotations" / f"instances_{split}.json",
                            self.root / "annotations" / f"instances_{split}2017.json")
            self.params = small_params(self.root)
        self.before = self.manifests()

    def json_path(self, split: str) -> Path:
        suffix = "2017" if self.mode == "coco2017" else ""
        return self.root / "annotations" / f"instances_{split}{suffix}.json"

    def image_dir(self, split: str) -> Path:
        return self.root / (f"{split}2017" if self.mode == "coco2017" else split)

    def document(self, split: str) -> dict:
        return json.loads(self.json_path(split).read_text())

    def edit(self, split: str, change: Callable[[dict], None]) -> None:
        document = self.document(split)
        change(document)
        self.json_path(split).write_text(json.dumps(document))

    def manifests(self) -> dict:
        """bytes and mtime_ns of both manifests (None: absent)."""
        found = {}
        for name in ("cls", "det"):
            path = self.paths.manifest(name)
            found[name] = (path.read_bytes(), path.stat().st_mtime_ns) if path.exists() else None
        return found

    def refused(self, *names: str) -> str:
        """Run the data stage; it must fail with one line naming every one of `names`, and leave
        the manifests as they were (none in a fresh project)."""
        with pytest.raises(UserError) as error:
            data(self.params, self.paths)
        message = str(error.value)
        assert "\n" not in message
        for name in names:
            assert name in message, (name, message)
        assert self.manifests() == self.before
        if self.mode == "coco2017":
            assert self.before == {"cls": None, "det": None}
        return message


@pytest.fixture(params=MODES)
def dataset(request, pristine, tmp_path) -> Dataset:
    return Dataset(pristine, tmp_path, request.param)


def small_boxes(document: dict, image_id: int) -> None:
    """Boxes of `image_id` that fit any image of at least 16x16 (so only the size check speaks)."""
    for annotation in document["annotations"]:
        if annotation["image_id"] == image_id:
            annotation.update(bbox=[1, 1, 10, 12], area=120.0)
            annotation.pop("segmentation", None)


def save_image(path: Path, size: tuple[int, int], orientation: int | None = None) -> None:
    image = Image.new("RGB", size, (120, 30, 200))
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    image.save(path, "JPEG", exif=exif.tobytes())


# ------------------------------------------------------------------------ 1. sizes that are not the file's


@pytest.mark.parametrize("split, position, width, height", [
    ("train", 0, 80, 64),      # wider than the file
    ("train", 2, 64, 63),      # a pixel short
    ("val", 1, 64.0, 100),     # taller; a float width equal to the file's is not the fault
])
def test_a_json_size_that_is_not_the_files_is_refused(dataset, split, position, width, height):
    image = dataset.document(split)["images"][position]

    def change(document):
        document["images"][position].update(width=width, height=height)
        small_boxes(document, image["id"])

    dataset.edit(split, change)
    message = dataset.refused(str(dataset.json_path(split)), f"image id {image['id']}", image["file_name"],
                              f"{width}x{height}", "64x64")
    assert "width" in message and "height" in message


@pytest.mark.parametrize("split, position, file_size", [("train", 1, (48, 64)), ("val", 0, (64, 40))])
def test_an_image_file_replaced_by_one_of_another_size_is_refused(dataset, split, position, file_size):
    image = dataset.document(split)["images"][position]
    save_image(dataset.image_dir(split) / image["file_name"], file_size)
    dataset.edit(split, lambda document: small_boxes(document, image["id"]))
    dataset.refused(str(dataset.json_path(split)), f"image id {image['id']}", "64x64",
                    f"{file_size[0]}x{file_size[1]}")


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_sizes_are_compared_as_detectron2_reads_the_file_exif_orientation_applied(dataset, orientation):
    """A file stored 48 wide, 64 high with an EXIF orientation that turns it a quarter: detectron2
    reads it 64x48. The JSON's stored (raw) size is refused, the turned size accepted."""
    image = dataset.document("train")["images"][1]
    save_image(dataset.image_dir("train") / image["file_name"], (48, 64), orientation)

    def change(document):
        document["images"][1].update(width=48, height=64)
        small_boxes(document, image["id"])

    dataset.edit("train", change)
    dataset.refused(str(dataset.json_path("train")), f"image id {image['id']}", "48x64", "64x48")

    dataset.edit("train", lambda document: document["images"][1].update(width=64, height=48))
    summary = data(dataset.params, dataset.paths)
    assert summary["detection"]["train"] == 3 and summary["detection"]["manifest"] == "written"


@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4])
def test_an_exif_orientation_that_keeps_the_size_keeps_it(dataset, orientation):
    image = dataset.document("val")["images"][0]
    save_image(dataset.image_dir("val") / image["file_name"], (48, 64), orientation)

    def change(document):
        document["images"][0].update(width=64, height=48)
        small_boxes(document, image["id"])

    dataset.edit("val", change)
    dataset.refused(str(dataset.json_path("val")), f"image id {image['id']}", "64x48", "48x64")
    dataset.edit("val", lambda document: document["images"][0].update(width=48, height=64))
    assert data(dataset.params, dataset.paths)["detection"]["val"] == 2


def test_a_verification_cache_without_sizes_verifies_detection_again_but_not_classification(pristine, tmp_path):
    """A cache written before sizes were recorded: its detection files are decoded once more (a
    size is needed), its classification files are not (ImageNet is not decoded twice)."""
    project = Dataset(pristine, tmp_path, "rerun")
    paths = project.paths
    for name in ("cls", "det"):   # the copy's caches name the pristine root: point them here
        cache_file = paths.verify_cache(name)
        cache = json.loads(cache_file.read_text())
        cache["root"] = str(paths.cls_data if name == "cls" else paths.det_data)
        for folder in cache["folders"].values():
            folder.pop("dims", None)
        cache_file.write_text(json.dumps(cache))
        paths.index_state(name).unlink()
    image = project.document("val")["images"][1]

    def change(document):
        document["images"][1].update(width=70)
        small_boxes(document, image["id"])

    project.edit("val", change)
    project.refused(str(project.json_path("val")), f"image id {image['id']}", "70x64", "64x64")
    project.edit("val", lambda document: document["images"][1].update(width=64))
    summary = data(project.params, paths)
    assert summary["classification"]["decoded"] == 0 and summary["classification"]["manifest"] == "unchanged"
    assert summary["detection"]["decoded"] == 0   # decoded by the refused run, sizes now cached


# ------------------------------------------------------------------------ 2. no annotations


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_without_annotations_is_refused(dataset, split):
    dataset.edit(split, lambda document: document.update(annotations=[]))
    message = dataset.refused(str(dataset.json_path(split)), "'annotations'")
    assert "empty" in message or "no annotation" in message


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_whose_annotations_are_all_crowd_is_refused(dataset, split):
    def change(document):
        for annotation in document["annotations"]:
            annotation["iscrowd"] = 1

    dataset.edit(split, change)
    dataset.refused(str(dataset.json_path(split)), "iscrowd")


def test_a_split_without_images_is_refused(dataset):
    dataset.edit("val", lambda document: document.update(images=[], annotations=[]))
    dataset.refused(str(dataset.json_path("val")), "'images'")


# ------------------------------------------------------------------------ 3. ids that are not integers


@pytest.mark.parametrize("split, position, key, value", [
    ("train", 0, "image_id", [1]),
    ("val", 2, "image_id", True),          # a bool is not an id, even where id 1 exists
    ("train", 1, "image_id", 2.0),
    ("train", -1, "category_id", {"id": 1}),
    ("val", 0, "category_id", False),
    ("train", 2, "category_id", "1"),
    ("val", 1, "category_id", None),
])
def test_an_annotation_reference_that_is_not_an_integer_is_refused(dataset, split, position, key, value):
    annotation = dataset.document(split)["annotations"][position]
    dataset.edit(split, lambda document: document["annotations"][position].update({key: value}))
    dataset.refused(str(dataset.json_path(split)), f"annotation id {annotation['id']}", key, "integer")


# ------------------------------------------------------------------------ 4. file_name outside the split


@pytest.mark.parametrize("split, position, target", [
    ("train", 0, "../{other}/{other_name}"),           # the other split's folder
    ("val", 1, "../../{other_dir}/{other_name}"),       # further up, through the dataset root
    ("train", 2, "sub/../../{other}/{other_name}"),    # escapes after a detour
    ("val", 0, "{absolute}"),                          # an absolute path to an existing image
])
def test_a_file_name_outside_the_splits_image_folder_is_refused(dataset, split, position, target):
    other = "val" if split == "train" else "train"
    other_dir = dataset.image_dir(other)
    other_name = dataset.document(other)["images"][0]["file_name"]
    # every target names an existing image: the stage must refuse the path itself, not a missing file
    if target.startswith("../../"):
        target = "../../" + str(other_dir.relative_to(dataset.image_dir(split).parent.parent)) + "/{other_name}"
    file_name = target.format(other=other_dir.name, other_dir=other_dir.name, other_name=other_name,
                              absolute=other_dir / other_name)
    assert (dataset.image_dir(split) / file_name).resolve().is_file()
    image = dataset.document(split)["images"][position]
    dataset.edit(split, lambda document: document["images"][position].update(file_name=file_name))
    dataset.refused(str(dataset.json_path(split)), f"image id {image['id']}", "file_name", file_name,
                    str(dataset.image_dir(split)))


def test_a_file_name_in_a_missing_subfolder_is_named_and_a_detour_that_stays_inside_is_accepted(dataset):
    image = dataset.document("train")["images"][0]
    detour = f"sub/../{image['file_name']}"
    dataset.edit("train", lambda document: document["images"][0].update(file_name=detour))
    dataset.refused(detour, "missing")   # as detectron2 would open it: through sub/, which is not there
    (dataset.image_dir("train") / "sub").mkdir()
    assert data(dataset.params, dataset.paths)["detection"]["train"] == 3
