"""`sge-repro run all|STAGE` and `sge-repro status`: a rich view over `dvc repro` / `dvc status`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.live import Live
from rich.table import Table

from sge_repro import pipeline, run_lock
from sge_repro.cli.ui import console, err_console
from sge_repro.errors import UserError


_STYLE = {
    "pending": "dim", "running": "bold yellow", "done": "green", "skipped": "cyan",
    "restored": "cyan", "failed": "bold red",
}
_LABEL = {"skipped": "up to date", "restored": "restored from cache", "rescanned": "up to date (rescanned)"}
_STYLE["rescanned"] = "cyan"
DATA_STAGE = "data"  # always_changed in dvc.yaml: it rescans the datasets on every run


def _manifest_stamps() -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of the dataset manifests: the data stage leaves an unchanged one untouched."""
    from sge_repro.paths import ProjectPaths

    folder = ProjectPaths().manifests
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.glob("*.json"))} \
        if folder.is_dir() else {}


def _stage_table(stages: list[str], states: dict[str, str], times: dict[str, float]) -> Table:
    table = Table(title="sge-repro pipeline", show_lines=False)
    table.add_column("stage")
    table.add_column("state")
    table.add_column("time", justify="right")
    now = time.monotonic()
    for stage in stages:
        state = states.get(stage, "pending")
        started, ended = times.get(stage), times.get(stage + "/end")
        elapsed = "" if started is None else f"{(ended or now) - started:.1f}s"
        table.add_row(stage, f"[{_STYLE[state]}]{_LABEL.get(state, state)}[/]", elapsed)
    return table


def _run(targets: list[str], force: bool, stages: list[str]) -> None:
    shown = [s for s in stages if not targets or any(s == t or s.startswith(t + "@") for t in targets)]
    states: dict[str, str] = {}
    times: dict[str, float] = {}
    started = time.monotonic()
    tail: list[str] = []

    def on_event(event: pipeline.StageEvent) -> None:
        states[event.stage] = event.state
        if event.state == "running":
            times[event.stage] = event.at
        elif event.stage in times:
            times[event.stage + "/end"] = event.at
        if event.stage not in shown:
            shown.append(event.stage)

    def on_line(line: str) -> None:
        tail.append(line)
        del tail[:-30]

    manifests_before = _manifest_stamps()
    with Live(_stage_table(shown, states, times), console=console, refresh_per_second=4,
              transient=False) as live:
        def refresh(event: pipeline.StageEvent) -> None:
            on_event(event)
            if event.stage == DATA_STAGE and event.state == "done" and _manifest_stamps() == manifests_before:
                states[DATA_STAGE] = "rescanned"  # no dataset changed: not a stage that "ran"
            live.update(_stage_table(shown, states, times))

        code = pipeline.repro(targets, force=force, on_event=refresh, on_line=on_line)
        live.update(_stage_table(shown, states, times))
    console.print()
    elapsed = time.monotonic() - started
    if code != 0:
        explained = run_lock.explain_dvc_lock_error("\n".join(tail))
        if explained:  # a `dvc repro` started outside sge-repro got there first
            raise UserError(explained)
        err_console.print("\n".join(tail[-15:]), highlight=False, markup=False)
        raise UserError(f"dvc repro failed (exit {code}); full log: {pipeline.LOG_FILE}")
    ran = sum(1 for s in states.values() if s == "done")
    console.print(f"[green]pipeline finished[/] in {elapsed:.1f}s: {ran} stage(s) ran, "
                  f"{len(shown) - ran} up to date")


def run(
    target: str = typer.Argument(
        "all", help="`all`, a stage group (data, train_cls, eval_cls, convert, train_det, eval_det, report) "
                    "or one expanded stage such as train_cls@sge_resnet18-0."),
    profile: Optional[str] = typer.Option(
        None, "--profile", "-p",
        help="First rewrite params.yaml as defaults + pipelines/profiles/NAME.yaml (embedded, smoke, paper). "
             "Without it, params.yaml is used as it is."),
    force: bool = typer.Option(False, "--force", help="Rerun the stages even if up to date."),
    report: bool = typer.Option(True, "--report/--no-report", help="Print the result tables at the end of `all`."),
) -> None:
    """Run the pipeline (`dvc repro [STAGE]`) with a live view of the stages."""
    pipeline.require_dvc_project()
    targets = [] if target == "all" else [target]
    # Nothing is written (params.yaml, logs/) before the run lock is ours; it is held until
    # `dvc repro` exits, so a second run can neither mix profiles nor truncate this run's log.
    with run_lock.hold(" ".join(["sge-repro", *sys.argv[1:]])):
        name, changed = pipeline.apply_profile(profile)
        stages = pipeline.list_stages()
        for item in targets:
            pipeline.resolve_target(item, stages)
        console.print(f"profile [bold]{name}[/]" + (" (params.yaml rewritten)" if changed else ""))
        _run(targets, force, stages)
    if report and target == "all":
        from sge_repro.cli.report import print_saved_report

        print_saved_report(Path("."))


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
            table.add_row(stage, *data_note[stage])
        elif stage in stale:
            why = "; ".join(_reason(item) for item in stale[stage])
            table.add_row(stage, "[yellow]will run[/]", why)
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
    from sge_repro.params import load_params
    from sge_repro.paths import ProjectPaths
    from sge_repro.stages.data import data_changes

    changes = {name: why for name, why in data_changes(load_params(), ProjectPaths()).items() if why}
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
