"""The report's plots as PNG bytes (matplotlib, no display): training curves and the gains."""

from __future__ import annotations

import io
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sge_repro.report.reference import is_paper_dataset, official_log
from sge_repro.report.schema import CurveSet, Report


def png(figure: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes, drawn off-screen; no software / date tag, so equal figures are equal bytes."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


@dataclass(frozen=True)
class Series:
    """One line of a training-curve plot."""

    panel: str  # "loss" or "top1"
    label: str
    epochs: tuple[float, ...]
    values: tuple[float, ...]
    authors: bool = False  # from the authors' released log


def curve_series(curve: CurveSet) -> list[Series]:
    """The lines of a model's training-curve plot: ours per seed; on ImageNet also the authors' log."""
    series = []
    for seed, rows in sorted(curve.histories.items()):
        epochs = [r.get("epoch", float(i)) for i, r in enumerate(rows)]
        for panel, key in (("loss", "train_loss"), ("loss", "val_loss"), ("top1", "val_top1")):
            points = [(e, r[key]) for e, r in zip(epochs, rows) if key in r]
            if points:
                xs, ys = zip(*points)
                series.append(Series(panel, f"ours seed {seed} {key}", xs, ys))
    if curve.dataset is not None and is_paper_dataset(curve.dataset, "cls"):
        authors = official_log(curve.model)
        if authors:
            epochs = tuple(r["epoch"] for r in authors)
            series.append(Series("loss", "authors train_loss", epochs, tuple(r["train_loss"] for r in authors), True))
            series.append(Series("loss", "authors val_loss", epochs, tuple(r["val_loss"] for r in authors), True))
            series.append(Series("top1", "authors val_top1", epochs, tuple(r["val_top1"] for r in authors), True))
    return series


def curve_figure(curve: CurveSet) -> bytes:
    """Loss and validation top-1 per epoch (PNG bytes)."""
    figure = Figure(figsize=(9, 3.2))
    axes = dict(zip(("loss", "top1"), figure.subplots(1, 2)))
    for line in curve_series(curve):
        style = ("-." if "val_loss" in line.label else ":") if line.authors else ("--" if "val_loss" in line.label else "-")
        color = "black" if line.authors else None
        axes[line.panel].plot(line.epochs, line.values, style, color=color, label=line.label)
    axes["loss"].set(title=f"{curve.model}: loss", xlabel="epoch", ylabel="loss")
    axes["top1"].set(title=f"{curve.model}: validation top-1 ({curve.dataset or 'dataset unknown'})",
                     xlabel="epoch", ylabel="top-1 %")
    for axis in axes.values():
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    return png(figure)


def gains_figure(report: Report) -> bytes | None:
    """Horizontal bars of every gain over the plain baseline, CI whiskers, the paper's gain as x."""
    entries = [
        (f"{r.model} top-1 ({r.dataset})", r.gain, r.paper_gain) for r in report.classification if r.gain is not None
    ] + [
        (f"{r.detector} {r.backbone} AP ({r.dataset})", r.gain, r.paper_gain) for r in report.detection if r.gain is not None
    ]
    if not entries:
        return None
    figure = Figure(figsize=(8, 0.5 * len(entries) + 1.2))
    axis = figure.subplots()
    positions = list(range(len(entries)))[::-1]
    for y, (_, gain, paper_gain) in zip(positions, entries):
        has_ci = gain.low is not None and gain.high is not None
        error = [[gain.estimate - gain.low], [gain.high - gain.estimate]] if has_ci else None
        axis.barh(y, gain.estimate, xerr=error, color="tab:blue" if has_ci else "tab:gray", capsize=4, height=0.6)
        if paper_gain is not None:
            axis.plot([paper_gain], [y], "x", color="tab:red", markersize=9)
    axis.plot([], [], "x", color="tab:red", label="paper's gain")
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_yticks(positions, [label for label, _, _ in entries], fontsize=8)
    axis.set(xlabel="gain over the plain ResNet (points); whiskers: 95% bootstrap CI; grey: single run",
             title="Gain of the attention models")
    axis.legend(fontsize=8, loc="lower right")
    axis.grid(axis="x", alpha=0.3)
    return png(figure)
