"""A dataset manifest: the small file the pipeline depends on instead of an image tree.

The data stage writes one per dataset (data/manifests/cls.json, data/manifests/det.json); DVC
tracks these files, and every training / evaluation stage depends on the manifest of its dataset,
never on the image tree. Loaders build their file lists from it (no directory walk, no
verification: the data stage checked every file once).

    {
      "format": 1,
      "dataset": "cls" | "det",
      "kind": "classification" | "detection",
      "source": "synthetic" | "imagenet" | "coco",
      "layout": "imagefolder" | "coco2017" | "embedded",
      "root": the dataset root; relative paths are relative to the manifest's folder,
      "classes": [class folder names, sorted; the label of a file is the index of its folder],  (classification)
      "annotations": {"train": {"file", "size", "sha256", "images", "annotations", "categories"},
                      "val": {...}},                                                            (detection)
      "counts": {"train": images indexed, "val": ..., "files", "bytes", "corrupt"},
      "subset": {"train": k, "val": ...}  (only a split cut by data.classification.max_*_images:
                every reader takes the k evenly spaced images `evenly_spaced` picks from it),
      "fingerprint": "sha256:..." over every indexed file's (path, size, content digest), the
                     class list and the annotation files' hashes,
      "corrupt": [{"file": path relative to root, "error": reason}]  (left out of the index),
      "folders": {"train/n01440764": [["n01440764_10026.JPEG", 13697], ...], ...}
    }

The bytes are a pure function of that content (fixed key order, one line per folder), so a rerun
over an unchanged dataset writes the same bytes and DVC sees nothing new. The root is part of the
content: moving a dataset makes its stages rerun. A subset is recorded beside the full index, not
in its place (folders, counts, corrupt and the fingerprint describe every verified file), so the
file changes, and the stages below rerun, exactly when the subset changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from sge_repro import atomic
from sge_repro.data.download import file_digest
from sge_repro.errors import UserError

FORMAT = 1
SPLITS = ("train", "val")


def fingerprint(files: Iterable[tuple[str, int, str]], classes: list[str] | None = None,
                annotations: dict | None = None) -> str:
    """sha256 over (relative path, size, content digest) of every file, in order, plus the class
    list and the annotation files' hashes (labels): equal content, equal fingerprint."""
    digest = hashlib.sha256()
    for name in classes or ():
        digest.update(f"class\t{name}\n".encode())
    for split, record in sorted((annotations or {}).items()):
        digest.update(f"annotations\t{split}\t{record['file']}\t{record['sha256']}\n".encode())
    for rel, size, content in files:
        digest.update(f"{rel}\t{size}\t{content}\n".encode())
    return "sha256:" + digest.hexdigest()


