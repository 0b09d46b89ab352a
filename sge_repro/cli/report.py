"""`sge-repro report` (the report stage) and `sge-repro visualize`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sge_repro.cli.ui import console


def report() -> None:
    """Collect every metrics file, compare with the paper, write reports/ and print the tables."""
    from sge_repro.params import load_params
    from sge_repro.paths import ProjectPaths
    from sge_repro.report import render_console
    from sge_repro.stages.report import report as stage

    render_console(stage(load_params(), ProjectPaths()), console)  # lists the files the stage wrote


def print_saved_report(root: Path) -> None:
    """Print the tables of an existing report (after `run all`) without rewriting any file."""
    from sge_repro.report import load_saved_report, render_console

    render_console(load_saved_report(root), console)


def visualize(
    model: Optional[str] = typer.Option(None, help="Model name, e.g. sge_resnet18."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint of that model (ours, torchvision or official)."),
    image: Optional[Path] = typer.Option(None, help="An image file."),
    layer: Optional[str] = typer.Option(None, help="Block whose SGE to show, e.g. layer3.1 (default: the last one of each stage)."),
    out: Path = typer.Option(Path("reports/visualize"), help="Output folder for the PNGs."),
    trained: bool = typer.Option(False, "--trained", help="The `visualize` stage: every trained SGE model of params.yaml on a few val images, into runs/visualize."),
) -> None:
    """PNGs of the SGE attention per group: feature map before, the gate, after."""
    from sge_repro.errors import UserError

    if trained:
        from sge_repro.params import load_params
        from sge_repro.paths import ProjectPaths
        from sge_repro.stages.report import visualize as stage

        written = stage(load_params(), ProjectPaths())
    else:
        if model is None or checkpoint is None or image is None:
            raise UserError("visualize: give --model, --checkpoint and --image (or --trained for the pipeline stage)")
        from sge_repro.report.visualize import visualize_sge_checkpoint

        written = visualize_sge_checkpoint(model, checkpoint, image, out, layer=layer)
    for path in written:
        console.print(str(path))
