"""Prepare ImageNet (ILSVRC2012) as the ImageFolder tree that `sge_repro.data.imagefolder` loads.

The source is either an existing ImageFolder tree (validated; the destination becomes per-class
symlinks into it, so nothing is copied and a subset is fewer links) or the three official
archives (MD5-checked while they are unpacked: one read of the 150 GB instead of two; the val
images sorted into synset folders from the devkit's ground truth). Either way the tree is built in
a hidden temp folder beside `destination` and renamed into place at the end, so a killed run
leaves nothing that looks complete. Without a devkit there is no list of the 1000 synsets, so a
tree is accepted with exactly 1000 WordNet-id class folders (n########) agreeing between train/
and val/; with ILSVRC2012_devkit_t12.tar.gz in `source`, the class names are checked against it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from scipy.io import loadmat

from sge_repro import atomic
from sge_repro.data.download import file_digest
from sge_repro.data.imagefolder import SPLITS, check_layout, check_same_classes, list_classes
from sge_repro.errors import UserError, preview

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
ARCHIVES = (TRAIN_ARCHIVE, VAL_ARCHIVE, DEVKIT_ARCHIVE)

# Published MD5s of the official files (the same ones torchvision checks).
OFFICIAL_MD5 = {
    TRAIN_ARCHIVE: "1d675b47d978889d74fa0da5fadfb00e",
    VAL_ARCHIVE: "29b22e2961454d5413ddabcf34fc5622",
    DEVKIT_ARCHIVE: "fa75699e90414af021442c21a62c3abf",
}

NUM_CLASSES = 1000
OFFICIAL_COUNTS = {"train": 1_281_167, "val": 50_000}
SUMMARY_FILE = ".prepared.json"

_WNID = re.compile(r"n\d{8}")
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
_READ_SIZE = 1 << 20

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Devkit:
    """What the devkit says: the 1000 leaf synsets and the label of each val image."""

    wnid_by_id: dict[int, str]     # ILSVRC2012_ID (1..1000) -> WordNet id
    words_by_wnid: dict[str, str]  # WordNet id -> "tench, Tinca tinca"
    val_labels: list[int]          # val_labels[i] = ILSVRC2012_ID of ILSVRC2012_val_{i+1:08d}.JPEG

    @property
    def wnids(self) -> list[str]:
        return sorted(self.wnid_by_id.values())


def prepare_imagenet(source: str | os.PathLike, destination: str | os.PathLike,
                     subset_classes: Sequence[str] | None = None, progress: Progress | None = None,
                     expected_md5: Mapping[str, str] = OFFICIAL_MD5) -> dict:
    """Build the ImageFolder tree at `destination` from `source`; return its counts.

    Returns {"source_kind": "archives" | "imagefolder", "root", "classes", "train_images",
    "val_images", "official_counts"} where official_counts is True for the full 1,281,167 /
    50,000 set. The same dict is written to destination/.prepared.json.

    subset_classes: the WordNet ids to keep; every one must exist in the source, the others are
    left out. Without it the source must hold exactly the 1000 ILSVRC2012 classes.
    progress(done, total): bytes of the archives read, or class folders linked for a tree.
    expected_md5: file name -> MD5 (default: the published ones; tests pass their own).
    """
    source, destination = Path(source), Path(destination)
    if not source.is_dir():
        raise UserError(f"{source}: ImageNet source not found; expected a folder with train/ and val/ "
                        f"or with {', '.join(ARCHIVES)}")
    _refuse_overlap(source, destination)
    subset = _normalise_subset(subset_classes)
    if all((source / split).is_dir() for split in SPLITS):
        kind, build = "imagefolder", lambda tmp: _link_imagefolder(source, tmp, subset, progress)
    else:
        missing = [name for name in ARCHIVES if not (source / name).is_file()]
        if missing:
            raise UserError(f"{source}: neither an ImageFolder tree (train/, val/) nor the official archives "
                            f"(missing: {', '.join(missing)})")
        kind, build = "archives", lambda tmp: _unpack_archives(source, tmp, subset, progress, expected_md5)

    with atomic.publish_dir(destination) as tmp:
        counts = build(tmp)
        summary = {"source_kind": kind, "root": str(destination), **counts,
                   "official_counts": counts["classes"] == NUM_CLASSES
                   and all(counts[f"{split}_images"] == OFFICIAL_COUNTS[split] for split in SPLITS)}
        atomic.write_json(tmp / SUMMARY_FILE, summary)
        return summary


# ---------------------------------------------------------------- checks


def _refuse_overlap(source: Path, destination: Path) -> None:
    src, dst = source.resolve(), destination.resolve()
    if src == dst or dst in src.parents or src in dst.parents:
        raise UserError(f"{destination}: destination overlaps the source {source}; expected separate folders "
                        "(the destination is replaced as a whole)")


def _normalise_subset(subset_classes: Sequence[str] | None) -> list[str] | None:
    if subset_classes is None:
        return None
    if isinstance(subset_classes, str):
        raise UserError(f"subset_classes={subset_classes!r}: expected a list of WordNet ids, not one string")
    subset = [str(name) for name in subset_classes]
    if not subset:
        raise UserError("subset_classes: empty list; expected at least one WordNet id (or no subset)")
    duplicates = sorted(name for name, count in Counter(subset).items() if count > 1)
    if duplicates:
        raise UserError(f"subset_classes: duplicated {preview(duplicates)}; expected each class once")
    return sorted(subset)


def _check_classes(where: Path, found: Sequence[str], expected: Sequence[str] | None,
                   subset: list[str] | None) -> list[str]:
    """The classes to keep: the subset (all of it present), or exactly `expected`."""
    found_set = set(found)
    if subset is not None:
        missing = [name for name in subset if name not in found_set]
        if missing:
            raise UserError(f"{where}: subset classes not found: {preview(missing)}; "
                            f"expected every subset class in the source")
        return subset
    if expected is not None:
        missing = sorted(set(expected) - found_set)
        extra = sorted(found_set - set(expected))
    else:  # no devkit: all we know is 1000 WordNet-id folders
        extra = sorted(name for name in found_set if not _WNID.fullmatch(name))
        missing = [f"{NUM_CLASSES - (len(found_set) - len(extra))} class folder(s)"] \
            if len(found_set) - len(extra) < NUM_CLASSES else []
        if len(found_set) - len(extra) > NUM_CLASSES:
            extra.append(f"{len(found_set) - len(extra) - NUM_CLASSES} class folder(s) beyond {NUM_CLASSES}")
    if missing or extra:
        raise UserError(f"{where}: classes do not match the {NUM_CLASSES} ILSVRC2012 synsets (missing: "
                        f"{preview(missing)}; extra: {preview(extra)}); give subset_classes to prepare a subset")
    return sorted(found_set)


# ---------------------------------------------------------------- an existing ImageFolder tree


def imagenet_classes(source: str | os.PathLike, subset_classes: Sequence[str] | None = None) -> list[str]:
    """The classes to use of the ImageNet ImageFolder tree `source`: every subset class (all of
    them present), or the 1000 ILSVRC2012 synsets (compared with the devkit's meta.mat when
    ILSVRC2012_devkit_t12.tar.gz lies in `source`, else 1000 WordNet-id folders)."""
    source = Path(source)
    devkit = read_devkit(source / DEVKIT_ARCHIVE, None) if (source / DEVKIT_ARCHIVE).is_file() else None
    train, val = (list_classes(source / split) for split in SPLITS)
    check_same_classes(source, train, val)
    return _check_classes(source, train, devkit.wnids if devkit else None, _normalise_subset(subset_classes))


def _link_imagefolder(source: Path, tmp: Path, subset: list[str] | None, progress: Progress | None) -> dict:
    keep = imagenet_classes(source, subset)
    counts = {split: 0 for split in SPLITS}
    for done, name in enumerate(keep, start=1):
        for split in SPLITS:
            (tmp / split).mkdir(exist_ok=True)
            os.symlink((source / split / name).resolve(), tmp / split / name, target_is_directory=True)
            counts[split] += _count_files(source / split / name)
        if progress is not None:
            progress(done, len(keep))
    check_layout(tmp, keep)  # empty class folders and unreadable splits fail here, naming the folder
    return {"classes": len(keep), "train_images": counts["train"], "val_images": counts["val"]}


def _count_files(folder: Path) -> int:
    with os.scandir(folder) as entries:
        return sum(1 for entry in entries if entry.is_file() and not entry.name.startswith("."))


# ---------------------------------------------------------------- the official archives


def read_devkit(path: Path, expected_md5: str | None) -> Devkit:
    """Parse meta.mat and the val ground truth from the devkit archive (read in memory, 2.5 MB)."""
    if expected_md5 is not None:
        _compare_md5(path, expected_md5, file_digest(path, "md5"))
    try:
        with tarfile.open(path, "r:*") as tar:
            meta = _read_member(tar, path, "data/meta.mat")
            truth = _read_member(tar, path, "data/ILSVRC2012_validation_ground_truth.txt")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UserError(f"{path}: unreadable devkit archive ({error}); expected {DEVKIT_ARCHIVE}") from error
    wnid_by_id, words_by_wnid = _parse_meta(meta, path)
    try:
        val_labels = [int(line) for line in truth.decode("ascii").split()]
    except (UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path}: data/ILSVRC2012_validation_ground_truth.txt: expected one integer "
                        f"ILSVRC2012_ID per line ({error})") from error
    unknown = sorted({label for label in val_labels if label not in wnid_by_id})
    if unknown:
        raise UserError(f"{path}: validation ground truth uses ILSVRC2012_ID {preview([str(i) for i in unknown])} "
                        f"not among the leaf synsets of meta.mat")
    return Devkit(wnid_by_id=wnid_by_id, words_by_wnid=words_by_wnid, val_labels=val_labels)


def _read_member(tar: tarfile.TarFile, path: Path, suffix: str) -> bytes:
    # The official devkit nests everything under ILSVRC2012_devkit_t12/; match on the tail.
    for member in tar.getmembers():
        if member.isreg() and (member.name == suffix or member.name.endswith("/" + suffix)):
            handle = tar.extractfile(member)
            assert handle is not None
            return handle.read()
    raise UserError(f"{path}: no {suffix} inside; expected the ILSVRC2012 devkit layout")


def _parse_meta(data: bytes, path: Path) -> tuple[dict[int, str], dict[str, str]]:
    try:
        synsets = loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
    except (KeyError, ValueError, TypeError, OSError) as error:
        raise UserError(f"{path}: data/meta.mat: expected a MATLAB file with a 'synsets' struct array "
                        f"({error})") from error
    fields = synsets.dtype.names or ()
    for required in ("ILSVRC2012_ID", "WNID", "words", "num_children"):
        if required not in fields:
            raise UserError(f"{path}: data/meta.mat: synsets has no field {required!r}; "
                            f"expected the ILSVRC2012 devkit fields (found: {', '.join(fields) or 'none'})")
    wnid_by_id: dict[int, str] = {}
    words_by_wnid: dict[str, str] = {}
    for record in synsets.reshape(-1):
        if int(record["num_children"]) != 0:
            continue  # inner nodes of the WordNet hierarchy, not classes
        wnid = str(record["WNID"])
        wnid_by_id[int(record["ILSVRC2012_ID"])] = wnid
        words_by_wnid[wnid] = str(record["words"])
    if not wnid_by_id:
        raise UserError(f"{path}: data/meta.mat: no leaf synsets (num_children == 0); expected the class list")
    return wnid_by_id, words_by_wnid


class _HashingReader:
    """A read-only stream over a file that hashes what passes through and reports progress."""

    def __init__(self, handle, on_bytes: Callable[[int], None]):
        self._handle = handle
        self._on_bytes = on_bytes
        self.md5 = hashlib.md5()

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.md5.update(data)
        self._on_bytes(len(data))
        return data

    def drain(self) -> str:
        """Read (and hash) whatever the tar reader left, e.g. the end-of-archive padding."""
        while self.read(_READ_SIZE):
            pass
        return self.md5.hexdigest()


def _compare_md5(path: Path, expected: str, actual: str) -> None:
    if actual != expected.lower():
        raise UserError(f"{path}: MD5 mismatch (expected {expected.lower()}, got {actual}); "
                        "the file is corrupt or not the official archive, download it again")


def _unpack_archives(source: Path, tmp: Path, subset: list[str] | None, progress: Progress | None,
                     expected_md5: Mapping[str, str]) -> dict:
    for name in ARCHIVES:
        if name not in expected_md5:
            raise UserError(f"expected_md5: no entry for {name}; expected MD5s for {', '.join(ARCHIVES)}")
    devkit = read_devkit(source / DEVKIT_ARCHIVE, expected_md5[DEVKIT_ARCHIVE])
    keep = _check_classes(source / DEVKIT_ARCHIVE, devkit.wnids, None, subset) if subset else devkit.wnids
    keep_set = set(keep)
    for split in SPLITS:
        for wnid in keep:
            (tmp / split / wnid).mkdir(parents=True)

    total = sum((source / name).stat().st_size for name in (TRAIN_ARCHIVE, VAL_ARCHIVE))
    done = 0

    def on_bytes(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None and count:
            progress(done, total)

    val_count = _stream_archive(source / VAL_ARCHIVE, expected_md5[VAL_ARCHIVE], on_bytes,
                                lambda tar: _unpack_val(tar, source / VAL_ARCHIVE, tmp / "val", devkit, keep_set))
    train_count = _stream_archive(source / TRAIN_ARCHIVE, expected_md5[TRAIN_ARCHIVE], on_bytes,
                                  lambda tar: _unpack_train(tar, source / TRAIN_ARCHIVE, tmp / "train", keep_set,
                                                            strict=subset is None))
    check_layout(tmp, keep)
    return {"classes": len(keep), "train_images": train_count, "val_images": val_count}


def _stream_archive(path: Path, expected_md5: str, on_bytes: Callable[[int], None],
                    unpack: Callable[[tarfile.TarFile], int]) -> int:
    """Unpack a tar in one sequential pass while hashing it; a wrong MD5 wins over any other error.

    The tree is only a temp folder until every archive checked out, so unpacking before the
    hash is known never leaves a trusted result from a bad archive.
    """
    with open(path, "rb") as handle:
        reader = _HashingReader(handle, on_bytes)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                count = unpack(tar)
        except (UserError, tarfile.TarError, EOFError, OSError) as error:
            # A corrupt archive often breaks the tar reader first: report the checksum if that is why.
            _compare_md5(path, expected_md5, reader.drain())
            if isinstance(error, UserError):
                raise
            raise UserError(f"{path}: unreadable tar archive ({error}); expected {path.name}") from error
        _compare_md5(path, expected_md5, reader.drain())
    return count


def _checked_flat_name(member: tarfile.TarInfo, archive: Path, where: Path, context: str = "") -> str:
    """The member's file name, after refusing anything that is not a plain file inside `where`."""
    label = f"{archive}: member {context}{member.name!r}"
    try:
        tarfile.data_filter(member, str(where))  # absolute paths, '..', links out, device files
    except tarfile.FilterError as error:
        raise UserError(f"{label} refused ({error}); expected plain files inside the archive") from error
    if not member.isreg():
        raise UserError(f"{label} is not a regular file; expected only image files")
    name = os.path.normpath(member.name)
    if os.sep in name or name in (".", ".."):
        raise UserError(f"{label}: expected a flat archive of files without folders")
    return name


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, archive: Path) -> None:
    handle = tar.extractfile(member)
    assert handle is not None
    try:
        with open(target, "xb") as out:  # "x": a duplicated member name is an error, not an overwrite
            shutil.copyfileobj(handle, out, _READ_SIZE)
    except FileExistsError as error:
        raise UserError(f"{archive}: member {member.name!r} appears twice; expected unique file names") from error


