"""The consolidated comparison report: our results vs the paper, with statistics, files and plots.

`build_report(root, profile, ...)` collects the metrics and computes the comparison (no writes);
`write_report_files(report, reports_dir)` writes reports/summary.json, report.md and report.html;
`render_console(report, console)` prints the tables. reports/summary.json is `schema.Summary`.
"""

from sge_repro.report.build import build_report, load_saved_report
from sge_repro.report.files import write_report_files
from sge_repro.report.render import render_console
from sge_repro.report.schema import Report, Summary

__all__ = ["Report", "Summary", "build_report", "load_saved_report", "render_console", "write_report_files"]
