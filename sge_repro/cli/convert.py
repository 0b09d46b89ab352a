"""`sge-repro convert`: a classification checkpoint -> detectron2 weights (the convert stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sge_repro.cli.ui import print_result


def convert(
    model: Optional[str] = typer.Option(None, help="Stage mode: a name from params.yaml `detection_backbones`."),
    seed: int = typer.Option(0, help="Stage mode: a seed from params.yaml `seeds`."),
    source: Optional[Path] = typer.Option(
        None, "--input", help="File mode: our checkpoint, a torchvision state dict, or the authors' release file."),
    output: Optional[Path] = typer.Option(None, "--output", help="File mode: where to write detectron2 weights."),
    arch: Optional[str] = typer.Option(None, "--arch", help="File mode: model name when the file does not say (e.g. sge_resnet50)."),
) -> None:
    """Convert a classifier to detectron2 weights: `--model M --seed S` (the stage), or `--input F --output O`."""
    from sge_repro.detection.convert import convert_classifier_to_detectron2
    from sge_repro.errors import UserError

    if source is not None:
        if output is None:
            raise UserError("convert: --input needs --output (where to write the detectron2 weights)")
        summary = convert_classifier_to_detectron2(source, output, model_name=arch)
    else:
        if model is None:
            raise UserError("convert: give --model/--seed (pipeline stage) or --input/--output (one file)")
        from sge_repro.params import load_params
        from sge_repro.paths import ProjectPaths
        from sge_repro.stages.detection import convert as stage

        summary = stage(load_params(), ProjectPaths(), model, seed)
    print_result("converted to detectron2 weights", summary)
