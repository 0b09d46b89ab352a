"""`sge-repro convert` (the convert stage), `sge-repro fetch-weights` (the fetch_weights stage) and
`sge-repro convert-file` (one checkpoint file)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sge_repro.cli.ui import print_result


def convert(
    model: str = typer.Option(..., help="A detection backbone of params.yaml `detection`."),
    seed: int = typer.Option(0, help="A seed from params.yaml `seeds`."),
) -> None:
    """The convert stages: the backbone's ImageNet weights (the params.yaml convert list that names it:
    our runs/cls/<model>-seed<seed>, a given file, or torchvision's) -> detectron2 weights in runs/convert/."""
    from sge_repro.params_yaml import load_params
    from sge_repro.paths import ProjectPaths
    from sge_repro.stages.detection import convert as stage

    print_result("converted to detectron2 weights", stage(load_params(), ProjectPaths(), model, seed))


def fetch_weights(
    model: str = typer.Option(..., help="A backbone of params.yaml convert.torchvision (resnet50, resnet101)."),
) -> None:
    """The fetch_weights stage: torchvision's ImageNet weights, checksum-verified, into runs/pretrained/."""
    from sge_repro.params_yaml import load_params
    from sge_repro.paths import ProjectPaths
    from sge_repro.stages.detection import fetch_weights as stage

    print_result("torchvision weights", stage(load_params(), ProjectPaths(), model))


def convert_file(
    source: Path = typer.Argument(..., metavar="INPUT", help="Our checkpoint, a torchvision state dict, or the authors' release file."),
    output: Path = typer.Argument(..., metavar="OUTPUT", help="Where to write the detectron2 weights."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Model name when the file does not say (e.g. sge_resnet50)."),
) -> None:
    """Convert one classifier checkpoint file to detectron2 weights (outside the pipeline)."""
    from sge_repro.detection.convert import convert_classifier_to_detectron2

    print_result("converted to detectron2 weights", convert_classifier_to_detectron2(source, output, model_name=arch))
