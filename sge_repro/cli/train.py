"""`sge-repro train cls|det`: the train_cls and train_<detector> stages."""

from __future__ import annotations

import typer

from sge_repro.cli.ui import print_result, progress_bar
from sge_repro.params_yaml import load_params
from sge_repro.paths import ProjectPaths

app = typer.Typer(help="Train a classifier or a detector (one pipeline stage each).", no_args_is_help=True)


@app.command("cls")
def train_cls(
    model: str = typer.Option(..., help="A name from params.yaml `models`, e.g. sge_resnet18."),
    seed: int = typer.Option(0, help="A seed from params.yaml `seeds`."),
) -> None:
    """Train one classifier on data/cls; resumes from runs/cls/<model>-seed<seed>/last.pt."""
    from sge_repro.launch import runs_in_process
    from sge_repro.stages.classification import train_cls as stage

    params = load_params()
    epochs = params.train_cls.epochs
    if not runs_in_process(params.launch):  # launched workers: rank 0 prints a line per epoch
        result = stage(params, ProjectPaths(), model, seed)
        print_result(f"trained {model} (seed {seed})", result)
        return
    with progress_bar() as progress:
        task = progress.add_task(f"train {model}", total=None, info="")

        def on_progress(epoch: int, step: int, total_steps: int, info: dict) -> None:
            progress.update(task, total=total_steps * epochs, completed=(epoch - 1) * total_steps + step,
                            info=" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()))

        result = stage(params, ProjectPaths(), model, seed, progress=on_progress)
    print_result(f"trained {model} (seed {seed})", result)


@app.command("det")
def train_det(
    detector: str = typer.Option(..., help="A detector of params.yaml `detection` (faster_rcnn, mask_rcnn, cascade_rcnn, retinanet)."),
    backbone: str = typer.Option(..., help="A backbone params.yaml `detection` lists for the detector."),
    seed: int = typer.Option(0, help="A seed from params.yaml `seeds`."),
) -> None:
    """Train one detector in detectron2 from the converted classifier; resumes from its last checkpoint."""
    from sge_repro.stages.detection import train_det as stage

    result = stage(load_params(), ProjectPaths(), detector, backbone, seed)
    print_result(f"trained {detector} with {backbone} (seed {seed})", result)
