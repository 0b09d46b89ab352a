"""Resumable, checksummed downloads, safe zip extraction, and fetching COCO 2017.

`download` writes to `<destination>.part`, continues an existing .part with an HTTP Range
request, verifies the checksum of the finished file and only then renames it to its final name:
a file at `destination` is always complete. A dropped connection is retried from where it
stopped; a server that ignores Range (answers 200) restarts the file from byte 0.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping, Sequence

from sge_repro.errors import UserError

Progress = Callable[[int, int | None], None]

COCO_BASE_URL = "http://images.cocodataset.org"
# part -> (path under the base URL, published MD5, what the zip must produce under root)
COCO_FILES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "train2017": ("zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2", ("train2017",)),
    "val2017": ("zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80", ("val2017",)),
    "annotations": ("annotations/annotations_trainval2017.zip", "f4bbac642086de4f52a3fdda2de5fa2c",
                    ("annotations/instances_train2017.json", "annotations/instances_val2017.json")),
}

_READ_SIZE = 1 << 20
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError)


def download(url: str, destination: str | os.PathLike, sha256: str | None = None, md5: str | None = None,
             progress: Progress | None = None, chunk_size: int = 1 << 20, timeout: float = 60,
             retries: int = 3) -> Path:
    """Download `url` to `destination`, resuming a partial `<destination>.part`; return the path.

    An existing `destination` is trusted as complete (only a verified download is ever renamed
    there) but is still checked against a given checksum. progress(done_bytes, total_bytes or
    None) is called after every chunk. A connection that drops is resumed up to `retries` times.
    """
    destination = Path(destination)
    if not url.startswith(("http://", "https://")):
        raise UserError(f"{url}: expected an http:// or https:// URL")
    if destination.is_file():
        _verify(destination, sha256, md5, remove_on_mismatch=False)
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    for attempt in range(retries + 1):
        try:
            if _fetch_into(url, part, progress, chunk_size, timeout):
                break
        except _NETWORK_ERRORS as error:
            if isinstance(error, urllib.error.HTTPError) and error.code != 416:
                raise UserError(f"{url}: HTTP {error.code} {error.reason}; expected the file "
                                f"(downloading to {destination})") from error
            if attempt == retries:
                raise UserError(f"{url}: download failed after {retries + 1} attempts ({error}); "
                                f"{part} is kept, run again to resume") from error
    else:
        raise UserError(f"{url}: download still incomplete after {retries + 1} attempts; "
                        f"{part} is kept, run again to resume")
    _verify(part, sha256, md5, remove_on_mismatch=True, name=destination)
    os.replace(part, destination)
    return destination


def _fetch_into(url: str, part: Path, progress: Progress | None, chunk_size: int, timeout: float) -> bool:
    """One request: append to `part` from its current size. True when the file is complete."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        # A fresh opener per request picks up the current proxy settings (urlopen caches its own).
        response = urllib.request.build_opener().open(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # Range beyond the end: the .part is already whole if its size is the file's size.
            total = _total_from_content_range(error.headers.get("Content-Range"))
            if total == offset:
                return True
            part.unlink()  # larger than the file or of unknown size: start over
            return False
        raise
    with response:
        if offset and response.status == 206:
            start = _start_from_content_range(response.headers.get("Content-Range"))
            if start != offset:
                raise UserError(f"{url}: server resumed at byte {start}, expected {offset}")
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # 200: the server ignored Range, the body is the whole file
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        done = offset
        with open(part, mode) as out:
            while chunk := response.read(chunk_size):
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    if total is not None and done < total:
        raise ConnectionError(f"connection closed at byte {done} of {total}")
    return True


def _start_from_content_range(header: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", header or "")
    return int(match.group(1)) if match else None


def _total_from_content_range(header: str | None) -> int | None:
    match = re.match(r"bytes (?:\*|\d+-\d+)/(\d+)", header or "")
    return int(match.group(1)) if match else None


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of a file's bytes ("md5", "sha256", any hashlib name)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def _verify(path: Path, sha256: str | None, md5: str | None, remove_on_mismatch: bool,
            name: Path | None = None) -> None:
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is None:
            continue
        actual = file_digest(path, algorithm)
        if actual != expected.lower():
            if remove_on_mismatch:
                path.unlink()
            hint = "download it again" if remove_on_mismatch else "delete it to download again"
            raise UserError(f"{name or path}: {algorithm} mismatch (expected {expected.lower()}, got {actual}); "
                            f"the file is corrupt or not the expected one, {hint}")


# ---------------------------------------------------------------- zip extraction


def extract_zip_safely(archive: str | os.PathLike, destination: str | os.PathLike) -> list[Path]:
    """Extract `archive` into `destination`; return the top-level entries it created.

    Refuses absolute paths, '..' components and symlinks before writing anything. Extraction
    goes to a hidden temp folder inside destination; each top-level entry is then renamed into
    place, so e.g. destination/val2017 appears only once all its files are there. An existing
    top-level entry is an error, never merged into.
    """
    archive, destination = Path(archive), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = zipped.infolist()
            tops = sorted({_checked_zip_name(archive, info).parts[0] for info in members})
            for top in tops:
                if (destination / top).exists() or (destination / top).is_symlink():
                    raise UserError(f"{destination / top}: already exists; remove it to extract {archive.name} again")
            tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".partial", dir=destination))
            try:
                for info in members:
                    target = tmp.joinpath(*_checked_zip_name(archive, info).parts)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zipped.open(info) as source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out, _READ_SIZE)
                for top in tops:
                    os.rename(tmp / top, destination / top)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        raise UserError(f"{archive}: not a readable zip file ({error})") from error
    return [destination / top for top in tops]


