"""The consolidated comparison report: our results vs the paper, with statistics, files and plots.

The CLI calls `build_report(root, profile, ...)` (collects metrics, writes reports/summary.json,
report.md, report.html) and then `render_console(report, console)`.
"""

from sge_repro.report.build import Report, build_report, load_saved_report, write_report
from sge_repro.report.render import render_console

__all__ = ["Report", "build_report", "load_saved_report", "render_console", "write_report"]
