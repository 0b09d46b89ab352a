"""`sge-repro train cls|det`: the train_cls and train_det stages."""

from __future__ import annotations

import typer
from rich.table import Table

from sge_repro.cli.stage_context import stage_context
from sge_repro.cli.ui import console, progress_bar

app = typer.Typer(help="Train a classifier or a detector (one pipeline stage each).", no_args_is_help=True)


@app.command("cls")
def train_cls(
    model: str = typer.Option(..., help="A name from params.yaml `models`, e.g. sge_resnet18."),
    seed: int = typer.Option(0, help="A seed from params.yaml `seeds`."),
) -> None:
    """Train one classifier on data/cls; resumes from runs/cls/<model>-seed<seed>/last.pt."""
    from sge_repro.classification.engine import train_classifier

    ctx = stage_context()
    ctx.require_model(model)
    ctx.require_seed(seed)
    p, paths = ctx.params.train_cls, ctx.paths
    with progress_bar() as progress:
        task = progress.add_task(f"train {model}", total=None, info="")

        def on_progress(epoch: int, step: int, total_steps: int, info: dict) -> None:
            progress.update(task, total=total_steps * p.epochs, completed=(epoch - 1) * total_steps + step,
                            info=" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()))

        result = train_classifier(
            model, ctx.model_kwargs(), paths.cls_data, paths.cls_run_dir(model, seed),
            paths.cls_train_metrics(model, seed), paths.cls_history(model, seed),
            epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, momentum=p.momentum,
            weight_decay=p.weight_decay, no_weight_decay_on_bn_bias=p.no_weight_decay_on_bn_bias,
            lr_schedule=p.lr_schedule, milestones=p.milestones, warmup_epochs=p.warmup_epochs,
            label_smoothing=p.label_smoothing, grad_clip_norm=p.grad_clip_norm,
            image_size=p.image_size, random_crop_min_scale=p.min_crop_scale,
            workers=p.workers, seed=seed, device=p.device, skip_corrupt=ctx.params.data.skip_corrupt,
            amp=p.amp, channels_last=p.channels_last, compile=p.compile, sync_bn=p.sync_bn,
            dataset_name=ctx.cls_dataset, progress=on_progress,
        )
    _print_result(f"trained {model} (seed {seed})", result)


@app.command("det")
def train_det(
    detector: str = typer.Option(..., help="A name from params.yaml `detectors`, e.g. faster_rcnn."),
    backbone: str = typer.Option(..., help="A name from params.yaml `detection_backbones`."),
    seed: int = typer.Option(0, help="A seed from params.yaml `seeds`."),
) -> None:
    """Train one detector in detectron2 from the converted classifier; resumes from its last checkpoint."""
    from sge_repro.detection.stages import train_detection_stage

    ctx = stage_context()
    ctx.require_detection_run(detector, backbone, seed)
    result = train_detection_stage(ctx, detector, backbone, seed)
    _print_result(f"trained {detector} with {backbone} (seed {seed})", result)


def _print_result(title: str, result: dict) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, (int, float, str)):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
