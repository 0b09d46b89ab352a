"""The `data` stage: index both datasets into manifests (data/manifests/{cls,det}.json).

The image trees live outside DVC. Generated sets (source: synthetic) are written to data/cls and
data/det, and regenerated only when the `data` params they come from change. Real sets are read
in place: an ImageNet ImageFolder tree at data.classification.source_path (make one from the
official archives once with `sge-repro data prepare imagenet --source ARCHIVES --destination DIR`)
and a COCO 2017 root at data.detection.source_path (`sge-repro data fetch coco --root DIR`).

Each run rescans the trees (sizes and mtimes, no reads), decodes only the files that are new or
changed since the last check (`sge_repro.data.verify`, all cores), and rewrites a manifest only
when its content changed. Each image's width / height in a COCO file is compared with the size
that same decode found (as detectron2 reads the file, EXIF orientation applied), so a wrong size
fails here, naming the image, not as detectron2's SizeMismatchError in train_det. DVC runs this
stage every time (`always_changed` in dvc.yaml); the stages after it rerun only when the manifest
of their dataset changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sge_repro import atomic
from sge_repro.data import manifest as fmt
from sge_repro.data.coco_json import coco_annotation_record, coco_split_paths
from sge_repro.data.imagefolder import IMAGE_EXTENSIONS, SPLITS, check_same_classes, list_classes
from sge_repro.data.imagenet_archives import TRAIN_ARCHIVE, imagenet_classes
from sge_repro.data.synthetic import GENERATOR_VERSION, MANIFEST_NAME, generate_classification_set, generate_detection_set
from sge_repro.data.verify import FolderResult, VerifyCache, available_cpus, listing_digest, lookup, scan, verify
from sge_repro.errors import UserError, preview
from sge_repro.paths import ProjectPaths

Progress = Callable[[str, int, int | None], None]
CORRUPT_SHOWN = 3   # corrupt files named in the stage's error message
# What a detection index was checked for; part of its listing key, so an index an older version
# wrote (before image sizes were compared with the annotations) is checked again, once.
DETECTION_CHECKS = "image-sizes"


@dataclass
class Source:
    """Where one dataset's files are and which of them belong to it."""

    name: str                      # "cls" or "det": the manifest's and the cache's name
    kind: str                      # classification | detection
    source: str                    # synthetic | imagenet | coco
    layout: str                    # imagefolder | embedded | coco2017
    root: Path
    folders: dict[str, set[str] | None]   # folder relative to root -> its files (None: every image)
    classes: list[str] | None = None
    annotations: dict[str, dict] = field(default_factory=dict)
    # detection: folder -> file name -> [(annotation file, image id, file_name, width, height)]
    image_sizes: dict[str, dict[str, list[tuple]]] = field(default_factory=dict)
    # split -> at most this many images read from it (data.classification.max_*_images)
    max_images: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ the stage


def prepare_data(data, paths: ProjectPaths, progress: Progress | None = None,
                 workers: int | None = None) -> dict[str, Any]:
    """Generate / locate both datasets, verify new and changed files, write their manifests.

    Corrupt files fail the stage with a UserError naming the first few (nothing is written),
    unless data.skip_corrupt: then they are left out of the index and listed in the manifest.
    Returns {"classification": summary, "detection": summary} (counts, files decoded, written).
    """
    sources = [_classification_source(data, paths, progress), _detection_source(data, paths, progress)]
    return write_manifests(sources, paths, data.skip_corrupt, progress, workers)


