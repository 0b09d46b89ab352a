"""Who is running the pipeline: sge-repro's run lock, and the locks DVC holds while it runs.

`sge-repro run` takes an exclusive fcntl lock on `.dvc/tmp/sge-repro-run.lock` BEFORE it writes
anything (params.yaml, logs/) and holds it until `dvc repro` has exited. The kernel drops the lock
when the process dies, so a killed run never leaves a stale one behind. Beside it, written after
the lock is ours, `.dvc/tmp/sge-repro-run.json` says which process holds it ({"pid", "cmd",
"started"}), for the message the next caller gets.

A `dvc repro` can also run without us (started by hand, or orphaned by a killed `sge-repro run`):
DVC then holds `.dvc/tmp/lock` (fcntl, between stages) and lists its pid in `.dvc/tmp/rwlock`
(while a stage's command runs). `busy()` looks at all three; only a live process counts.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil

from sge_repro import atomic
from sge_repro.errors import UserError

LOCK_FILE = Path(".dvc") / "tmp" / "sge-repro-run.lock"
HOLDER_FILE = Path(".dvc") / "tmp" / "sge-repro-run.json"
DVC_REPO_LOCK = Path(".dvc") / "tmp" / "lock"
DVC_RWLOCK = Path(".dvc") / "tmp" / "rwlock"


@dataclass(frozen=True)
class Holder:
    pid: int | None
    cmd: str

    def describe(self) -> str:
        return f"pid {self.pid}: {self.cmd}" if self.pid is not None else self.cmd


pid_exists = psutil.pid_exists  # in the process table at all, a zombie included


def pid_alive(pid: int) -> bool:
    """True if process `pid` exists and is not a zombie (killed, not yet reaped by its parent)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _our_holder(root: Path) -> Holder:
    try:
        info = json.loads((root / HOLDER_FILE).read_text(encoding="utf-8"))
        return Holder(int(info["pid"]), str(info["cmd"]))
    except (OSError, ValueError, KeyError, TypeError):  # being written right now
        return Holder(None, "an sge-repro run (pid not recorded yet)")


def dvc_rwlock_holders(root: Path = Path(".")) -> list[Holder]:
    """Processes DVC's `.dvc/tmp/rwlock` lists as reading or writing stage paths (dead ones too)."""
    try:
        lock = json.loads((root / DVC_RWLOCK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    infos = list((lock.get("write") or {}).values())
    for readers in (lock.get("read") or {}).values():
        infos.extend(readers)
    holders = []
    for info in infos:
        try:
            holder = Holder(int(info["pid"]), str(info.get("cmd", "dvc")))
        except (KeyError, TypeError, ValueError):
            continue
        if holder not in holders:
            holders.append(holder)
    return holders


def _dvc_repo_lock_holder(root: Path) -> Holder | None:
    """The process holding DVC's repo lock (an fcntl lock, gone with its process), if any."""
    path = root / DVC_REPO_LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_flock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        content = os.read(fd, 64).decode(errors="replace").strip()
    finally:
        os.close(fd)
    return Holder(int(content), "dvc") if content.isdigit() else Holder(None, "a dvc process")


def busy(root: Path = Path(".")) -> Holder | None:
    """The live process running this project's pipeline, or None."""
    path = root / LOCK_FILE
    if path.exists():
        fd = os.open(path, os.O_RDONLY)
        try:
            if not _try_flock(fd):
                return _our_holder(root)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return _dvc_holder(root)


def _dvc_holder(root: Path) -> Holder | None:
    reused = reused_rwlock_pids(root)
    for holder in dvc_rwlock_holders(root):
        if holder.pid is not None and holder.pid != os.getpid() and pid_alive(holder.pid) \
                and holder.pid not in reused:
            return holder
    return _dvc_repo_lock_holder(root)


def reused_rwlock_pids(root: Path = Path(".")) -> set[int]:
    """Live pids in DVC's rwlock whose process is not a DVC one (its command line names no `dvc`):
    the DVC process that wrote the entry died and the system gave its pid to another program.
    DVC counts every live pid as a holder, so such an entry would block every run for as long as
    that program lives."""
    reused = set()
    for holder in dvc_rwlock_holders(root):
        try:
            if holder.pid is not None and not any("dvc" in part for part in psutil.Process(holder.pid).cmdline()):
                reused.add(holder.pid)
        except psutil.Error:  # gone (DVC drops dead pids itself), or not ours to inspect: a holder
            continue
    return reused


def forget_reused_pids(root: Path = Path(".")) -> list[int]:
    """Remove the entries of reused pids (`reused_rwlock_pids`) from DVC's rwlock, as DVC removes
    those of dead ones; call it holding the run lock, with no DVC process running. Returns them."""
    reused = reused_rwlock_pids(root)
    if not reused:
        return []
    lock = json.loads((root / DVC_RWLOCK).read_text(encoding="utf-8"))
    for mode in ("read", "write"):
        entries = lock.get(mode) or {}
        for path, infos in list(entries.items()):
            kept = [info for info in (infos if isinstance(infos, list) else [infos])
                    if not (isinstance(info, dict) and info.get("pid") in reused)]
            if not kept:
                del entries[path]
            else:
                entries[path] = kept if isinstance(infos, list) else kept[0]
    atomic.write_text(root / DVC_RWLOCK, json.dumps(lock))
    return sorted(reused)


def in_progress_message(holder: Holder) -> str:
    return (f"a pipeline run is in progress ({holder.describe()}); wait for it to finish, "
            "or stop that process first")


def refuse_if_busy(root: Path = Path(".")) -> None:
    holder = busy(root)
    if holder is not None:
        raise UserError(in_progress_message(holder))


@contextmanager
def hold(command: str, root: Path = Path(".")) -> Iterator[None]:
    """Hold the run lock for the body; UserError (writing nothing) if any run is live already."""
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_flock(fd):
            raise UserError(in_progress_message(_our_holder(root)))
        other = _dvc_holder(root)
        if other is not None:
            raise UserError(in_progress_message(other))
        forget_reused_pids(root)
        atomic.write_text(root / HOLDER_FILE, json.dumps(
            {"pid": os.getpid(), "cmd": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        yield
    finally:
        os.close(fd)  # releases the flock


_BLOCKER = re.compile(r"\(PID (\d+)\): (.*)")


def explain_dvc_lock_error(message: str, root: Path = Path(".")) -> str | None:
    """A one-line replacement for DVC's lock errors, or None if `message` is not one.

    DVC's rwlock error advises removing `.dvc/tmp/rwlock`; that is right only when every process
    it names is dead (removing the lock of a live run corrupts it), so say which case it is.
    """
    if "is being blocked by" in message:
        holders = [Holder(int(pid), cmd.strip()) for pid, cmd in _BLOCKER.findall(message)]
        live = [h for h in holders if pid_alive(h.pid)]
        if live or not holders:
            return in_progress_message(live[0] if live else Holder(None, "a dvc process"))
        exiting = [h for h in holders if pid_exists(h.pid)]
        if exiting:  # zombies: DVC counts them as running until their parent reaps them
            return (f"{DVC_RWLOCK} names processes that were killed but not yet reaped by their parent "
                    f"({', '.join(h.describe() for h in exiting)}); DVC counts them as running until then: "
                    "retry in a moment (do not remove the lock file)")
        dead = ", ".join(h.describe() for h in holders)
        return (f"{DVC_RWLOCK} names processes that no longer run ({dead}): "
                f"remove {DVC_RWLOCK} and retry")
    if "Unable to acquire lock" in message:
        return in_progress_message(_dvc_repo_lock_holder(root) or Holder(None, "another dvc process"))
    return None
