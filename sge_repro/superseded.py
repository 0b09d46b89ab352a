"""Runs trained under other params: moved aside, never resumed into and never deleted.

A training stage reruns when its params change (`dvc repro` after an edit, `dvc exp run -S`). Its
run folder is a persistent DVC output, so the previous run's checkpoints are still there: resuming
them would mix two recipes, deleting them would throw the previous training away. So the stage
moves the folder to runs/superseded/<kind>/<run>-<fingerprint>/ (paths.superseded_run_dir), says
so in one warning line naming the keys that changed (old -> new) and the destination, and trains
from scratch. An interrupted run whose params did not change resumes as before.

In a multi-process run every rank reads the checkpoint, rank 0 alone moves the folder, and the
ranks meet before and after the move (so no rank resumes from a folder that is being moved).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from sge_repro.errors import UserError, preview
from sge_repro.paths import superseded_run_dir

log = logging.getLogger(__name__)


class RunOfOtherParams(UserError):
    """A run folder holds a checkpoint trained under other params. `differences`: 'key old -> new'
    lines; `fingerprint`: a short id of the old params (names the moved folder)."""

    def __init__(self, message: str, differences: list[str], fingerprint: str):
        super().__init__(message)
        self.differences, self.fingerprint = differences, fingerprint


def move_aside(run_dir: Path, found: RunOfOtherParams) -> Path:
    """Move `run_dir` to its superseded folder (a free name); returns where it went."""
    destination = superseded_run_dir(run_dir, found.fingerprint)
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(run_dir, destination)  # same filesystem (both under runs/): atomic, nothing copied
    log.warning("%s: trained with other params (%s); moved to %s, training from scratch",
                run_dir, preview(found.differences, 4), destination)
    return destination


def supersede_changed_run(check: Callable[[], object], run_dir: str | os.PathLike, is_main: bool,
                          barrier: Callable[[], None]) -> Path | None:
    """Call `check` (raises RunOfOtherParams when run_dir holds a run of other params) on every rank;
    move the run aside on rank 0 if so. Every rank calls `barrier` twice, whatever it found.
    Returns the superseded folder (rank 0), else None. Other UserErrors of `check` propagate."""
    try:
        check()
        found = None
    except RunOfOtherParams as error:
        found = error
    barrier()
    moved = move_aside(Path(run_dir), found) if found is not None and is_main else None
    barrier()
    return moved
