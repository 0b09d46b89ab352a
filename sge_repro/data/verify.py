"""Which image files of a dataset are new or changed since the last check, and decoding only those.

`verify` decodes only the files its `VerifyCache` (keyed by path, size, mtime_ns) does not vouch
for, each read once: its bytes are hashed (BLAKE2b-128, the content digest the manifest's
fingerprint is built from) and decoded with the loader's own decoder, so a file that passes here
loads in training. The same pass records each image's size as detectron2 reads it (EXIF
orientation applied), which the data stage compares with a COCO file's width / height.

The cache lives outside DVC's outputs (`ProjectPaths.verify_cache`): it is only an accelerator.
Deleting it costs one full verification; a stale entry cannot be trusted by mistake because any
rewrite of a file changes its size or mtime_ns. It is saved every `SAVE_EVERY_S` seconds during a
long verification, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import signal
import stat
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from PIL import Image

from sge_repro import atomic
from sge_repro.data.imagefolder import decode_rgb
from sge_repro.errors import UserError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
SAVE_EVERY_S = 60.0
IN_PROCESS_BELOW = 64   # fewer files than this are decoded in this process (no pool start-up)
SCAN_IN_PROCESS_BELOW = 16   # fewer folders than this are scanned in this process

Progress = Callable[[str, int, int | None], None]
Dims = list[int] | None   # [width, height] as detectron2 reads the file; None: unknown or corrupt
EXIF_ORIENTATION = 0x0112
QUARTER_TURNS = (5, 6, 7, 8)   # EXIF orientations detectron2's read_image transposes (width <-> height)


def available_cpus() -> int:
    """The cores this process may run on (cgroup / taskset aware), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class FolderScan:
    """The files of one folder (relative to the dataset root), sorted by name."""

    names: list[str]
    sizes: list[int]
    mtimes: list[int]


