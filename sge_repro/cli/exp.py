"""`sge-repro exp run`: a DVC experiment whose params sge-repro has validated and completed."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="DVC experiments (`dvc exp run`) with params.yaml validated and its derived keys "
                       "brought up to date.", no_args_is_help=True)


@app.command("run")
def run(
    targets: Optional[list[str]] = typer.Argument(None, help="Stages to reproduce (default: the whole pipeline)."),
    set_param: Optional[list[str]] = typer.Option(None, "--set-param", "-S", help=(
        "KEY=VALUE as for `dvc exp run -S`, e.g. -S model.groups=4 -S 'seeds=[0, 1, 2]' (repeatable).")),
    queue: bool = typer.Option(False, "--queue", help="Queue it (`dvc queue start` runs the queue)."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="The experiment's name."),
) -> None:
    """`dvc exp run` with the -S values written into params.yaml first, validated, with the keys
    sge-repro derives (convert.inputs / downloads) updated: DVC's own -S leaves them stale when
    seeds, detection_backbones or convert.* change."""
    from sge_repro.pipeline import run_experiment

    code = run_experiment(list(set_param or []), list(targets or []), queue=queue, name=name)
    if code:
        raise typer.Exit(code)
