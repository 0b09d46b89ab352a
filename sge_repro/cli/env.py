"""`sge-repro env`: what this installation runs on."""

from __future__ import annotations

import json
import platform

import typer
from rich.table import Table

from sge_repro.cli.ui import console


def environment() -> dict[str, str]:
    import torch
    import torchvision

    from sge_repro import __version__

    info = {
        "sge-repro": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda available": str(torch.cuda.is_available()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "cuda (torch built with)": str(torch.version.cuda),
    }
    try:
        from sge_repro.detection.compat import detectron2_info

        d2 = detectron2_info()
        info["detectron2"] = f"{d2.get('version')} - {d2.get('build')}"
        info["detectron2 path"] = str(d2.get("path"))
    except Exception as exc:  # noqa: BLE001 - env must report, not fail
        info["detectron2"] = f"not importable: {exc}"
    for package in ("dvc", "pycocotools", "fvcore", "typer", "rich"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:  # noqa: BLE001
            info[package] = "not installed"
    return info


def env(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Versions of torch, torchvision, detectron2 (and which build), CUDA / device, DVC."""
    info = environment()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title="sge-repro environment", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in info.items():
        table.add_row(key, value)
    console.print(table)