def scan_folder(folder: Path, wanted: set[str] | None, extensions: tuple[str, ...]) -> FolderScan:
    """Regular files in `folder`: those named in `wanted`, or (wanted=None) every visible file
    with one of `extensions`. Symlinks are followed (a linked tree scans like a real one)."""
    rows = []
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        # a folder an annotation file names that is not there: its files are missing (the
        # caller names them), not a traceback
        return FolderScan([], [], [])
    try:
        for name in os.listdir(descriptor):
            if wanted is None:
                if name[0] == "." or not name.lower().endswith(extensions):
                    continue
            elif name not in wanted:
                continue
            try:
                # the one syscall per file (1.33M for ImageNet); relative to the open folder, which
                # spares the kernel the path walk (a fifth faster than os.scandir + entry.stat here)
                info = os.stat(name, dir_fd=descriptor)
            except FileNotFoundError:   # removed since the listing: absent
                continue
            if stat.S_ISREG(info.st_mode):
                rows.append((name, info.st_size, info.st_mtime_ns))
    finally:
        os.close(descriptor)
    rows.sort()
    return FolderScan([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def _scan_job(job: tuple[Path, set[str] | None, tuple[str, ...]]) -> FolderScan:
    return scan_folder(*job)


def scan(root: Path, folders: dict[str, set[str] | None], extensions: tuple[str, ...],
         progress: Progress | None = None, label: str = "scan", workers: int | None = None) -> dict[str, FolderScan]:
    """`scan_folder` of every folder (relative to root), in sorted order. Many folders (ImageNet's
    1,000 classes) are scanned in `workers` processes (default: every core this process may use):
    the per-file Python work holds the GIL, so threads gained nothing over one thread."""
    names = sorted(folders)
    jobs = [(root / rel, folders[rel], extensions) for rel in names]
    workers = max(1, min(workers or available_cpus(), len(jobs)))
    result = {}
    found = _run_all(_scan_job, jobs, workers, in_process=len(jobs) < SCAN_IN_PROCESS_BELOW, ordered=True,
                     chunksize=max(1, min(16, len(jobs) // (workers * 8))))
    for done, (rel, folder_scan) in enumerate(zip(names, found), start=1):
        result[rel] = folder_scan
        if progress is not None and (done % 50 == 0 or done == len(names)):
            progress(label, done, len(names))
    return result


def listing_digest(scans: dict[str, FolderScan], *context: str) -> str:
    """sha256 of every folder's (names, sizes, mtimes) and `context`: equal digests, same listing."""
    digest = hashlib.sha256()
    for item in context:
        digest.update(item.encode() + b"\0")
    for rel in sorted(scans):
        found = scans[rel]
        digest.update(rel.encode() + b"\0" + "\0".join(found.names).encode() + b"\0")
        digest.update(array("q", found.sizes).tobytes() + array("q", found.mtimes).tobytes())
    return digest.hexdigest()


@dataclass
class FolderResult:
    """A scanned folder with each file's content digest and, for corrupt files, the reason."""

    names: list[str]
    sizes: list[int]
    mtimes: list[int]
    digests: list[str | None]          # None: not verified yet (a dry run)
    errors: dict[str, str] = field(default_factory=dict)
    dims: list[Dims] = field(default_factory=list)   # [width, height] per file (as detectron2 reads it)

    def __post_init__(self):
        if len(self.dims) != len(self.names):
            self.dims = [None] * len(self.names)

    def as_cache(self) -> dict:
        return {"names": self.names, "sizes": self.sizes, "mtimes": self.mtimes,
                "digests": self.digests, "errors": self.errors, "dims": self.dims}


class VerifyCache:
    """Per-folder results of earlier verifications of the dataset at `root` (JSON on disk).

    A cache written for another root, in another format, or unreadable is ignored (and replaced
    on the next save): it only ever saves work. `fallback`: a file read when `path` holds nothing
    for `root` (where an older version kept the cache); saves go to `path`.
    """

    def __init__(self, path: Path, root: Path, fallback: Path | None = None):
        self.path = Path(path)
        self.root = str(root)
        self.folders: dict[str, dict] = {}
        self.extra: dict[str, dict] = {}   # e.g. validated COCO JSON files, keyed by relative path
        self.from_fallback = False         # read from `fallback`: to be saved at `path` even if unchanged
        if not self._read(self.path) and fallback is not None and Path(fallback) != self.path:
            self.from_fallback = self._read(Path(fallback))

    def _read(self, path: Path) -> bool:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as error:
            log.warning("%s: unreadable verification cache (%s); verifying again", path, error)
            return False
        if isinstance(raw, dict) and raw.get("format") == CACHE_FORMAT and raw.get("root") == self.root:
            self.folders = raw.get("folders", {})
            self.extra = raw.get("extra", {})
            return True
        return False

    def save(self) -> None:
        """Write the cache; a cache that cannot be written (a read-only or full user cache) is a
        warning naming it, not a failure: it only ever saves work."""
        try:
            atomic.write_text(self.path, json.dumps(
                {"format": CACHE_FORMAT, "root": self.root, "extra": self.extra, "folders": self.folders},
                separators=(",", ":")))
        except OSError as error:
            log.warning("%s: cannot save the verification cache (%s); the next run verifies these files "
                        "again (set SGE_REPRO_CACHE to a writable folder)", self.path, error)


def _cached_dims(cached: dict) -> list[Dims]:
    dims = cached.get("dims")   # absent in a cache written before sizes were recorded
    return list(dims) if isinstance(dims, list) and len(dims) == len(cached["names"]) else [None] * len(cached["names"])


def lookup(scans: dict[str, FolderScan], cache: VerifyCache,
           need_sizes: bool = False) -> tuple[dict[str, FolderResult], list[tuple[str, int]]]:
    """Reuse the cache for every file whose (size, mtime_ns) did not change; returns the results
    (digest None where unknown) and the (folder, index) of the files to decode. `need_sizes`: a
    decodable file whose image size the cache does not hold (an older cache) is decoded again."""
    results: dict[str, FolderResult] = {}
    todo: list[tuple[str, int]] = []
    for rel, found in scans.items():
        cached = cache.folders.get(rel)
        if cached and cached["names"] == found.names and cached["sizes"] == found.sizes \
                and cached["mtimes"] == found.mtimes and None not in cached["digests"]:
            dims = _cached_dims(cached)
            if not need_sizes or all(d is not None or name in cached["errors"] for name, d in zip(found.names, dims)):
                results[rel] = FolderResult(found.names, found.sizes, found.mtimes, list(cached["digests"]),
                                            dict(cached["errors"]), dims)
                continue
        known = {}
        if cached:
            known = {name: (size, mtime, digest, dims) for name, size, mtime, digest, dims
                     in zip(cached["names"], cached["sizes"], cached["mtimes"], cached["digests"],
                            _cached_dims(cached))}
        result = FolderResult(found.names, found.sizes, found.mtimes, [None] * len(found.names))
        for index, (name, size, mtime) in enumerate(zip(found.names, found.sizes, found.mtimes)):
            hit = known.get(name)
            corrupt = cached is not None and name in cached["errors"]
            if hit is not None and hit[0] == size and hit[1] == mtime and hit[2] is not None \
                    and (not need_sizes or hit[3] is not None or corrupt):
                result.digests[index] = hit[2]
                result.dims[index] = hit[3]
                if corrupt:
                    result.errors[name] = cached["errors"][name]
            else:
                todo.append((rel, index))
        results[rel] = result
    return results, todo


def check_file(path: str) -> tuple[str, str | None, Dims]:
    """(content digest, None, [width, height]) for a decodable image, (digest, reason, None) for a
    corrupt one.

    Runs in the pool's worker processes. The decoder is the training loader's, so "verified"
    means "the loader can decode it"; the size is the one detectron2's read_image gives."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        return "", f"unreadable ({' '.join(str(error).split())})", None
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        width, height = decode_rgb(path).size
    except UserError as error:
        cause = error.__cause__ or error
        return digest, " ".join(str(cause).split()) or type(cause).__name__, None
    if _exif_orientation(data) in QUARTER_TURNS:
        width, height = height, width
    return digest, None, [width, height]


def _exif_orientation(data: bytes) -> int | None:
    """The EXIF orientation tag of an image's bytes (its header only: no second decode), read as
    detectron2.data.detection_utils._apply_exif_orientation reads it; None when absent/unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.getexif().get(EXIF_ORIENTATION)
    except Exception:   # detectron2 too treats an unreadable EXIF block as no orientation
        return None


def _check_indexed(item: tuple[int, str]) -> tuple[int, str, str | None, Dims]:
    index, path = item
    return (index, *check_file(path))


def verify(root: Path, scans: dict[str, FolderScan], cache: VerifyCache, workers: int | None = None,
           progress: Progress | None = None, label: str = "verify",
           need_sizes: bool = False) -> tuple[dict[str, FolderResult], int]:
    """Decode every file the cache does not vouch for (in `workers` processes; default: every
    core this process may use); updates and saves the cache. Returns (results, files decoded).
    `need_sizes`: see `lookup`."""
    results, todo = lookup(scans, cache, need_sizes)
    if not todo:
        if cache.from_fallback:
            cache.save()
        return results, 0
    workers = workers or available_cpus()
    pending = {rel: 0 for rel in results}
    for rel, _ in todo:
        pending[rel] += 1
    paths = [str(root / rel / results[rel].names[index]) for rel, index in todo]
    last_save = time.monotonic()
    if progress is not None:
        progress(label, 0, len(todo))

    def record(position: int, digest: str, error: str | None, dims: Dims) -> None:
        nonlocal last_save
        rel, index = todo[position]
        result = results[rel]
        result.digests[index] = digest
        result.dims[index] = dims
        if error is None:
            result.errors.pop(result.names[index], None)
        else:
            result.errors[result.names[index]] = error
        pending[rel] -= 1
        if pending[rel] == 0:
            cache.folders[rel] = result.as_cache()
        if time.monotonic() - last_save > SAVE_EVERY_S:
            cache.save()
            last_save = time.monotonic()

    items: Iterable[tuple[int, str]] = enumerate(paths)
    try:
        _decode_all(items, len(todo), workers, record, progress, label)
    except BaseException:
        cache.save()  # the folders finished so far are not decoded again
        raise
    for rel, result in results.items():
        cache.folders[rel] = result.as_cache()
    cache.save()
    return results, len(todo)


def _dies_of_sigterm() -> None:
    """In a pool worker: SIGTERM's default action. The pool ends its workers with SIGTERM on exit; a
    handler inherited through fork (torch elastic leaves one that raises, others may only log)
    could leave a worker waiting on the task queue and the pool's exit joining it forever."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _decode_all(items: Iterable[tuple[int, str]], total: int, workers: int,
                record: Callable[[int, str, str | None, Dims], None], progress: Progress | None, label: str) -> None:
    chunk = max(1, min(256, total // (workers * 16)))
    checked = _run_all(_check_indexed, items, workers, in_process=total < IN_PROCESS_BELOW, ordered=False,
                       chunksize=chunk)
    for done, (position, digest, error, dims) in enumerate(checked, start=1):
        record(position, digest, error, dims)
        if progress is not None and (done % 64 == 0 or done == total):
            progress(label, done, total)


def _run_all(function: Callable, items: Iterable, workers: int, in_process: bool, ordered: bool,
             chunksize: int) -> Iterator:
    """`function` over `items`: in this process, or in a pool of `workers` processes (results in
    order, or as they come). Closing the generator early (an error in the caller) ends the pool."""
    if in_process or workers == 1:
        yield from map(function, items)
        return
    # fork (as torch's DataLoader workers): no re-import of the caller's __main__. The workers only
    # stat / read / decode files, so a lock held by another thread of the caller at fork time (the
    # progress display's) is never needed in them.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=_dies_of_sigterm) as pool:
        mapped = pool.imap if ordered else pool.imap_unordered
        yield from mapped(function, items, chunksize=chunksize)