def write_manifests(sources: list[Source], paths: ProjectPaths, skip_corrupt: bool = False,
                    progress: Progress | None = None, workers: int | None = None) -> dict[str, Any]:
    """Scan and verify each source, then write their manifests (all or none: a corrupt file in
    any of them, without skip_corrupt, fails before anything is written)."""
    workers = workers or available_cpus()
    manifests, summary = [], {}
    for source in sources:
        scans = scan(source.root, source.folders, IMAGE_EXTENSIONS, progress, f"scan {source.name}", workers)
        _require_files(source, scans)
        key = _listing_key(source, scans)
        state = _unchanged_state(paths, source.name, key)
        if state is not None and (skip_corrupt or not state["counts"]["corrupt"]):
            # the same listing as when this manifest was written, and the manifest untouched since
            summary[source.kind] = _summary(source, state["counts"], 0, "unchanged")
            continue
        cache = verify_cache(paths, source.name, source.root)
        results, decoded = verify(source.root, scans, cache, workers, progress, f"verify {source.name}",
                                  need_sizes=source.kind == "detection")
        check_image_sizes(source, results)
        manifests.append((source, build_manifest(source, results, paths), decoded, key))
    corrupt = [f"{source.root / item['file']} ({item['error']})"
               for source, manifest, _, _ in manifests for item in manifest["corrupt"]]
    if corrupt and not skip_corrupt:
        raise UserError(f"{len(corrupt)} corrupt image(s): {preview(corrupt, CORRUPT_SHOWN)}; expected decodable "
                        "images (replace them, or set data.skip_corrupt: true to leave them out)")
    for source, manifest, decoded, key in manifests:
        written = fmt.write_manifest(paths.manifest(source.name), manifest)
        _save_state(paths, source.name, key, manifest["counts"])
        summary[source.kind] = _summary(source, manifest["counts"], decoded, "written" if written else "unchanged")
    return {kind: summary[kind] for kind in ("classification", "detection") if kind in summary}


def check_image_sizes(source: Source, results: dict[str, FolderResult]) -> None:
    """UserError unless every image's width / height in its annotation file is the size its file
    decoded to (as detectron2 reads it); names the first mismatch and counts the others. Corrupt
    files are left to the corrupt-file report."""
    mismatches = []
    for rel in sorted(source.image_sizes):
        result = results.get(rel)
        if result is None:
            continue
        found = dict(zip(result.names, result.dims))
        for name, listed in sorted(source.image_sizes[rel].items()):
            dims = found.get(name)
            if dims is None or name in result.errors:
                continue
            for json_path, image_id, file_name, width, height in listed:
                if (dims[0], dims[1]) != (width, height):
                    mismatches.append((json_path, image_id, file_name, width, height, source.root / rel / name, dims))
    if mismatches:
        json_path, image_id, file_name, width, height, path, (real_width, real_height) = mismatches[0]
        more = f" (and {len(mismatches) - 1} more image(s))" if len(mismatches) > 1 else ""
        raise UserError(f"{json_path}: image id {image_id} ({file_name}) has width x height {width}x{height}, "
                        f"but {path} is {real_width}x{real_height} as detectron2 reads it (EXIF orientation "
                        f"applied){more}; expected each image's width and height to be its file's")


def _summary(source: Source, counts: dict, decoded: int, manifest: str) -> dict:
    return {"source": source.source, "root": str(source.root), **counts, "decoded": decoded, "manifest": manifest}


# The no-op fast path: after writing a manifest, the stage records the listing it came from (every
# file's name, size, mtime_ns, plus root / classes / annotation hashes) and the manifest's stat. A
# later run with the same listing and an untouched manifest skips loading the verification cache
# and rebuilding the manifest (seconds at ImageNet scale).


def _listing_key(source: Source, scans) -> str:
    checks = (DETECTION_CHECKS,) if source.kind == "detection" else ()
    # only when set: the key of a manifest without a subset stays what it was
    checks += (json.dumps(source.max_images, sort_keys=True),) if source.max_images else ()
    return listing_digest(scans, str(fmt.FORMAT), source.name, source.kind, source.source, source.layout,
                          str(source.root), json.dumps(source.classes), json.dumps(source.annotations, sort_keys=True),
                          *checks)


def _stamp(path: Path) -> list[int] | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ino]


