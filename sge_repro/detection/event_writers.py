"""The EventWriters of a detector run, each failing on a full disk with the one-line error naming
its file (sge_repro.detection.writes): metrics.json in whole, fsynced lines, and TensorBoard events."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sge_repro.detection.compat import import_detectron2
from sge_repro.detection.writes import AppendFile, disk_errors, quiet_event_writer_thread

import_detectron2()
from detectron2.utils.events import EventWriter, TensorboardXWriter, get_event_storage  # noqa: E402


class MetricsWriter(EventWriter):
    """metrics.json as detectron2's JSONWriter writes it (one JSON line per iteration with the
    scalars not written yet, median-smoothed where hinted), appended in whole lines (AppendFile):
    a full disk is the one-line error naming the file, and no half line is left for the resumed
    run to append after."""

    def __init__(self, json_file: str, window_size: int = 20):
        self._file = AppendFile(json_file)
        self._window_size = window_size
        self._last_write = -1

    def write(self):
        by_iteration: dict[int, dict] = {}
        for key, (value, iteration) in get_event_storage().latest_with_smoothing_hint(self._window_size).items():
            if iteration > self._last_write:
                by_iteration.setdefault(iteration, {})[key] = value
        if by_iteration:
            self._last_write = max(by_iteration)
        for iteration, scalars in by_iteration.items():
            self._file.write(json.dumps({**scalars, "iteration": iteration}, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self):
        self._file.close()


class EventsWriter(TensorboardXWriter):
    """TensorBoard events; a failed write (raised by its writer thread at the next call) is the
    one-line error naming the folder."""

    def __init__(self, log_dir: str, **kwargs):
        quiet_event_writer_thread()
        super().__init__(log_dir, **kwargs)
        self._log_dir = log_dir

    def write(self):
        with disk_errors(Path(self._log_dir) / "events.out.tfevents.*"):
            super().write()

    def close(self):
        with disk_errors(Path(self._log_dir) / "events.out.tfevents.*"):
            super().close()
