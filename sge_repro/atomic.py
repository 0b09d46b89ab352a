"""Atomic writes: build beside the target under a hidden temp name, then rename into place.

A killed process never leaves a half-written file or tree that a later stage would trust.
Files and folders share one temp naming scheme, `.<name>.tmp-<pid>-<ns>` in the target's
folder, and one cleanup: before a new write to a target, temps of that target whose process
is gone are removed (they were never renamed, so never trusted; this only reclaims the space).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from sge_repro.errors import UserError

# A write that failed for one of these reasons is the user's to fix (exit 2, one line naming the file).
WRITE_FAILURES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def write_failure(error: OSError, path: str | os.PathLike | None = None) -> UserError | None:
    """The one-line UserError for a write of `path` (default: the error's file) that failed for a
    reason in WRITE_FAILURES; None for any other error."""
    reason = WRITE_FAILURES.get(error.errno)
    path = path if path is not None else error.filename
    if reason is None or path is None:
        return None
    where = Path(path).parent
    advice = ("free space there and rerun (an interrupted training resumes)"
              if error.errno in (errno.ENOSPC, errno.EDQUOT) else "expected a folder this user can write")
    return UserError(f"{path}: {reason} (writing in {where}); {advice}")


_IN_USE: set[str] = set()  # this process's temps still being written (other threads may clean up)


def _temp_path(target: Path) -> Path:
    """A fresh hidden name beside `target`, naming the process that owns it."""
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"


def _owner_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours and not in _IN_USE: left by an earlier write that failed to clean up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # rmtree never follows symlinks inside the tree
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove the temps of `target` left by processes that no longer run; return them."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)-\d+")
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and os.path.abspath(entry) not in _IN_USE and not _owner_alive(int(match.group(1))):
            _remove(entry)
            removed.append(entry)
    return removed


@contextmanager
def _claimed_temp(target: Path) -> Iterator[Path]:
    """A fresh temp name beside `target` (stale temps of it removed first), marked in use while the block runs."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = _temp_path(target)
    _IN_USE.add(os.path.abspath(tmp))
    try:
        yield tmp
    finally:
        _IN_USE.discard(os.path.abspath(tmp))


def _atomic(path: str | os.PathLike, write: Callable[[str], None], durable: bool = True) -> Path:
    path = Path(path)
    try:
        with _claimed_temp(path) as tmp:
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the usual mode (umask applies)
                write(str(tmp))
                if durable:  # on disk before the rename: a power cut leaves the old file or the new one
                    with open(tmp, "rb+") as handle:
                        os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except OSError as error:
        failure = write_failure(error, path)
        if failure is None:
            raise
        raise failure from error
    return path


def write_text(path: str | os.PathLike, text: str, durable: bool = True) -> Path:
    """`durable=False` skips the fsync (readers still see the old or the new file, never a mix):
    for files rewritten every few seconds that only describe a run (sge_repro.stage_status)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    return _atomic(path, write, durable)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return _atomic(path, write)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """Serialised in memory, then written by Python: a full disk is a plain ENOSPC (torch's C++
    writer reports it as an iostream error and keeps its file open while the error is alive)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getbuffer())


@contextmanager
def publish_dir(root: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder beside `root`; when the block finishes, it becomes `root`.

    If the block raises (or the process is killed), `root` is left as it was (the previous tree,
    or nothing) and the temp folder is removed (or, after a kill, by the next publish). An
    existing `root` (folder, file or symlink) is renamed aside, the new tree renamed into place
    and the old one deleted; a symlink is removed, never followed.
    """
    root = Path(root)
    try:
        with _claimed_temp(root) as staging:
            try:
                staging.mkdir()
                yield staging
                if root.exists() or root.is_symlink():
                    retired = _temp_path(root)
                    os.replace(root, retired)
                    os.replace(staging, root)
                    _remove(retired)
                else:
                    os.replace(staging, root)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except OSError as error:
        failure = write_failure(error, error.filename or root)
        if failure is None:
            raise
        raise failure from error
