"""ImageNet preparation on a tiny archive set with the official structure (3 classes)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from sge_repro.data.imagefolder import build_imagefolder
from sge_repro.data.imagenet_archives import (
    DEVKIT_ARCHIVE, OFFICIAL_MD5, SUMMARY_FILE, TRAIN_ARCHIVE, VAL_ARCHIVE, prepare_imagenet, read_devkit,
)
from sge_repro.errors import UserError

CLASSES = ["n01440764", "n01443537", "n01484850"]
TRAIN_PER_CLASS = {"n01440764": 3, "n01443537": 2, "n01484850": 4}
# ILSVRC2012_ID of val image 1..7 (1-based ids, as in the devkit's ground-truth file)
VAL_LABELS = [2, 1, 3, 3, 1, 2, 3]


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(files: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            _add(tar, name, data)
    return buffer.getvalue()


def _meta_mat(classes: list[str]) -> bytes:
    """meta.mat with the devkit's field layout: leaves 1..N first, then an inner WordNet node."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((len(classes) + 1, 1), dtype=[(name, "O") for name in fields])
    for index, wnid in enumerate(classes):
        synsets[index, 0] = (np.uint16(index + 1), wnid, f"words of {wnid}", "a gloss", np.uint8(0),
                             np.zeros((1, 0), dtype=np.uint8), np.uint8(0), np.uint16(1300))
    synsets[len(classes), 0] = (np.uint16(len(classes) + 1), "n00001740", "entity", "the root", np.uint8(2),
                                np.array([[1, 2]], dtype=np.uint16), np.uint8(19), np.uint16(0))
    buffer = io.BytesIO()
    savemat(buffer, {"synsets": synsets})
    return buffer.getvalue()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_archives(folder: Path, train_classes=CLASSES, extra_val: dict[str, bytes] | None = None,
                  extra_class_tar: dict[str, bytes] | None = None) -> dict[str, str]:
    """Write the three archives like the official ones; return their MD5s."""
    folder.mkdir(parents=True, exist_ok=True)
    seed = 0
    class_tars = {}
    for wnid in train_classes:
        images = {}
        for number in range(TRAIN_PER_CLASS[wnid]):
            images[f"{wnid}_{number + 10}.JPEG"] = _jpeg(seed := seed + 1)
        if extra_class_tar and wnid == train_classes[0]:
            images.update(extra_class_tar)
        class_tars[f"{wnid}.tar"] = _tar_bytes(images)
    (folder / TRAIN_ARCHIVE).write_bytes(_tar_bytes(class_tars))
    val = {f"ILSVRC2012_val_{number:08d}.JPEG": _jpeg(1000 + number) for number in range(1, len(VAL_LABELS) + 1)}
    val.update(extra_val or {})
    (folder / VAL_ARCHIVE).write_bytes(_tar_bytes(val))
    truth = "".join(f"{label}\n" for label in VAL_LABELS).encode()
    (folder / DEVKIT_ARCHIVE).write_bytes(_tar_bytes({
        "ILSVRC2012_devkit_t12/data/meta.mat": _meta_mat(CLASSES),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth,
        "ILSVRC2012_devkit_t12/readme.txt": b"devkit",
    }, mode="w:gz"))
    return {name: _md5(folder / name) for name in (TRAIN_ARCHIVE, VAL_ARCHIVE, DEVKIT_ARCHIVE)}


def _leftovers(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if ".tmp-" in path.name)


def test_devkit_maps_ids_to_wnids(tmp_path):
    md5 = make_archives(tmp_path / "src")
    devkit = read_devkit(tmp_path / "src" / DEVKIT_ARCHIVE, md5[DEVKIT_ARCHIVE])
    assert devkit.wnid_by_id == {1: CLASSES[0], 2: CLASSES[1], 3: CLASSES[2]}  # the inner node is left out
    assert devkit.val_labels == VAL_LABELS
    assert devkit.words_by_wnid[CLASSES[1]] == f"words of {CLASSES[1]}"


def test_archives_unpack_into_imagefolder(tmp_path):
    md5 = make_archives(tmp_path / "src")
    seen = []
    counts = prepare_imagenet(tmp_path / "src", tmp_path / "out", expected_md5=md5,
                              progress=lambda done, total: seen.append((done, total)))
    assert counts["source_kind"] == "archives"
    assert counts["classes"] == 3
    assert counts["train_images"] == sum(TRAIN_PER_CLASS.values())
    assert counts["val_images"] == len(VAL_LABELS)
    assert counts["official_counts"] is False
    assert json.loads((tmp_path / "out" / SUMMARY_FILE).read_text()) == counts
    out = tmp_path / "out"
    for wnid in CLASSES:
        assert sorted(p.name for p in (out / "train" / wnid).iterdir()) == \
            sorted(f"{wnid}_{n + 10}.JPEG" for n in range(TRAIN_PER_CLASS[wnid]))
    for number, label in enumerate(VAL_LABELS, start=1):
        assert (out / "val" / CLASSES[label - 1] / f"ILSVRC2012_val_{number:08d}.JPEG").is_file()
    # The bytes are the archive's bytes.
    assert (out / "val" / CLASSES[1] / "ILSVRC2012_val_00000001.JPEG").read_bytes() == _jpeg(1001)
    # Progress ends at the total bytes of the two image archives.
    total = (tmp_path / "src" / TRAIN_ARCHIVE).stat().st_size + (tmp_path / "src" / VAL_ARCHIVE).stat().st_size
    assert seen[-1] == (total, total)
    # The colleague's loader accepts the tree.
    dataset = build_imagefolder(out, "val", expected_classes=CLASSES)
    assert len(dataset) == len(VAL_LABELS) and dataset.classes == CLASSES
    assert _leftovers(tmp_path) == []


