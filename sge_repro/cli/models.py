"""`sge-repro models`: the model zoo with #params and GFLOPs (and latency on request)."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.table import Table

from sge_repro.cli.ui import console


def models(
    names: Optional[List[str]] = typer.Argument(None, help="Models to list (default: all)."),
    as_json: bool = typer.Option(False, "--json", help='JSON list of {"name","params_m","gflops"}.'),
    image_size: int = typer.Option(224, help="Input resolution for GFLOPs."),
    latency: bool = typer.Option(False, "--latency", help="Also measure forward latency (CPU, and CUDA if present)."),
    batch: int = typer.Option(1, help="Batch size for --latency."),
    repeats: int = typer.Option(5, min=5, help="Interleaved repeats for --latency (median reported)."),
) -> None:
    """#params (M) and GFLOPs (multiply-adds, fvcore, attention ops included) of every model."""
    from sge_repro.models import list_models
    from sge_repro.models.complexity import measure_latency, model_table

    chosen = names or list_models()
    if as_json and not latency:
        print(json.dumps(model_table(chosen, image_size=image_size)))
        return
    with console.status(f"counting parameters and FLOPs of {len(chosen)} models"):
        rows = model_table(chosen, image_size=image_size)
    timings: dict[str, dict] = {}
    if latency:
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            with console.status(f"measuring latency on {device}"):
                for item in measure_latency(chosen, batch=batch, image_size=image_size, device=device, repeats=repeats):
                    timings.setdefault(item["name"], {})[device] = item
    if as_json:
        for row in rows:
            row["latency"] = timings.get(row["name"], {})
        print(json.dumps(rows))
        return
    table = Table(title=f"sge-repro models ({image_size}x{image_size}, 1000 classes)")
    table.add_column("model")
    table.add_column("#params (M)", justify="right")
    table.add_column("GFLOPs", justify="right")
    latency_columns = sorted({d for t in timings.values() for d in t})
    for device in latency_columns:
        table.add_column(f"{device} ms (b={batch})", justify="right")
    for row in rows:
        cells = [row["name"], f"{row['params_m']:.3f}", f"{row['gflops']:.3f}"]
        for device in latency_columns:
            item = timings.get(row["name"], {}).get(device)
            cells.append(f"{item['median_ms']:.2f}" if item else "")
        table.add_row(*cells)
    console.print(table)
