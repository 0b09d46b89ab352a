import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sge_repro.classification.transforms import eval_transform
from sge_repro.data.imagefolder import build_imagefolder, collate_skipping_none, decode_rgb
from sge_repro.data.synthetic import generate_classification_set
from sge_repro.errors import UserError


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "cls"
    generate_classification_set(root, num_classes=3, image_size=32, train_per_class=4, val_per_class=2, seed=0)
    return root


@pytest.fixture
def tree(generated, tmp_path):
    root = tmp_path / "cls"
    shutil.copytree(generated, root)
    return root


def first_image(root, split="train"):
    return sorted((root / split).rglob("*.jpg"))[0]


def test_loads_generated_set(generated):
    dataset = build_imagefolder(generated, "train", eval_transform(32))
    assert dataset.classes == ["n00000000", "n00000001", "n00000002"]
    assert len(dataset) == 12 and dataset.targets == [0] * 4 + [1] * 4 + [2] * 4
    image, target = dataset[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and target == 1  # normalised on the device
    assert dataset.file_names[0] == "n00000000/train_0000_000000.jpg"
    assert dataset.skipped == []


def test_missing_split_is_named(tree):
    shutil.rmtree(tree / "val")
    with pytest.raises(UserError, match=r"cls/val: missing; expected val/<class>/<image>"):
        build_imagefolder(tree, "train")


def test_empty_class_folder_is_named(tree):
    for path in (tree / "val" / "n00000001").iterdir():
        path.unlink()
    with pytest.raises(UserError, match=r"val/n00000001: empty class folder"):
        build_imagefolder(tree, "train")


def test_class_lists_of_splits_must_agree(tree):
    (tree / "val" / "n00000002").rename(tree / "val" / "n00000009")
    with pytest.raises(UserError, match=r"only in train: n00000002; only in val: n00000009"):
        build_imagefolder(tree, "val")


def test_expected_classes_are_enforced(generated):
    with pytest.raises(UserError, match=r"missing: n00000003; extra: none"):
        build_imagefolder(generated, "val", expected_classes=[f"n{k:08d}" for k in range(4)])


def test_unknown_split_and_missing_root(tmp_path, generated):
    with pytest.raises(UserError, match="split='test'"):
        build_imagefolder(generated, "test")
    with pytest.raises(UserError, match="data folder not found"):
        build_imagefolder(tmp_path / "nowhere", "train")


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_folder_walk_decodes_nothing_and_load_time_corruption_is_named(tree):
    """Verification is the data stage's job: building a dataset never decodes; a file corrupted
    later fails at load time naming it (or is skipped and counted with skip_corrupt)."""
    bad = first_image(tree)
    truncate(bad)
    strict = build_imagefolder(tree, "train", eval_transform(32))
    assert len(strict) == 12 and strict.skipped == []
    with pytest.raises(UserError, match=bad.name):
        strict[0]
    lenient = build_imagefolder(tree, "train", eval_transform(32), skip_corrupt=True)
    assert lenient[0] is None
    images, targets, skipped = collate_skipping_none([lenient[i] for i in range(4)])
    assert images.shape == (3, 3, 32, 32) and skipped == 1 and targets.tolist() == [0, 0, 0]


def test_garbage_file_is_named_at_load_time(tree):
    bad = first_image(tree, "val")
    bad.write_bytes(b"not an image at all")
    dataset = build_imagefolder(tree, "val", eval_transform(32))
    with pytest.raises(UserError, match=str(bad.name)) as error:
        dataset[0]
    assert "corrupt" in str(error.value) and "\n" not in str(error.value)


def save(image, path, format):
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("mode, format", [
    ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG"),
])
def test_every_mode_decodes_to_rgb(tmp_path, mode, format):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        image = Image.fromarray((rng.integers(0, 65535, size=(20, 24))).astype(np.uint16))
    else:
        image = base.convert(mode)
    path = tmp_path / "image.JPEG"  # PNG bytes behind a .JPEG name, as a few ImageNet files are
    save(image, path, format)
    decoded = decode_rgb(path)
    assert decoded.mode == "RGB" and decoded.size == (24, 20)
    if mode == "L":
        array = np.asarray(decoded)
        assert (array[..., 0] == array[..., 1]).all()
    if mode == "I;16":
        assert np.asarray(decoded).max() > 200  # scaled to 8 bits, not clipped to white


def test_train_and_val_with_different_classes_name_both_sides(tmp_path):
    from sge_repro.data.imagefolder import check_layout

    for split, names in (("train", ["a", "b"]), ("val", ["b", "c"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / split / name / "x.png")
    with pytest.raises(UserError, match=r"train/ and val/ class folders differ \(only in train: a; only in val: c\)"):
        check_layout(tmp_path)