def _checked_zip_name(archive: Path, info: zipfile.ZipInfo) -> PurePosixPath:
    raw = info.filename
    name = PurePosixPath(raw.replace("\\", "/"))
    label = f"{archive}: member {raw!r}"
    if name.is_absolute() or re.match(r"[A-Za-z]:", raw):
        raise UserError(f"{label} has an absolute path; expected paths inside the archive")
    if ".." in name.parts:
        raise UserError(f"{label} contains '..'; expected paths inside the archive")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UserError(f"{label} is a symbolic link; expected plain files and folders")
    parts = [part for part in name.parts if part != "."]
    if not parts:
        raise UserError(f"{label}: empty path; expected a file or folder name")
    return PurePosixPath(*parts)


# ---------------------------------------------------------------- COCO 2017


def fetch_coco(root: str | os.PathLike, parts: Sequence[str] = ("train2017", "val2017", "annotations"),
               base_url: str = COCO_BASE_URL, progress: Callable[[str, int, int | None], None] | None = None,
               expected_md5: Mapping[str, str] | None = None, keep_archives: bool = False,
               timeout: float = 60) -> dict:
    """Download and extract COCO 2017 into root/{train2017,val2017,annotations/instances_*.json}.

    A part whose extracted result already exists is skipped (extraction is atomic, so it is
    whole). Zips go to root/downloads/ and are deleted after extraction unless keep_archives.
    progress(part, done_bytes, total_bytes) drives one bar per part. expected_md5 overrides the
    published MD5s per part (tests serve tiny zips). Returns {"root", "parts": {part: status}}.
    """
    root = Path(root)
    unknown = [part for part in parts if part not in COCO_FILES]
    if unknown:
        raise UserError(f"parts: unknown {', '.join(unknown)}; expected some of {', '.join(COCO_FILES)}")
    md5s = {part: entry[1] for part, entry in COCO_FILES.items()}
    md5s.update(expected_md5 or {})
    statuses: dict[str, str] = {}
    for part in parts:
        remote_path, _, produces = COCO_FILES[part]
        if all((root / item).exists() for item in produces):
            statuses[part] = "present"
            continue
        archive = root / "downloads" / PurePosixPath(remote_path).name
        report = (lambda done, total, part=part: progress(part, done, total)) if progress else None
        download(f"{base_url.rstrip('/')}/{remote_path}", archive, md5=md5s[part], progress=report, timeout=timeout)
        extract_zip_safely(archive, root)
        missing = [item for item in produces if not (root / item).exists()]
        if missing:
            raise UserError(f"{archive}: extracted without {', '.join(missing)}; expected the official "
                            f"COCO 2017 layout under {root}")
        if not keep_archives:
            archive.unlink()
        statuses[part] = "fetched"
    downloads = root / "downloads"
    if downloads.is_dir() and not any(downloads.iterdir()):
        downloads.rmdir()
    return {"root": str(root), "parts": statuses}
