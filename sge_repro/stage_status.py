"""A running stage's own progress, as a small JSON file (`logs/progress/<DVC stage name>.json`)
that `sge-repro run` shows live and the report's provenance lists. A file, not a callback: a stage
runs as a DVC subprocess, possibly as N processes or SLURM jobs on other nodes. Only RANK 0 writes,
atomically, at most every `min_interval` seconds. `logs/` is neither a DVC input nor an output, so
the file cannot make a stage stale.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sge_repro import atomic

FORMAT = "sge-repro/stage-status/v1"
MIN_INTERVAL_S = 2.0
# The fields a status file may hold besides the bookkeeping ones; anything else passed is dropped.
METRIC_FIELDS = ("epoch", "epochs", "loss", "top1", "val_top1", "lr", "images_per_s")


def is_main_process() -> bool:
    """RANK 0 of a torchrun / elastic / SLURM world (RANK unset: a single process)."""
    for variable in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(variable, "")
        if value != "":
            return value == "0"
    return True


def stage_name(group: str, *matrix_values: object) -> str:
    """DVC's name of a stage of dvc.yaml: `group@value1-value2...` for a matrix stage."""
    return group if not matrix_values else f"{group}@{'-'.join(str(v) for v in matrix_values)}"


@dataclass
class StageStatus:
    """Writes one stage's status file. `update(done, total, ...)` after each unit of work."""

    path: Path
    stage: str
    min_interval: float = MIN_INTERVAL_S
    enabled: bool = field(default_factory=is_main_process)
    clock: Callable[[], float] = time.time
    _started: float = field(init=False)
    _first_done: int | None = field(init=False, default=None)
    _first_at: float | None = field(init=False, default=None)
    _written_at: float = field(init=False, default=-math.inf)
    _record: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._started = self.clock()
        self._record = {"format": FORMAT, "stage": self.stage, "state": "running", "phase": "starting",
                        "unit": None, "done": 0, "total": None, "eta_s": None, "started": self._started,
                        "updated": self._started, "elapsed_s": 0.0, "pid": os.getpid(),
                        "host": socket.gethostname(), "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1)}
        self._write()

    def update(self, done: int, total: int | None, *, unit: str, phase: str, force: bool = False,
               images_per_unit: float | None = None, **metrics: Any) -> None:
        """`done` of `total` units (step, iter, batch) in `phase`; metrics among METRIC_FIELDS.
        With `images_per_unit` (and no images_per_s given), images/s is this process's pace.

        Written at most every min_interval seconds, except the first update, a new phase,
        `force`, and the last unit (done == total)."""
        now = self.clock()
        new_phase = phase != self._record["phase"]
        if new_phase or self._first_done is None or done < self._first_done:
            # the ETA follows this process's own pace in this phase (a resumed run starts late)
            self._first_done, self._first_at = done, now
        record = self._record
        record.update(phase=phase, unit=unit, done=int(done), total=None if total is None else int(total))
        for key in METRIC_FIELDS:
            value = metrics.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                continue  # not known yet (NaN until the engine's first log point): keep the last value
            if value is not None:
                record[key] = value
        record["eta_s"] = self._eta(done, total, now)
        if images_per_unit is not None and "images_per_s" not in metrics:
            units_per_s = self._pace(done, now)
            record["images_per_s"] = None if units_per_s is None else units_per_s * images_per_unit
        due = now - self._written_at >= self.min_interval
        if force or new_phase or due or (total is not None and done >= total):
            self._write(now)

    def finish(self, state: str = "done", error: str | None = None) -> None:
        """The final write: state done (eta 0) or failed (with the error's first line), and the
        CUDA devices the process used, if any."""
        self._record["state"] = state
        self._record["devices"] = _cuda_devices()
        if state == "done":
            self._record["eta_s"] = 0.0
        if error:
            self._record["error"] = (error.strip().splitlines() or [""])[0][:300]
        self._write()

    def _pace(self, done: int, now: float) -> float | None:
        """Units per second since this phase's first update in this process."""
        if self._first_at is None:
            return None
        finished, spent = done - (self._first_done or 0), now - self._first_at
        return finished / spent if finished > 0 and spent > 0 else None

    def _eta(self, done: int, total: int | None, now: float) -> float | None:
        pace = self._pace(done, now)
        if total is None or pace is None:
            return None
        return max(0.0, (total - done) / pace)

    def _write(self, now: float | None = None) -> None:
        if not self.enabled:
            return
        now = self.clock() if now is None else now
        self._record["updated"] = now
        self._record["elapsed_s"] = round(now - self._started, 3)
        try:
            # no fsync: a view rewritten every few seconds (a slow fsync on a shared filesystem would
            # stall training); readers still see a whole file, old or new
            write_status(self.path, self._record)
        except (OSError, ValueError):
            pass  # a view of the run: never fail the stage because the status could not be written
        self._written_at = now


def _cuda_devices() -> str:
    """"2 x NVIDIA H100 80GB HBM3" when this process initialised CUDA, else "" (torch not imported here)."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_initialized():
            return ""
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a view of the run
        return ""
    return f"{len(names)} x {names[0]}" if names else ""


@contextmanager
def tracking(path: Path, stage: str, **kwargs: Any) -> Iterator[StageStatus]:
    """A StageStatus whose final state follows the block: done, failed (with the error) or stopped."""
    status = StageStatus(Path(path), stage, **kwargs)
    try:
        yield status
    except Exception as error:
        status.finish("failed", f"{type(error).__name__}: {error}")
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit
        status.finish("stopped")
        raise
    status.finish("done")


def write_status(path: Path, record: dict[str, Any]) -> None:
    """Write a record of the stage (also one read_status returned, to put it back), atomically."""
    atomic.write_text(path, json.dumps(record, allow_nan=False, default=str) + "\n", durable=False)


def read_status(path: Path) -> dict[str, Any] | None:
    """A status file's record, or None when absent or unreadable (never raises: it is a view)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return None
    return record
