"""One node: torch's elastic launcher through its Python API (what torchrun runs, without a CLI).

The workers are spawned processes of this one and share its stdout / stderr. The rendezvous is
static on a free port of 127.0.0.1: no elastic restarts (a rerun resumes from the stage's
checkpoints instead). A failing worker ends the launch. Torch elastic reports the first worker it
finds exited, often one that only lost its peer in a collective, so each worker also records its
exception with its time (`failure-<rank>.json`) and `describe_failure` names the root cause.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch.distributed.elastic.multiprocessing.errors as elastic_errors
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from sge_repro import atomic
from sge_repro.launch import resolve_nproc_per_node
from sge_repro.launch.errors import LaunchError, RankFailure, root_cause
from sge_repro.params_sections import LaunchParams

T = TypeVar("T")

# Our own errors reach the user as their message alone; any other exception keeps its type name.
_PLAIN_TYPES = ("UserError", "LaunchError")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run(target: Callable[..., T], args: tuple, settings: LaunchParams, *, name: str, state_dir: Path) -> T:
    """Run `target(*args)` in `nproc_per_node` local processes; rank 0's return value."""
    if settings.nodes != 1:
        raise LaunchError(f"{name}: launch.nodes={settings.nodes}: the local launcher runs on one node; "
                          "expected launch.launcher: slurm for more")
    nproc = resolve_nproc_per_node(settings)
    state_dir.mkdir(parents=True, exist_ok=True)
    for earlier in state_dir.glob("local-*"):  # an earlier failed launch's error files
        shutil.rmtree(earlier, ignore_errors=True)
    # One folder per launch: the workers' error files (error.json with the traceback) land here;
    # removed after a success, kept after a failure (the LaunchError names the file).
    log_dir = Path(tempfile.mkdtemp(prefix="local-", dir=state_dir))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex[:12],
        rdzv_backend="static", rdzv_endpoint=f"127.0.0.1:{free_port()}", rdzv_configs={"rank": 0},
        max_restarts=0, start_method="spawn", local_addr="127.0.0.1",
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), redirects=Std.NONE, tee=Std.NONE))
    try:
        with _quiet_elastic_logs(), own_signal_handlers():
            results = elastic_launch(config, _worker)(target, args, str(log_dir))
    except elastic_errors.ChildFailedError as exc:
        raise LaunchError(describe_failure(name, exc, recorded_failures(log_dir))) from None
    except SignalException as exc:  # Ctrl-C / SIGTERM of this process: the agent stopped the workers
        raise LaunchError(f"{name}: interrupted by {exc.sigval.name}; the workers were stopped "
                          "(rerun to resume from the last checkpoint)") from None
    shutil.rmtree(log_dir, ignore_errors=True)
    return results[0]


@contextlib.contextmanager
def own_signal_handlers() -> Iterator[None]:
    """Put back this process's SIGTERM / INT / HUP / QUIT handlers on leaving. Torch elastic installs
    handlers that raise SignalException and leaves them in place: without this, Ctrl-C after a
    launch is no KeyboardInterrupt, and a process forked later (a multiprocessing pool worker)
    catches SIGTERM instead of dying of it."""
    handled = [getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, name)]
    main = threading.current_thread() is threading.main_thread()   # handlers are only set there
    before = {sig: signal.getsignal(sig) for sig in handled} if main else {}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _worker(target: Callable[..., Any], args: tuple, log_dir: str) -> Any:
    """What each spawned process runs (module level: pickled by name)."""
    _die_with_parent()
    # A single node talks over loopback only: gloo would otherwise pick the interface of the
    # machine's hostname, which in containers may not be reachable from itself.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        result = target(*args)
        pickle.dumps(result)  # fails here, as this rank's error, if rank 0's answer cannot travel
    except Exception as exc:
        _record_failure(Path(log_dir), exc)
        raise
    atexit.register(_exit_now)  # runs first at exit: the worker has handed its result over by then
    return result


