"""`sge-repro eval cls|det`: the eval_cls and eval_det stages."""

from __future__ import annotations

import typer

from sge_repro.cli.stage_context import stage_context
from sge_repro.cli.train import _print_result

app = typer.Typer(help="Evaluate a trained classifier or detector (one pipeline stage each).", no_args_is_help=True)


@app.command("cls")
def eval_cls(
    model: str = typer.Option(..., help="A name from params.yaml `models`."),
    seed: int = typer.Option(0, help="A seed from params.yaml `seeds`."),
) -> None:
    """Top-1 / top-5 of one classifier's best checkpoint on the val split."""
    from sge_repro.classification.engine import evaluate_classifier

    ctx = stage_context()
    ctx.require_model(model)
    ctx.require_seed(seed)
    p, paths = ctx.params.eval_cls, ctx.paths
    result = evaluate_classifier(
        paths.cls_checkpoint(model, seed, "best"), paths.cls_data, paths.cls_metrics(model, seed),
        paths.cls_predictions(model, seed), image_size=p.image_size, batch_size=p.batch_size,
        workers=p.workers, device=p.device, dataset_name=ctx.cls_dataset, seed=seed, model_name=model,
        skip_corrupt=ctx.params.data.skip_corrupt, amp=p.amp, channels_last=p.channels_last,
    )
    _print_result(f"{model} (seed {seed}) on {ctx.cls_dataset} val", result)


@app.command("det")
def eval_det(
    detector: str = typer.Option(..., help="A name from params.yaml `detectors`."),
    backbone: str = typer.Option(..., help="A name from params.yaml `detection_backbones`."),
    seed: int = typer.Option(0, help="A seed from params.yaml `seeds`."),
) -> None:
    """COCO AP (pycocotools) of one trained detector on the val split."""
    from sge_repro.detection.stages import evaluate_detection_stage

    ctx = stage_context()
    ctx.require_detection_run(detector, backbone, seed)
    result = evaluate_detection_stage(ctx, detector, backbone, seed)
    flat = {f"bbox {k}": v for k, v in result["bbox"].items()}
    flat.update({f"segm {k}": v for k, v in result.get("segm", {}).items()})
    _print_result(f"{detector} + {backbone} (seed {seed}) on {ctx.det_dataset} val", flat)