def verify_cache(paths: ProjectPaths, name: str, root: Path) -> VerifyCache:
    """The verification cache of dataset `name` at `root` (where: ProjectPaths.verify_cache). A set
    read in place that an older version verified starts from the project's data/.cache file."""
    return VerifyCache(paths.verify_cache(name, root), root, fallback=paths.verify_cache(name))


def _unchanged_state(paths: ProjectPaths, name: str, key: str) -> dict | None:
    try:
        state = json.loads(paths.index_state(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    stamp = _stamp(paths.manifest(name))
    if isinstance(state, dict) and state.get("key") == key and stamp is not None and state.get("manifest") == stamp:
        return state
    return None


def _save_state(paths: ProjectPaths, name: str, key: str, counts: dict) -> None:
    atomic.write_json(paths.index_state(name), {"key": key, "manifest": _stamp(paths.manifest(name)),
                                                 "counts": counts})


def pending_changes(data, paths: ProjectPaths) -> dict[str, str | None]:
    """What the data stage would do now, without writing or decoding anything (for `status`):
    {dataset: None if its manifest would stay as it is, else a short reason}."""
    changes: dict[str, str | None] = {}
    for name, locate in (("cls", _classification_source), ("det", _detection_source)):
        try:
            source = locate(data, paths, None, generate=False)
        except _NeedsGeneration as reason:
            changes[name] = str(reason)
            continue
        scans = scan(source.root, source.folders, IMAGE_EXTENSIONS)
        missing = _missing_files(source, scans)
        if missing:
            changes[name] = f"listed files missing: {preview(missing)}"
            continue
        state = _unchanged_state(paths, name, _listing_key(source, scans))
        if state is not None and (data.skip_corrupt or not state["counts"]["corrupt"]):
            changes[name] = None
            continue
        results, todo = lookup(scans, verify_cache(paths, name, source.root), need_sizes=source.kind == "detection")
        if todo:
            changes[name] = f"{len(todo)} new or changed file(s) to verify"
            continue
        manifest = build_manifest(source, results, paths)
        try:
            current = paths.manifest(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        changes[name] = None if current == fmt.serialize(manifest) else "manifest content changed"
    return changes


def build_manifest(source: Source, results: dict[str, FolderResult], paths: ProjectPaths) -> dict:
    """The manifest of `source` from verified folders (corrupt files listed, not indexed)."""
    folders: dict[str, list] = {}
    corrupt: list[dict] = []
    indexed: list[tuple[str, int, str]] = []
    counts = {split: 0 for split in SPLITS}
    total_bytes = 0
    for rel in sorted(results):
        result = results[rel]
        files = []
        for name, size, digest in zip(result.names, result.sizes, result.digests):
            if name in result.errors:
                corrupt.append({"file": f"{rel}/{name}", "error": result.errors[name]})
                continue
            files.append([name, size])
            indexed.append((f"{rel}/{name}", size, digest))
            total_bytes += size
        folders[rel] = files
        counts[_split_of(source, rel)] += len(files)
    # recorded only for a split it cuts: a max at or above the split's size is no subset
    subset = {split: limit for split, limit in sorted(source.max_images.items()) if limit < counts[split]}
    manifest: dict[str, Any] = {
        "format": fmt.FORMAT,
        "dataset": source.name,
        "kind": source.kind,
        "source": source.source,
        "layout": source.layout,
        "root": fmt.relative_root(source.root, paths.manifests),
    }
    if source.classes is not None:
        manifest["classes"] = source.classes
    if source.annotations:
        manifest["annotations"] = source.annotations
    manifest.update({
        "counts": {**counts, "files": len(indexed), "bytes": total_bytes, "corrupt": len(corrupt)},
        **({"subset": subset} if subset else {}),
        "fingerprint": fmt.fingerprint(indexed, source.classes, source.annotations),
        "corrupt": corrupt,
        "folders": folders,
    })
    return manifest


def _split_of(source: Source, rel: str) -> str:
    top = rel.split("/", 1)[0]
    return top[:-4] if source.layout == "coco2017" else top   # train2017 -> train


def _missing_files(source: Source, scans) -> list[str]:
    missing = []
    for rel, wanted in source.folders.items():
        if wanted is not None and len(scans[rel].names) != len(wanted):
            missing += sorted(f"{rel}/{name}" for name in wanted - set(scans[rel].names))
    return missing


def _require_files(source: Source, scans) -> None:
    missing = _missing_files(source, scans)
    if missing:
        raise UserError(f"{source.root}: {len(missing)} image(s) listed in the annotations are missing "
                        f"({preview(missing)}); expected every listed image file")
    if source.kind == "classification":
        empty = [rel for rel, found in scans.items() if not found.names]
        if empty:
            raise UserError(f"{source.root / empty[0]}: empty class folder; expected at least one image "
                            f"({', '.join(IMAGE_EXTENSIONS)})")


# ------------------------------------------------------------------------------ classification


class _NeedsGeneration(Exception):
    """A generated set is missing or was made from other params (pending_changes)."""


def _required_path(value: str | None, key: str) -> Path:
    if not value:
        raise UserError(f"params.yaml: {key}: required for this source (a path on this machine)")
    path = Path(value).expanduser()
    if not path.exists():
        raise UserError(f"params.yaml: {key}: {path} does not exist")
    return path


def _classification_source(data, paths: ProjectPaths, progress: Progress | None, generate: bool = True) -> Source:
    cls = data.classification
    if cls.source == "synthetic":
        root = paths.cls_data
        _ensure_generated(root, _cls_spec(data), generate, lambda: _generate_cls(data, root, progress))
        return _imagefolder_source("cls", "synthetic", root, _classes_of(root, None), _max_images(cls))

    root = _required_path(cls.source_path, "data.classification.source_path")
    if (root / TRAIN_ARCHIVE).is_file() and not (root / "train").is_dir():
        raise UserError(f"params.yaml: data.classification.source_path: {root} holds the ImageNet archives; "
                        f"unpack them once with `sge-repro data prepare imagenet --source {root} --destination DIR` "
                        "and set source_path to DIR")
    _classes_of(root, None)  # layout errors first: train/ and val/ with the same class folders
    return _imagefolder_source("cls", "imagenet", root, imagenet_classes(root, cls.subset_classes), _max_images(cls))


def _classes_of(root: Path, subset) -> list[str]:
    for split in SPLITS:
        if not (root / split).is_dir():
            raise UserError(f"{root / split}: missing; expected an ImageFolder tree {split}/<class>/<image> under {root}")
    train, val = (list_classes(root / split) for split in SPLITS)
    check_same_classes(root, train, val)
    if not train:
        raise UserError(f"{root / 'train'}: no class folders; expected train/<class>/<image>")
    return train


def _imagefolder_source(name: str, source: str, root: Path, classes: list[str],
                        max_images: dict[str, int] | None = None) -> Source:
    folders = {f"{split}/{cls}": None for split in SPLITS for cls in classes}
    return Source(name, "classification", source, "imagefolder", root, folders, classes=classes,
                  max_images=max_images or {})


def _max_images(cls) -> dict[str, int]:
    limits = {"train": cls.max_train_images, "val": cls.max_val_images}
    return {split: limit for split, limit in limits.items() if limit is not None}


def _cls_spec(data) -> dict:
    cls = data.classification
    return {"kind": "classification", "generator_version": GENERATOR_VERSION, "seed": data.seed,
            "image_size": cls.image_size, "num_classes": cls.num_classes,
            "counts": {"train": cls.train_per_class * cls.num_classes, "val": cls.val_per_class * cls.num_classes}}


def _generate_cls(data, root: Path, progress: Progress | None) -> None:
    cls = data.classification
    generate_classification_set(
        root, num_classes=cls.num_classes, image_size=cls.image_size, train_per_class=cls.train_per_class,
        val_per_class=cls.val_per_class, seed=data.seed,
        progress=(lambda split, done, total: progress(f"generate cls {split}", done, total)) if progress else None)


def _ensure_generated(root: Path, spec: dict, generate: bool, make: Callable[[], None]) -> None:
    """Generate the set at `root` unless its generator manifest already records `spec`."""
    try:
        recorded = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, dict) and all(_recorded(recorded.get(key), value) for key, value in spec.items()):
        return
    if not generate:
        raise _NeedsGeneration("generated set missing" if recorded is None else "generated set to remake (params changed)")
    make()


def _recorded(recorded, expected) -> bool:
    """`expected` equals what the generator recorded (a dict: the items it names; it records more)."""
    if isinstance(expected, dict):
        return isinstance(recorded, dict) and all(recorded.get(key) == value for key, value in expected.items())
    return recorded == expected


# ----------------------------------------------------------------------------------- detection


def _det_spec(data) -> dict:
    det = data.detection
    return {"kind": "detection", "generator_version": GENERATOR_VERSION, "seed": data.seed + 1,
            "image_size": det.image_size, "num_categories": det.num_categories,
            "counts": {"train_images": det.num_train, "val_images": det.num_val}}


def _detection_source(data, paths: ProjectPaths, progress: Progress | None, generate: bool = True) -> Source:
    det = data.detection
    if det.source == "synthetic":
        root = paths.det_data
        _ensure_generated(root, _det_spec(data), generate, lambda: _generate_det(data, root, progress))
        return coco_source(paths, "synthetic", root, "embedded")
    root = _required_path(det.source_path, "data.detection.source_path")
    return coco_source(paths, "coco", root, "coco2017")


def _generate_det(data, root: Path, progress: Progress | None) -> None:
    det = data.detection
    generate_detection_set(
        root, num_train=det.num_train, num_val=det.num_val, image_size=det.image_size,
        num_categories=det.num_categories, seed=data.seed + 1,
        progress=(lambda split, done, total: progress(f"generate det {split}", done, total)) if progress else None)


def coco_source(paths: ProjectPaths, source: str, root: Path, layout: str) -> Source:
    """A COCO-format set (layout coco2017 or embedded): the images its annotation files list (each
    JSON validated once per content, then cached) and their sizes there."""
    cache = verify_cache(paths, "det", root)
    folders: dict[str, set[str] | None] = {}
    annotations = {}
    image_sizes: dict[str, dict[str, list[tuple]]] = {}
    changed = False
    for split in SPLITS:
        json_path, image_dir = coco_split_paths(root, split, layout)
        if not json_path.is_file():
            raise UserError(f"{json_path}: missing (expected the COCO 2017 layout under {root}; "
                            "`sge-repro data fetch coco --root DIR` makes it)")
        rel_json = json_path.relative_to(root).as_posix()
        info = json_path.stat()
        record = cache.extra.get(rel_json)
        if not record or record["size"] != info.st_size or record["mtime_ns"] != info.st_mtime_ns \
                or "images" not in record:   # cached by a version that did not record the sizes
            record = coco_annotation_record(json_path, image_dir, info)
            cache.extra[rel_json] = record
            changed = True
        annotations[split] = {"file": rel_json, "size": record["size"], "sha256": record["sha256"],
                              **record["counts"]}
        image_rel = image_dir.relative_to(root).as_posix()
        for file_name in record["files"]:
            parent, _, name = f"{image_rel}/{file_name}".rpartition("/")
            folders.setdefault(parent, set()).add(name)
        for file_name, image_id, width, height in record["images"]:
            parent, _, name = f"{image_rel}/{file_name}".rpartition("/")
            image_sizes.setdefault(parent, {}).setdefault(name, []).append(
                (json_path, image_id, file_name, width, height))
    if changed:
        cache.save()
    return Source("det", "detection", source, layout, root, folders, annotations=annotations,
                  image_sizes=image_sizes)