def _unpack_val(tar: tarfile.TarFile, archive: Path, val_dir: Path, devkit: Devkit, keep: set[str]) -> int:
    written = 0
    seen: set[int] = set()
    for member, name in _flat_files(tar, archive, val_dir):
        match = _VAL_NAME.fullmatch(name)
        if match is None:
            raise UserError(f"{archive}: member {name!r}: expected ILSVRC2012_val_########.JPEG")
        number = int(match.group(1))
        if not 1 <= number <= len(devkit.val_labels):
            raise UserError(f"{archive}: member {name!r}: no ground-truth label (the devkit lists "
                            f"{len(devkit.val_labels)} val images)")
        seen.add(number)
        wnid = devkit.wnid_by_id[devkit.val_labels[number - 1]]
        if wnid in keep:
            _write_member(tar, member, val_dir / wnid / name, archive)
            written += 1
    missing = [f"ILSVRC2012_val_{number:08d}.JPEG" for number in range(1, len(devkit.val_labels) + 1)
               if number not in seen and devkit.wnid_by_id[devkit.val_labels[number - 1]] in keep]
    if missing:
        raise UserError(f"{archive}: {len(missing)} val image(s) of the ground truth missing "
                        f"({preview(missing)}); expected all of them")
    return written


def _flat_files(tar: tarfile.TarFile, archive: Path, where: Path, context: str = ""):
    """(member, checked file name) for each file of a flat archive; folder entries other than
    "./" are refused."""
    for member in tar:
        if member.isdir():
            if os.path.normpath(member.name) != ".":  # "./" at most: a folder entry that points nowhere
                raise UserError(f"{archive}: member {member.name!r} is a folder; expected a flat archive of files")
            continue
        yield member, _checked_flat_name(member, archive, where, context=context)


def _unpack_train(tar: tarfile.TarFile, archive: Path, train_dir: Path, keep: set[str], strict: bool) -> int:
    written = 0
    found: set[str] = set()
    for member, name in _flat_files(tar, archive, train_dir):
        wnid, extension = os.path.splitext(name)
        if extension != ".tar" or not _WNID.fullmatch(wnid):
            raise UserError(f"{archive}: member {name!r}: expected one n########.tar per class")
        if wnid not in keep:
            if strict:
                raise UserError(f"{archive}: class {wnid} is not among the devkit's {NUM_CLASSES} synsets; "
                                "give subset_classes to prepare a subset")
            continue
        found.add(wnid)
        class_stream = tar.extractfile(member)
        assert class_stream is not None
        with tarfile.open(fileobj=class_stream, mode="r|") as class_tar:
            for image, image_name in _flat_files(class_tar, archive, train_dir / wnid, context=f"{name}/"):
                _write_member(class_tar, image, train_dir / wnid / image_name, archive)
                written += 1
    missing = sorted(keep - found)
    if missing:
        raise UserError(f"{archive}: classes missing: {preview(missing)}; expected one n########.tar for "
                        "each class" + ("" if strict else " of the subset"))
    return written