def serialize(manifest: dict) -> str:
    """Deterministic text: top-level keys in the order given, one line per folder."""
    lines = []
    for key, value in manifest.items():
        if key == "folders":
            rows = [f"    {json.dumps(folder)}: {json.dumps(files, separators=(',', ':'))}"
                    for folder, files in value.items()]
            body = "{\n" + ",\n".join(rows) + "\n  }" if rows else "{}"
            lines.append(f"  {json.dumps(key)}: {body}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True, allow_nan=False)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_manifest(path: str | os.PathLike, manifest: dict) -> bool:
    """Write atomically unless the file already holds these bytes; returns whether it wrote."""
    path, text = Path(path), serialize(manifest)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    atomic.write_text(path, text)
    return True


def read_manifest(path: str | os.PathLike, kind: str | None = None) -> dict:
    """A manifest written by the data stage; UserError naming the file if missing or malformed."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run the data stage first (`sge-repro run data`)") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable dataset manifest ({' '.join(str(error).split())}); "
                        "rerun the data stage (`sge-repro run data`)") from error
    required = ("format", "kind", "root", "counts", "fingerprint", "corrupt", "folders")
    missing = [key for key in required if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise UserError(f"{path}: not a dataset manifest (lacks {', '.join(missing)}); "
                        "rerun the data stage (`sge-repro run data`)")
    if manifest["format"] != FORMAT:
        raise UserError(f"{path}: manifest format {manifest['format']!r}, expected {FORMAT}; "
                        "rerun the data stage (`sge-repro run data`)")
    if kind is not None and manifest["kind"] != kind:
        raise UserError(f"{path}: a {manifest['kind']} manifest, expected a {kind} one")
    manifest["_path"] = str(path)
    return manifest


def is_manifest(path: str | os.PathLike) -> bool:
    """A dataset argument naming a manifest file (rather than a dataset folder)."""
    return Path(path).suffix == ".json" and not Path(path).is_dir()


def manifest_root(manifest: dict) -> Path:
    """The dataset root, absolute: a relative root is relative to the manifest's folder."""
    root = Path(manifest["root"])
    if root.is_absolute():
        return root
    return (Path(manifest["_path"]).parent / root).resolve()


def relative_root(root: Path, manifest_dir: Path) -> str:
    """How a manifest in `manifest_dir` (data/manifests/) names `root`: relative when it lies under
    data/ (generated sets: the project can be copied or moved), absolute otherwise."""
    root, manifest_dir = Path(os.path.abspath(root)), Path(os.path.abspath(manifest_dir))
    try:
        root.relative_to(manifest_dir.parent)
    except ValueError:
        return str(root)
    return os.path.relpath(root, manifest_dir)


def imagefolder_samples(manifest: dict, split: str) -> tuple[Path, list[str], list[tuple[Path, int]], list[Path]]:
    """(root, classes, [(image path, class index)], [corrupt files left out]) of one split of a
    classification manifest, in the order of a sorted ImageFolder walk (only the manifest's subset of
    it, when it records one; the classes are always all of them)."""
    if split not in SPLITS:
        raise UserError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    if manifest["kind"] != "classification":
        raise UserError(f"{manifest['_path']}: a {manifest['kind']} manifest, expected a classification one")
    root = manifest_root(manifest)
    classes = list(manifest["classes"])
    label = {name: index for index, name in enumerate(classes)}
    samples: list[tuple[Path, int]] = []
    for folder, files in manifest["folders"].items():
        folder_split, _, name = folder.partition("/")
        if folder_split != split:
            continue
        directory = root / folder
        samples += [(directory / file_name, label[name]) for file_name, _ in files]
    corrupt = [root / item["file"] for item in manifest["corrupt"] if item["file"].startswith(split + "/")]
    if not samples:
        raise UserError(f"{manifest['_path']}: no {split} images indexed; expected at least one")
    subset = split_subset(manifest, split)
    if subset is not None:
        samples = evenly_spaced(samples, subset)
    return root, classes, samples, corrupt


def split_subset(manifest: dict, split: str) -> int | None:
    """How many images of `split` every reader takes (the manifest's "subset"); None: all of them."""
    subset = manifest.get("subset", {}).get(split)
    if subset is not None and (type(subset) is not int or subset < 1):
        raise UserError(f"{manifest['_path']}: subset.{split}={subset!r}; expected a positive image count "
                        "(rerun the data stage: `sge-repro run data`)")
    return subset


def evenly_spaced(items: list, k: int) -> list:
    """k items spread evenly over `items` (indices floor(i * n / k)), all of them when k >= n: over a
    list sorted by class, every class keeps its share, and the pick is the same on every reader."""
    n = len(items)
    return list(items) if k >= n else [items[i * n // k] for i in range(k)]


def check_annotation_files(manifest: dict) -> None:
    """UserError unless each annotation file of a detection manifest still has the recorded
    size and sha256 (labels must not change behind the data stage's back)."""
    root = manifest_root(manifest)
    for split, record in sorted(manifest.get("annotations", {}).items()):
        path = root / record["file"]
        try:
            size = path.stat().st_size
            same = size == record["size"] and file_digest(path, "sha256") == record["sha256"]
        except FileNotFoundError:
            same = False
        if not same:
            raise UserError(f"{path}: changed or missing since the data stage indexed it ({manifest['_path']}); "
                            "rerun the data stage (`sge-repro run data`)")

