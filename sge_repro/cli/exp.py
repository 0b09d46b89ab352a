"""`sge-repro exp run`: a DVC experiment whose params sge-repro has validated first;
`sge-repro exp ablate`: the paper's SGE ablations as DVC experiments, and their table."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="DVC experiments (`dvc exp run`) with params.yaml validated first, and the paper's "
                       "SGE ablations.", no_args_is_help=True)


@app.command("run")
def run(
    targets: Optional[list[str]] = typer.Argument(None, help="Stages to reproduce (default: the whole pipeline)."),
    set_param: Optional[list[str]] = typer.Option(None, "--set-param", "-S", help=(
        "KEY=VALUE as for `dvc exp run -S`, e.g. -S model.groups=4 -S 'seeds=[0, 1, 2]' (repeatable).")),
    queue: bool = typer.Option(False, "--queue", help="Queue it (`dvc queue start` runs the queue)."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="The experiment's name."),
) -> None:
    """`dvc exp run` with the -S values written into params.yaml first and validated, and the files
    it names checked: a mistake is one line before any stage runs (plain `dvc exp run -S` works
    too, and finds it at the first stage that reads it)."""
    from sge_repro.pipeline import run_experiment

    code = run_experiment(list(set_param or []), list(targets or []), queue=queue, name=name)
    if code:
        raise typer.Exit(code)


@app.command("ablate")
def ablate(
    model: Optional[str] = typer.Option(None, "--model", help="The SGE model (default: the first SGE model of "
                                                              "params.yaml's models)."),
    groups: Optional[list[int]] = typer.Option(None, "--groups", "-g", help=(
        "A G of the sweep (repeatable; default 1, 2, 4, ... up to the largest power of two dividing every SGE "
        "block's channels). params.yaml's model.groups is always in it.")),
) -> None:
    """Run the paper's SGE ablations on top of the current commit as DVC experiments, one after the
    other (the G sweep; at params.yaml's G: gamma initialised to 1, no normalisation; the plain
    ResNet), then write reports/ablation.md / .json: top-1 with 95% CIs, the gain over the plain
    model and the authors' conclusions marked held / not held / not significant. Rerun to resume
    or to reprint."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from sge_repro.ablation import CLAIM_HEADERS, ROW_HEADERS, ablate as run_ablation, cells, title
    from sge_repro.cli.ui import console
    from sge_repro.params_yaml import load_params
    from sge_repro.pipeline import require_dvc_project

    def starting(variant, index: int, total: int) -> None:
        console.print(Text(f"experiment {index + 1}/{total}: {variant.name} ({variant.label()})", style="bold"))

    require_dvc_project()
    result, written = run_ablation(load_params(), model, list(groups or []) or None, starting)
    for headers, rows, name in zip((ROW_HEADERS, CLAIM_HEADERS), cells(result), (title(result), "The authors' conclusions")):
        out = Table(title=Text(name), title_justify="left", header_style="bold", box=box.SIMPLE_HEAD)
        for header in headers:
            out.add_column(Text(header))
        for row in rows:
            out.add_row(*(Text(cell) for cell in row))
        console.print(out)
    for path in written:
        console.print(str(path), markup=False)