def test_default_md5s_are_the_official_ones(tmp_path):
    make_archives(tmp_path / "src")
    assert OFFICIAL_MD5[TRAIN_ARCHIVE] == "1d675b47d978889d74fa0da5fadfb00e"
    with pytest.raises(UserError, match=f"{DEVKIT_ARCHIVE}: MD5 mismatch \\(expected {OFFICIAL_MD5[DEVKIT_ARCHIVE]}"):
        prepare_imagenet(tmp_path / "src", tmp_path / "out")


def test_tampered_archive_fails_md5_and_leaves_old_tree(tmp_path):
    md5 = make_archives(tmp_path / "src")
    prepare_imagenet(tmp_path / "src", tmp_path / "out", expected_md5=md5)
    before = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    train = tmp_path / "src" / TRAIN_ARCHIVE
    data = bytearray(train.read_bytes())
    data[2000] ^= 0xFF  # inside the first image (after two 512-byte headers): the tar still reads
    train.write_bytes(bytes(data))
    actual = _md5(train)
    with pytest.raises(UserError) as error:
        prepare_imagenet(tmp_path / "src", tmp_path / "out", expected_md5=md5)
    message = str(error.value)
    assert TRAIN_ARCHIVE in message and md5[TRAIN_ARCHIVE] in message and actual in message
    assert "\n" not in message
    # The earlier tree is untouched and no temp folder is left behind.
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == before
    assert _leftovers(tmp_path) == []


def test_truncated_archive_reports_md5(tmp_path):
    md5 = make_archives(tmp_path / "src")
    val = tmp_path / "src" / VAL_ARCHIVE
    val.write_bytes(val.read_bytes()[:1500])  # the tar reader breaks first; the checksum explains why
    with pytest.raises(UserError, match=f"{VAL_ARCHIVE}: MD5 mismatch"):
        prepare_imagenet(tmp_path / "src", tmp_path / "out", expected_md5=md5)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["val", "class tar"])
def test_member_escaping_with_dotdot_is_refused(tmp_path, where):
    evil = {"../evil.JPEG": b"not an image"}
    if where == "val":
        md5 = make_archives(tmp_path / "src", extra_val=evil)
    else:
        md5 = make_archives(tmp_path / "src", extra_class_tar=evil)
    with pytest.raises(UserError, match=r"member .*'\.\./evil\.JPEG' refused"):
        prepare_imagenet(tmp_path / "src", tmp_path / "out", expected_md5=md5)
    assert not list(tmp_path.rglob("evil.JPEG"))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_symlink_member_is_refused(tmp_path):
    md5 = make_archives(tmp_path / "src")
    val = tmp_path / "src" / VAL_ARCHIVE
    with tarfile.open(val, "a") as tar:
        link = tarfile.TarInfo("ILSVRC2012_val_00000008.JPEG")
        link.type = tarfile.SYMTYPE
        link.linkname = "ILSVRC2012_val_00000001.JPEG"  # inside the folder, but still not a plain file
        tar.addfile(link)
    md5[VAL_ARCHIVE] = _md5(val)
    with pytest.raises(UserError, match="is not a regular file"):
        prepare_imagenet(tmp_path / "src", tmp_path / "out", expected_md5=md5)


def test_missing_class_refused_unless_subset(tmp_path):
    md5 = make_archives(tmp_path / "src", train_classes=CLASSES[:2])
    with pytest.raises(UserError, match=f"classes missing: {CLASSES[2]}"):
        prepare_imagenet(tmp_path / "src", tmp_path / "out", expected_md5=md5)
    assert not (tmp_path / "out").exists()
    counts = prepare_imagenet(tmp_path / "src", tmp_path / "out", subset_classes=CLASSES[:2], expected_md5=md5)
    assert counts["classes"] == 2
    assert counts["train_images"] == TRAIN_PER_CLASS[CLASSES[0]] + TRAIN_PER_CLASS[CLASSES[1]]
    assert counts["val_images"] == sum(1 for label in VAL_LABELS if label <= 2)
    assert sorted(p.name for p in (tmp_path / "out" / "val").iterdir()) == CLASSES[:2]


