"""`sge-repro data ...`: the data stage (generate or prepare the datasets params.yaml names)."""

from __future__ import annotations

import typer

from sge_repro.cli.ui import console
from sge_repro.errors import UserError

app = typer.Typer(help="Prepare the datasets the pipeline trains on.", no_args_is_help=True)


@app.command("prepare")
def prepare() -> None:
    """The `data` stage: build data/cls (ImageFolder) and data/det (COCO JSON) as params.yaml says."""
    from sge_repro.data.prepare import prepare_data
    from sge_repro.params import load_params
    from sge_repro.paths import ProjectPaths

    params = load_params()
    with console.status("preparing data"):
        manifest = prepare_data(params.data, ProjectPaths())
    for name, counts in manifest["datasets"].items():
        console.print(f"[bold]{name}[/]: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
