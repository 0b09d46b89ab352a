"""`sge-repro`: the thin command line. Each command validates input, calls ONE library
function, and renders the result with rich. No training logic lives here."""

from __future__ import annotations

import sys

import typer

from rich.text import Text

from sge_repro.atomic import write_failure
from sge_repro.cli import bench, convert, data, env, evaluate, exp, models, report, run, train
from sge_repro.cli.ui import err_console
from sge_repro.errors import UserError

app = typer.Typer(
    name="sge-repro",
    help="Reproduce Spatial Group-wise Enhance (Li, Hu, Yang 2019): data, training, evaluation, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_state = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug


app.command("run")(run.run)
app.command("status")(run.status)
app.add_typer(exp.app, name="exp")
app.add_typer(data.app, name="data")
app.add_typer(train.app, name="train")
app.add_typer(evaluate.app, name="eval")
app.command("convert")(convert.convert)
app.command("convert-file")(convert.convert_file)
app.command("fetch-weights")(convert.fetch_weights)
app.command("import-cls")(evaluate.import_cls)
app.command("report")(report.report)
app.command("visualize")(report.visualize)
app.command("visualize-file")(report.visualize_file)
app.command("models")(models.models)
app.command("env")(env.env)
app.add_typer(bench.app, name="bench")


def main() -> None:
    try:
        app(standalone_mode=True)
    except (UserError, OSError) as exc:
        # a write that failed for want of space or permission (a full disk, a read-only project) is
        # the user's to fix, like bad input; other OS errors keep their traceback
        error = exc if isinstance(exc, UserError) else write_failure(exc)
        if error is None or _state["debug"] or "--debug" in sys.argv:
            raise
        # the message names files / keys / values as they are: never read as rich markup
        err_console.print(Text.assemble(("error:", "bold red"), " ", printable(str(error))), highlight=False,
                          soft_wrap=True)
        sys.exit(UserError.exit_code)


def printable(text: str) -> str:
    """`text` with control characters escaped (a newline or ESC in a key or a file name): the error
    stays one line and sends no terminal codes."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


if __name__ == "__main__":
    main()
