"""`sge-repro eval cls|det`: the eval_cls and eval_<detector> stages."""

from __future__ import annotations

import typer

from sge_repro.cli.ui import print_result
from sge_repro.params_yaml import load_params
from sge_repro.paths import ProjectPaths

app = typer.Typer(help="Evaluate a trained classifier or detector (one pipeline stage each).", no_args_is_help=True)


@app.command("cls")
def eval_cls(
    model: str = typer.Option(..., help="A name from params.yaml `models` (or `released`, seed 0)."),
    seed: int = typer.Option(0, help="A seed from params.yaml `seeds`."),
) -> None:
    """Top-1 / top-5 of one classifier's best checkpoint on the val split."""
    from sge_repro.stages.classification import eval_cls as stage

    params = load_params()
    result = stage(params, ProjectPaths(), model, seed)
    print_result(f"{model} (seed {seed}) on {params.data.classification.dataset_name} val", result)


def import_cls(
    model: str = typer.Option(..., help="A name from params.yaml `released`, e.g. sge_resnet50."),
) -> None:
    """The import_cls stage: a released checkpoint file (params.yaml `released`) as run seed 0 in
    runs/cls/, instead of training; `sge-repro eval cls --model M --seed 0` then evaluates it."""
    from sge_repro.stages.classification import import_cls as stage

    print_result(f"imported {model}", stage(load_params(), ProjectPaths(), model))


@app.command("det")
def eval_det(
    detector: str = typer.Option(..., help="A detector of params.yaml `detection` (faster_rcnn, mask_rcnn, cascade_rcnn, retinanet)."),
    backbone: str = typer.Option(..., help="A backbone params.yaml `detection` lists for the detector."),
    seed: int = typer.Option(0, help="A seed from params.yaml `seeds`."),
) -> None:
    """COCO AP (pycocotools) of one trained detector on the val split."""
    from sge_repro.stages.detection import eval_det as stage

    params = load_params()
    result = stage(params, ProjectPaths(), detector, backbone, seed)
    flat = {f"bbox {k}": v for k, v in result["bbox"].items()}
    flat.update({f"segm {k}": v for k, v in result.get("segm", {}).items()})
    print_result(f"{detector} + {backbone} (seed {seed}) on {params.data.detection.dataset_name} val", flat)
