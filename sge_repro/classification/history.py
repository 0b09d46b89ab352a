"""The per-epoch history of a training run (a TSV, DVC's plot) and the final metrics JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from sge_repro import atomic

HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                   "images_per_s", "epoch_time_s")


def write_history(path: Path, rows: list[dict]) -> None:
    lines = ["\t".join(HISTORY_COLUMNS)]
    for row in rows:
        lines.append("\t".join(_format_cell(row[column]) for column in HISTORY_COLUMNS))
    atomic.write_text(path, "\n".join(lines) + "\n")


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def final_metrics(model_name: str, dataset_name: str, seed: int, history: list[dict], best: dict,
                  num_train: int, num_val: int, skipped: int, model: nn.Module) -> dict:
    """The metrics JSON of a finished run: the last epoch's validation, the best epoch, timing."""
    final = history[-1]
    return {
        "model": model_name,
        "dataset": dataset_name,
        "seed": seed,
        "epochs": len(history),
        "top1": final["val_top1"],
        "top5": final["val_top5"],
        "loss": final["val_loss"],
        "train_loss": final["train_loss"],
        "train_top1": final["train_top1"],
        "best_epoch": best["epoch"],
        "best_top1": best["top1"],
        "best_top5": best["top5"],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_time_s": sum(row["epoch_time_s"] for row in history),
        "images_per_s": sum(row["images_per_s"] for row in history) / len(history),
        "num_train_images": num_train,
        "num_val_images": num_val,
        "skipped_corrupt": skipped,
    }
