"""Shared rich objects for the CLI: one console, progress bars, tables."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from rich.console import Console
from rich.text import Text
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

def _console(stderr: bool = False, quiet: bool = False) -> Console:
    console = Console(stderr=stderr, quiet=quiet)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Captured output (DVC stage logs, CI): 80 columns would fold the result tables.
        console = Console(stderr=stderr, width=160, quiet=quiet)
    return console


# Under torchrun only rank 0 prints progress and results (errors still come from every rank).
_SECONDARY_RANK = os.environ.get("RANK", "0") not in ("", "0")
console = _console(quiet=_SECONDARY_RANK)
err_console = _console(stderr=True)


@contextlib.contextmanager
def progress_bar() -> Iterator[Progress]:
    """A progress bar that degrades to nothing on a non-terminal (DVC captures our output)."""
    progress = Progress(
        TextColumn("{task.description}", style="bold", markup=False),  # names of files: never markup
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}", markup=False),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )
    with progress:
        yield progress


def named_tasks(progress: Progress):
    """A callback (name, done, total) that keeps one bar per name (files, splits, archives)."""
    tasks: dict[str, int] = {}

    def update(name: str, done: int, total: int | None) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(name, total=total, info="")
        progress.update(tasks[name], completed=done, total=total)

    return update


def progress_lines(every_s: float = 15.0):
    """The non-terminal counterpart of `named_tasks` (DVC stage logs, CI): a plain line per name
    every `every_s` seconds and at completion, with the rate and the time left."""
    import time

    started: dict[str, float] = {}
    shown: dict[str, float] = {}

    def update(name: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        first = started.setdefault(name, now)
        finished = total is not None and done >= total
        if not finished and now - shown.get(name, first) < every_s:
            return
        shown[name] = now
        rate = done / (now - first) if now > first else 0.0
        line = f"{name}: {done}" + (f"/{total} ({100 * done / total:.1f}%)" if total else "")
        if rate > 0:
            line += f", {rate:.0f}/s"
            if total and not finished:
                line += f", about {(total - done) / rate / 60:.1f} min left"
        console.print(line, highlight=False, markup=False)

    return update


def print_result(title: str, result: dict) -> None:
    """A stage's summary as a two-column table (scalars only)."""
    from rich.table import Table

    table = Table(title=Text(title), show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, (int, float, str)):
            table.add_row(Text(key), Text(f"{value:.4g}" if isinstance(value, float) else str(value)))
    console.print(table)
