"""`sge-repro data ...`: the data stage, and preparing / fetching the real datasets."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from sge_repro.cli.ui import console, named_tasks, progress_bar, progress_lines

app = typer.Typer(help="Prepare the datasets the pipeline trains on.", no_args_is_help=True)


prepare_app = typer.Typer(help="The `data` stage, or one real dataset prepared by hand.")
app.add_typer(prepare_app, name="prepare")


@prepare_app.callback(invoke_without_command=True)
def prepare(context: typer.Context) -> None:
    """The `data` stage: index both datasets into data/manifests/{cls,det}.json, decoding only new or
    changed images (all cores); generates the embedded sets first."""
    if context.invoked_subcommand is not None:
        return
    from sge_repro.params_yaml import load_params
    from sge_repro.paths import ProjectPaths
    from sge_repro.stages.data import data as stage

    with progress_bar() as progress:
        callback = named_tasks(progress) if console.is_terminal else progress_lines()
        summary = stage(load_params(), ProjectPaths(), progress=callback)
    for kind, info in summary.items():
        console.print(Text.assemble((kind, "bold"), f" ({info['source']}, {info['root']}): {info['train']} train / "
                      f"{info['val']} val images, {info['corrupt']} corrupt left out, {info['decoded']} decoded now; "
                      f"manifest {info['manifest']}"), highlight=False)


@prepare_app.command("imagenet")
def prepare_imagenet(
    source: Path = typer.Option(
        ..., help="An ImageFolder tree (train/, val/) or a folder with the three official archives."),
    destination: Path = typer.Option(
        ..., help="Where the ImageFolder tree goes (outside the project; then set data.classification.source_path to it)."),
    subset: Optional[List[str]] = typer.Option(None, help="Synsets to keep (repeatable); default all 1000."),
) -> None:
    """ImageNet-1k from the official archives (MD5-checked) or an ImageFolder tree, into an ImageFolder tree."""
    from sge_repro.data.imagenet_archives import prepare_imagenet as prepare

    with progress_bar() as progress:
        task = progress.add_task("imagenet", total=None, info="")
        counts = prepare(source, destination, subset_classes=subset or None,
                         progress=lambda done, total: progress.update(task, completed=done, total=total))
    console.print(", ".join(f"{k} {v}" for k, v in counts.items()), markup=False)
    console.print(f"set data.classification.source_path: {destination.resolve()} (and source: imagenet) in params.yaml",
                  markup=False)


@app.command("fetch")
def fetch(
    dataset: str = typer.Argument(..., help="`coco` (COCO 2017: train2017, val2017, annotations)."),
    root: Path = typer.Option(Path("datasets/coco"), help="Where to put COCO (then set data.detection.source_path)."),
    base_url: str = typer.Option("http://images.cocodataset.org", help="Mirror to download from."),
    part: Optional[List[str]] = typer.Option(None, help="Only these parts (train2017, val2017, annotations)."),
) -> None:
    """Download the official COCO 2017 zips (resumable, MD5-checked, extracted safely)."""
    from sge_repro.data.download import fetch_coco
    from sge_repro.errors import UserError

    if dataset != "coco":
        raise UserError(f"data fetch: unknown dataset {dataset!r} (allowed: coco)")
    with progress_bar() as progress:
        result = fetch_coco(root, parts=tuple(part or ("train2017", "val2017", "annotations")),
                            base_url=base_url, progress=named_tasks(progress))
    for name, state in result["parts"].items():
        console.print(f"{name}: {state}", markup=False)
    console.print(f"COCO 2017 at {result['root']}: set data.detection.source_path to it", markup=False)