def _record_failure(log_dir: Path, exc: Exception) -> None:
    """This rank's exception, when it was raised, and torch elastic's error file that will hold its
    traceback: `failure-<rank>.json` in the launch's folder, for `describe_failure`."""
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "time": time.time(), "message": f"{type(exc).__name__}: {exc}",
              "error_file": os.environ.get("TORCHELASTIC_ERROR_FILE", "")}
    try:
        atomic.write_text(log_dir / f"failure-{rank}.json", json.dumps(record), durable=False)
    except OSError:
        pass  # the launch then names the rank torch elastic reports


def recorded_failures(log_dir: Path) -> dict[int, dict]:
    """The failure records the workers of one launch wrote, by rank."""
    records = {}
    for path in log_dir.glob("failure-*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            records[int(record["rank"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


def _exit_now() -> None:
    """End a worker that succeeded without the interpreter's finalization, which takes seconds
    with torch loaded while the agent waits for the process to exit. The other atexit handlers
    still run first (log files, detectron2's writers are flushed and closed). Registered only
    after the target returned and its result pickled, so a failure keeps its exit code."""
    atexit.unregister(_exit_now)
    atexit._run_exitfuncs()  # CPython's; no public way to run the handlers before os._exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _die_with_parent() -> None:
    """SIGKILL this worker when the launching process dies (Linux), so that a rerun after the
    head process was killed never finds the old workers still training and writing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        os._exit(1)


def describe_failure(name: str, exc: Any, records: dict[int, dict] | None = None) -> str:
    """One line: the stage, the rank whose failure caused the others', and its own error (or the
    signal). `records`: the workers' own failure records (`recorded_failures`), by rank."""
    records = records or {}
    candidates = {rank: RankFailure(rank, str(record.get("message", "")), record.get("time"))
                  for rank, record in records.items()}
    for rank, failure in exc.failures.items():
        if rank not in candidates:  # no exception: a signal, or an exit code
            candidates[rank] = RankFailure(rank, _message(failure), failure.timestamp)
    root = root_cause(candidates.values())
    failure = exc.failures.get(root.rank)  # None when torch elastic reported another rank
    what = _one_line(root.message) if root.message else ""
    if not what and failure is not None and failure.exitcode < 0:
        what = f"killed by signal {-failure.exitcode} ({failure.signal_name()})"
    what = what or (f"exited with code {failure.exitcode if failure is not None else 1} without recording an "
                    "error: it failed outside the stage's code (e.g. while starting: importing or unpickling "
                    "the target); its traceback is in the output above")
    # Other ranks that failed of their own accord (not those that lost their peer in a collective).
    others = sorted(rank for rank, other in candidates.items() if rank != root.rank and not other.lost_a_peer)
    also = f" (rank(s) {', '.join(map(str, others))} failed too)" if others else ""
    error_file = failure.error_file if failure is not None else records[root.rank].get("error_file", "")
    where = f"; traceback: {error_file}" if os.path.isfile(str(error_file)) else ""
    return f"{name}: rank {root.rank} failed: {what}{also}{where}"


def _message(failure: Any) -> str:
    """A torch elastic ProcessFailure's error message ("" for a signal, or without an error file:
    torch then makes up "To enable traceback see: <url>", which says nothing of this failure)."""
    if failure.exitcode < 0 or not os.path.isfile(str(failure.error_file)):
        return ""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return str(message)


def _one_line(message: str) -> str:
    kind, sep, rest = message.partition(": ")
    if sep and kind in _PLAIN_TYPES:
        message = rest
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


@contextlib.contextmanager
def _quiet_elastic_logs() -> Iterator[None]:
    """torch elastic logs its configuration, each worker it stops and a ChildFailedError banner
    at WARNING / ERROR; the LaunchError line says what matters. CRITICAL only while a launch runs."""
    logs = [logging.getLogger(name) for name in
            ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
