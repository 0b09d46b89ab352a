"""`sge-repro report` (the report stage) and `sge-repro visualize`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sge_repro.cli.ui import console


def report() -> None:
    """Collect every metrics file, compare with the paper, write reports/ and print the tables."""
    from sge_repro.cli.stage_context import stage_context
    from sge_repro.report import build_report, render_console, write_report

    ctx = stage_context()
    p = ctx.params.report
    result = build_report(ctx.paths.root, profile=ctx.params.profile, tolerance=p.tolerance,
                          bootstrap_samples=p.bootstrap_samples, seed=p.seed,
                          complexity=_complexity(ctx))
    write_report(result, ctx.paths.reports)
    render_console(result, console)
    console.print(f"wrote {ctx.paths.reports}/summary.json, report.md, report.html")


def _complexity(ctx):
    """#params / GFLOPs of the models as trained (width, classes, resolution of this profile)."""
    from sge_repro.models.complexity import model_complexity

    def complexity(name: str) -> dict:
        return model_complexity(name, num_classes=ctx.params.data.classification.num_classes,
                                image_size=ctx.params.eval_cls.image_size, **ctx.model_kwargs())

    return complexity


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
        from sge_repro.cli.stage_context import stage_context
        from sge_repro.report.visualize import visualize_trained_models

        ctx = stage_context()
        seed = ctx.params.seeds[0]
        written = visualize_trained_models(
            ctx.params.models, seed, lambda name, s: ctx.paths.cls_checkpoint(name, s, "best"),
            ctx.paths.cls_data / "val", ctx.paths.attention_maps, image_size=ctx.params.eval_cls.image_size)
    else:
        if model is None or checkpoint is None or image is None:
            raise UserError("visualize: give --model, --checkpoint and --image (or --trained for the pipeline stage)")
        from sge_repro.report.visualize import visualize_sge_checkpoint

        written = visualize_sge_checkpoint(model, checkpoint, image, out, layer=layer)
    for path in written:
        console.print(str(path))
