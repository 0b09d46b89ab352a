"""`sge-repro run all|STAGE` and `sge-repro status`: a rich view over `dvc repro` / `dvc status`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from sge_repro import pipeline, run_lock
from sge_repro.cli.ui import console, err_console
from sge_repro.errors import UserError
from sge_repro.paths import ProjectPaths
from sge_repro.stage_status import read_status


_STYLE = {
    "pending": "dim", "running": "bold yellow", "done": "green", "skipped": "cyan",
    "restored": "cyan", "rescanned": "cyan", "failed": "bold red",
}
_LABEL = {"skipped": "up to date", "restored": "restored from cache", "rescanned": "up to date (rescanned)"}
QUIET_AFTER_S = 120.0  # a running stage whose status file is older than this is flagged
_UNIT = {"step": "step", "iter": "it", "batch": "batch"}
DATA_STAGE = "data"  # always_changed in dvc.yaml: it rescans the datasets on every run


def _manifest_stamps() -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of the dataset manifests: the data stage leaves an unchanged one untouched."""
    folder = ProjectPaths().manifests
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.glob("*.json"))} \
        if folder.is_dir() else {}


def duration(seconds: float) -> str:
    """12.3s, 4m12s, 26h03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m{int(seconds % 60):02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def progress_text(record: dict, now: float, running: bool) -> str:
    """One line from a stage's status file, most important first: 37% ep 5/12 ETA 4m12s loss 1.23
    612 im/s val 45.2 (a running stage silent for QUIET_AFTER_S says so after its position)."""
    done, total = record.get("done") or 0, record.get("total")
    parts = []
    if total:
        parts.append(f"{100.0 * done / total:.0f}%")
    if record.get("epoch") is not None and record.get("epochs"):
        parts.append(f"ep {record['epoch']}/{record['epochs']}")
    elif total:
        parts.append(f"{_UNIT.get(record.get('unit'), record.get('unit') or '')} {done}/{total}".strip())
    elif running and record.get("phase") == "starting":
        parts.append("starting")
    quiet = now - float(record.get("updated") or now)
    if running and quiet > QUIET_AFTER_S:
        parts.append(f"no update for {duration(quiet)}")
    if running and record.get("eta_s") is not None:
        parts.append(f"ETA {duration(record['eta_s'])}")
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.3g}")
    if record.get("images_per_s"):
        parts.append(f"{record['images_per_s']:.3g} im/s" if record["images_per_s"] < 100
                     else f"{record['images_per_s']:.0f} im/s")
    if record.get("val_top1") is not None:
        parts.append(f"val {record['val_top1']:.1f}")
    elif record.get("phase") == "eval" and record.get("top1") is not None:
        parts.append(f"top-1 {record['top1']:.1f}")
    return " ".join(parts)


class PipelineView:
    """The live table of `sge-repro run`: each stage's state and time, and a running (or finished)
    stage's own progress read from its status file (logs/progress/<stage>.json). A rich
    renderable: rebuilt at each refresh, so progress moves between DVC's stage events."""

    READ_EVERY_S = 1.0
    # A status file that started before the stage did (by more than this) is its previous run's.
    CLOCK_SLACK_S = 2.0
    TIME_WIDTH = 6  # 59.9s, 4m12s, 26h03m

    def __init__(self, stages: list[str], progress_dir: Path, clock=time.monotonic, wall_clock=time.time):
        self.stages = stages
        self.progress_dir = Path(progress_dir)
        self.states: dict[str, str] = {}
        self.times: dict[str, list[float | None]] = {}  # stage -> [started, ended] (monotonic)
        self.clock, self.wall_clock = clock, wall_clock
        self.wall_started: dict[str, float] = {}
        self._records: dict[str, tuple[float, dict | None]] = {}

    def on_event(self, event: pipeline.StageEvent) -> None:
        self.states[event.stage] = event.state
        if event.state == "running":
            self.times[event.stage] = [event.at, None]
            self.wall_started[event.stage] = self.wall_clock()
        elif event.stage in self.times:
            self.times[event.stage][1] = event.at
        if event.stage not in self.stages:
            self.stages.append(event.stage)

    def _record(self, stage: str, state: str) -> dict | None:
        """The stage's status record: re-read every READ_EVERY_S while it runs, once after it ends."""
        if state not in ("running", "done", "failed"):
            return None
        now = self.clock()
        if stage in self._records:
            read_at, record = self._records[stage]
            ended = self.times.get(stage, [None, None])[1]
            if now - read_at < self.READ_EVERY_S if state == "running" else (ended is not None and read_at >= ended):
                return record
        record = read_status(self.progress_dir / f"{stage}.json")
        started = self.wall_started.get(stage)
        if record is not None and started is not None and float(record.get("started") or 0) < started - self.CLOCK_SLACK_S:
            record = None  # the file of an earlier run: this one has not written yet
        self._records[stage] = (now, record)
        return record

    def table(self, width: int = 100) -> Table:
        """The table at `width` columns: each row one line (long names and progress are cut with …)."""
        stage_width = min(max(len(s) for s in self.stages), max(12, int(width * 0.4)))
        table = Table(title="sge-repro pipeline", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("stage", no_wrap=True, overflow="ellipsis", width=stage_width)
        table.add_column("state / progress", no_wrap=True, overflow="ellipsis",
                         max_width=max(10, width - stage_width - self.TIME_WIDTH - 8))  # 8: edges, gaps
        table.add_column("time", justify="right", no_wrap=True, width=self.TIME_WIDTH)
        now, wall = self.clock(), self.wall_clock()
        for stage in self.stages:
            state = self.states.get(stage, "pending")
            started, ended = self.times.get(stage, [None, None])
            elapsed = "" if started is None else duration((ended or now) - started)
            label = _LABEL.get(state, state)
            record = self._record(stage, state)
            if record is not None:
                detail = progress_text(record, wall, running=state == "running")
                if detail:
                    label = detail if state == "running" else f"{label} · {detail}"
            table.add_row(Text(stage), Text(label, style=_STYLE[state]), elapsed)
        return table

    def __rich_console__(self, console, options):
        yield self.table(options.max_width)


def _run(targets: list[str], force: bool, stages: list[str], progress_dir: Path) -> None:
    shown = [s for s in stages if not targets or any(s == t or s.startswith(t + "@") for t in targets)]
    view = PipelineView(shown, progress_dir)
    started = time.monotonic()
    tail: list[str] = []
    cache_errors: list[str] = []

    def on_line(line: str) -> None:
        tail.append(line)
        del tail[:-30]
        if line.startswith("ERROR: failed to transfer"):
            cache_errors.append(line)

    manifests_before = _manifest_stamps()
    with Live(view, console=console, refresh_per_second=2, transient=False) as live:
        def refresh(event: pipeline.StageEvent) -> None:
            view.on_event(event)
            if event.stage == DATA_STAGE and event.state == "done" and _manifest_stamps() == manifests_before:
                view.states[DATA_STAGE] = "rescanned"  # no dataset changed: not a stage that "ran"
            live.refresh()

        code = pipeline.repro(targets, force=force, on_event=refresh, on_line=on_line)
        live.refresh()
    console.print()
    elapsed = time.monotonic() - started
    failure = pipeline.cache_failure(cache_errors)
    if failure is not None:  # whatever DVC's exit code: the stage looks done, its cache is not
        raise failure
    if code != 0:
        explained = run_lock.explain_dvc_lock_error("\n".join(tail))
        if explained:  # a `dvc repro` started outside sge-repro got there first
            raise UserError(explained)
        err_console.print("\n".join(tail[-15:]), highlight=False, markup=False)
        raise UserError(f"dvc repro failed (exit {code}); full log: {pipeline.LOG_FILE}")
    ran = sum(1 for s in view.states.values() if s == "done")
    console.print(f"[green]pipeline finished[/] in {duration(elapsed)}: {ran} stage(s) ran, "
                  f"{len(view.stages) - ran} up to date")


def run(
    target: str = typer.Argument(
        "all", help="`all`, a stage group (data, train_cls, eval_cls, convert, train_faster_rcnn, eval_retinanet, report, ...) "
                    "or one expanded stage such as train_cls@sge_resnet18-0."),
    profile: Optional[str] = typer.Option(
        None, "--profile", "-p",
        help="First rewrite params.yaml as defaults + pipelines/profiles/NAME.yaml (embedded, smoke, paper, released). "
             "Without it, params.yaml is used as it is."),
    force: bool = typer.Option(False, "--force", help="Rerun the stages even if up to date."),
    report: bool = typer.Option(True, "--report/--no-report", help="Print the result tables at the end of `all`."),
    wide: bool = typer.Option(False, "--wide", help="Print every column of the result tables, not the compact view."),
) -> None:
    """Run the pipeline (`dvc repro [STAGE]`) with a live view of the stages."""
    pipeline.require_dvc_project()
    targets = [] if target == "all" else [target]
    # Nothing is written (params.yaml, logs/) before the run lock is ours; it is held until
    # `dvc repro` exits, so a second run can neither mix profiles nor truncate this run's log.
    with run_lock.hold(" ".join(["sge-repro", *sys.argv[1:]])):
        name, changed, stages = pipeline.prepare_run(profile, targets)
        console.print(f"profile [bold]{escape(name)}[/]" + (" (params.yaml rewritten)" if changed else ""))
        _run(targets, force, stages, ProjectPaths().progress_dir)
    if report and target == "all":
        from sge_repro.report import load_saved_report, render_console

        render_console(load_saved_report(Path(".")), console, wide=wide)


def status() -> None:
    """Which stages are up to date and which would rerun (`dvc status`)."""
    pipeline.require_dvc_project()
    run_lock.refuse_if_busy()  # DVC's own answer would advise deleting a live run's lock
    pipeline.apply_profile(None)  # validate params.yaml first: a typo should be named here
    stages = pipeline.list_stages()
    stale = pipeline.stale_stages()
    data_note = _data_status(stale, stages)
    table = Table(title="pipeline status")
    table.add_column("stage")
    table.add_column("state")
    table.add_column("why")
    for stage in stages:
        if stage in data_note:
            state, why = data_note[stage]
            table.add_row(stage, state, Text(why))
        elif stage in stale:
            why = "; ".join(_reason(item) for item in stale[stage])
            table.add_row(stage, "[yellow]will run[/]", Text(why))
        else:
            table.add_row(stage, "[green]up to date[/]", "")
    console.print(table)


def _data_status(stale: dict, stages: list[str]) -> dict[str, tuple[str, str]]:
    """(state, why) of the data stage and of the stages a dataset change would rerun.

    DVC reports the data stage as "always changed" (it rescans the datasets on every run); a
    dry rescan (sizes + mtimes against the verification cache, nothing decoded or written) tells
    whether it would change a manifest."""
    if stale.get(DATA_STAGE) != ["always changed"]:
        return {}
    from sge_repro.data.prepare import pending_changes
    from sge_repro.params_yaml import load_params

    changes = {name: why for name, why in pending_changes(load_params().data, ProjectPaths()).items() if why}
    if not changes:
        return {DATA_STAGE: ("[green]up to date[/]", "rescanned: no dataset changed")}
    notes = {DATA_STAGE: ("[yellow]will run[/]", "; ".join(f"{name}: {why}" for name, why in changes.items()))}
    dependents = pipeline.manifest_dependents()
    for stage in stages:
        hit = [name for name in changes if stage.split("@", 1)[0] in dependents.get(name, ())]
        if hit and stage not in stale:
            notes[stage] = ("[yellow]may run[/]", f"if data/manifests/{hit[0]}.json changes (after the data stage)")
    return notes


def _reason(item) -> str:
    """One short phrase per kind of change, e.g. "changed deps: data/cls, params.yaml"."""
    if not isinstance(item, dict):
        return str(item)
    parts = []
    for kind, changes in item.items():
        names = list(changes) if isinstance(changes, dict) else [str(changes)]
        shown = ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")
        parts.append(f"{kind}: {shown}")
    return "; ".join(parts)
