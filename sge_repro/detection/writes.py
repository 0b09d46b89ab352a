"""The files a detector run writes, under a full disk: one line naming the file, nothing partial.

Checkpoints, last_checkpoint and config.yaml are written atomically (sge_repro.atomic: the temp
is removed when the write fails). The append-only files are written here in whole pieces:
metrics.json and log.txt append each record with one os.write and are cut back to their old
length when the write fails, so a rerun never appends after half a line. A failed write becomes
UserError "<file>: no space left on device ..." (exit 2). Checkpoints are serialised by torch in
memory and written by Python, so every failed write here is an OSError that names its errno.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Iterator

from sge_repro.atomic import write_failure
from sge_repro.errors import UserError



def raise_disk_error(path: str | os.PathLike, error: BaseException) -> None:
    """Raise the one-line UserError for `error` when it is a failed write of `path`; return otherwise."""
    if isinstance(error, UserError):
        raise error
    if isinstance(error, OSError) and (failure := write_failure(error, path)) is not None:
        raise failure from error


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """`with disk_errors(path):` turns a failed write of `path` into the one-line UserError."""
    try:
        yield
    except BaseException as error:
        raise_disk_error(path, error)
        raise


class AppendFile:
    """A text file that `write` collects into and `flush` appends to in one os.write; when that
    fails the file is cut back to its old length and the text dropped (UserError for a full disk)."""

    def __init__(self, path: str | os.PathLike):
        self.name = str(path)
        with disk_errors(path):
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self._pending: list[str] = []

    def write(self, text: str) -> int:
        self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        if not self._pending or self._fd < 0:
            return
        data = memoryview("".join(self._pending).encode("utf-8"))
        self._pending = []
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as error:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise_disk_error(self.name, error)
            raise

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd)
            self._fd = -1


def append_log_to(logger: logging.Logger, log_file: str | os.PathLike) -> None:
    """Make `logger`'s handler of `log_file` (detectron2's setup_logger opened it buffered) append
    whole records through AppendFile, and raise the full-disk UserError instead of printing
    logging's '--- Logging error ---' traceback."""
    log_file = os.path.abspath(log_file)
    for handler in logger.handlers:
        stream = getattr(handler, "stream", None)
        if isinstance(handler, logging.StreamHandler) and os.path.abspath(getattr(stream, "name", "") or "") == log_file \
                and not isinstance(stream, AppendFile):
            handler.setStream(AppendFile(log_file))

            def handle_error(record, handler=handler):
                if isinstance(sys.exc_info()[1], UserError):
                    raise sys.exc_info()[1]
                logging.StreamHandler.handleError(handler, record)

            handler.handleError = handle_error


_previous_excepthook = threading.excepthook


def _quiet_event_writer_errors(args) -> None:
    """TensorBoard's writer thread re-raises its OSError in the main thread at the next write (where
    it becomes the one-line error); its own traceback on stderr is not shown."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
        return
    _previous_excepthook(args)


def quiet_event_writer_thread() -> None:
    threading.excepthook = _quiet_event_writer_errors
