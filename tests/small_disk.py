"""A small or read-only filesystem at a folder, for the full-disk and read-only fault tests: a tmpfs
(or a read-only bind) mounted there, which needs root (CI runs as root); unmounted afterwards."""

import contextlib
import subprocess
from pathlib import Path


@contextlib.contextmanager
def small_disk(folder: Path, size_bytes: int):
    """A tmpfs of `size_bytes` at `folder` (created empty); resize it with `resize(folder, bytes)`."""
    folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={max(size_bytes // 1024, 4)}k", "tmpfs", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def resize(folder: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes // 1024}k", str(folder)], check=True)


@contextlib.contextmanager
def read_only_view(folder: Path, view: Path):
    """`folder` seen read-only at `view` (a read-only bind mount)."""
    view.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(folder), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)
