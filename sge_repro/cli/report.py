"""`sge-repro report` (the report stage) and `sge-repro visualize`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sge_repro.cli.ui import console


def report(wide: bool = typer.Option(False, "--wide", help="Print every column (as report.md / report.html), "
                                                          "not the compact tables.")) -> None:
    """Collect every metrics file, compare with the paper, write reports/ and print the tables."""
    from sge_repro.params_yaml import load_params
    from sge_repro.paths import ProjectPaths
    from sge_repro.report import render_console
    from sge_repro.stages.report import report as stage

    render_console(stage(load_params(), ProjectPaths()), console, wide=wide)  # lists the files the stage wrote


def visualize() -> None:
    """The visualize stage: SGE attention maps of every trained SGE model of params.yaml, into runs/visualize."""
    from sge_repro.params_yaml import load_params
    from sge_repro.paths import ProjectPaths
    from sge_repro.stages.report import visualize as stage

    for path in stage(load_params(), ProjectPaths()):
        console.print(str(path), markup=False)


def visualize_file(
    model: str = typer.Option(..., help="Model name, e.g. sge_resnet50."),
    checkpoint: Path = typer.Option(..., help="Checkpoint of that model (ours, torchvision or official)."),
    image: Path = typer.Option(..., help="An image file."),
    layer: Optional[str] = typer.Option(None, help="Block whose SGE to show, e.g. layer3.1 (default: the last one of each stage)."),
    out: Path = typer.Option(Path("reports/visualize"), help="Output folder for the PNGs."),
) -> None:
    """PNGs of the SGE attention per group of one checkpoint on one image: feature map before, the gate, after."""
    from sge_repro.report.visualize import visualize_sge_checkpoint

    for path in visualize_sge_checkpoint(model, checkpoint, image, out, layer=layer):
        console.print(str(path), markup=False)