def test_subset_class_unknown_to_devkit_is_refused(tmp_path):
    md5 = make_archives(tmp_path / "src")
    with pytest.raises(UserError, match="subset classes not found: n09999999"):
        prepare_imagenet(tmp_path / "src", tmp_path / "out", subset_classes=[CLASSES[0], "n09999999"],
                         expected_md5=md5)


def test_imagefolder_source_becomes_linked_tree(tmp_path):
    md5 = make_archives(tmp_path / "src")
    prepare_imagenet(tmp_path / "src", tmp_path / "tree", expected_md5=md5)
    # A tree with the devkit beside it is compared with meta.mat's class list.
    tree = tmp_path / "tree"
    (tree / DEVKIT_ARCHIVE).write_bytes((tmp_path / "src" / DEVKIT_ARCHIVE).read_bytes())
    counts = prepare_imagenet(tree, tmp_path / "linked")
    assert counts["source_kind"] == "imagefolder"
    assert (counts["classes"], counts["train_images"], counts["val_images"]) == \
        (3, sum(TRAIN_PER_CLASS.values()), len(VAL_LABELS))
    link = tmp_path / "linked" / "train" / CLASSES[0]
    assert link.is_symlink() and link.resolve() == (tree / "train" / CLASSES[0]).resolve()
    assert len(build_imagefolder(tmp_path / "linked", "train", expected_classes=CLASSES)) == 9

    # Extra class folder: refused, naming it, unless a subset is declared.
    for split in ("train", "val"):
        (tree / split / "n09999999").mkdir()
        (tree / split / "n09999999" / "x.JPEG").write_bytes(_jpeg(7))
    with pytest.raises(UserError, match="extra: n09999999"):
        prepare_imagenet(tree, tmp_path / "linked2")
    counts = prepare_imagenet(tree, tmp_path / "linked2", subset_classes=CLASSES[1:])
    assert counts["classes"] == 2
    assert sorted(p.name for p in (tmp_path / "linked2" / "val").iterdir()) == CLASSES[1:]


def test_imagefolder_without_devkit_needs_1000_classes(tmp_path):
    md5 = make_archives(tmp_path / "src")
    prepare_imagenet(tmp_path / "src", tmp_path / "tree", expected_md5=md5)
    with pytest.raises(UserError, match=r"missing: 997 class folder\(s\)"):
        prepare_imagenet(tmp_path / "tree", tmp_path / "linked")
    assert not (tmp_path / "linked").exists()
    (tmp_path / "tree" / "val" / CLASSES[0]).rename(tmp_path / "tree" / "val" / "n00000001")
    with pytest.raises(UserError, match="train/ and val/ class folders differ"):
        prepare_imagenet(tmp_path / "tree", tmp_path / "linked", subset_classes=CLASSES[1:])


def test_bad_sources_and_destinations(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / VAL_ARCHIVE).write_bytes(b"")
    with pytest.raises(UserError, match=f"missing: {TRAIN_ARCHIVE}, {DEVKIT_ARCHIVE}"):
        prepare_imagenet(tmp_path / "src", tmp_path / "out")
    with pytest.raises(UserError, match="overlaps the source"):
        prepare_imagenet(tmp_path / "src", tmp_path / "src" / "out")
    with pytest.raises(UserError, match="ImageNet source not found"):
        prepare_imagenet(tmp_path / "nowhere", tmp_path / "out")


def test_stale_partial_from_killed_run_is_cleared(tmp_path):
    md5 = make_archives(tmp_path / "src")
    stale = tmp_path / ".out.tmp-999999999-1"  # the temp of a process that no longer runs
    (stale / "train").mkdir(parents=True)
    prepare_imagenet(tmp_path / "src", tmp_path / "out", expected_md5=md5)
    assert not stale.exists() and (tmp_path / "out" / SUMMARY_FILE).is_file()


def test_killed_run_leaves_nothing_that_looks_complete(tmp_path):
    """SIGKILL in the middle of unpacking (from the progress callback), then a clean rerun."""
    import os
    import signal
    import subprocess
    import sys

    md5 = make_archives(tmp_path / "src")
    script = (
        "import os, signal, sys, json\n"
        "from sge_repro.data.imagenet_archives import prepare_imagenet\n"
        "kill = lambda done, total: os.kill(os.getpid(), signal.SIGKILL)\n"
        "prepare_imagenet(sys.argv[1], sys.argv[2], progress=kill, expected_md5=json.loads(sys.argv[3]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "src"), str(tmp_path / "out"),
                             json.dumps(md5)], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert not (tmp_path / "out").exists()
    partials = _leftovers(tmp_path)
    assert len(partials) == 1 and partials[0].startswith(".out.")  # hidden, never at the destination
    counts = prepare_imagenet(tmp_path / "src", tmp_path / "out", expected_md5=md5)
    assert counts["val_images"] == len(VAL_LABELS) and _leftovers(tmp_path) == []
    assert os.path.isfile(tmp_path / "out" / SUMMARY_FILE)
