"""`sge-repro env`: what this installation runs on."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from sge_repro.cli.ui import console
from sge_repro.cuda_support import cuda_problem, probe


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


def lock_status(lock: Path) -> tuple[bool, str, list[str]]:
    """(matches, one-line summary, the differences) of the installed packages against the lock."""
    from sge_repro.requirements_lock import compare, installed_distributions, read_lock

    locked = read_lock(lock)
    result = compare(locked, installed_distributions())
    if result.matches:
        return True, f"matches {lock.name} ({len(locked)} packages)", []
    summary = (f"differs from {lock.name}: {len(result.missing)} missing, {len(result.different)} at another "
               f"version, {len(result.extra)} not in the lock")
    details = ([f"missing {item}" for item in result.missing] + [f"version {item}" for item in result.different]
               + [f"extra {item}" for item in result.extra])
    return False, summary, details


def env(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    lock: Path = typer.Option(None, "--lock", help="Lock file to compare with [default: the checkout's requirements.lock]."),
    check: bool = typer.Option(False, "--check", help="Exit 1 when the installed packages differ from the lock, "
                                                    "or this torch build cannot use the GPU / driver here."),
) -> None:
    """Versions of torch, torchvision, detectron2 (and which build), CUDA / device, DVC; the lock check."""
    from sge_repro.requirements_lock import default_lock_path

    info = environment()
    matches, summary, details = lock_status(lock or default_lock_path())
    info["packages"] = summary
    gpu_problem = cuda_problem(**probe())
    info["gpu support"] = gpu_problem or "ok (or no NVIDIA GPU here)"
    if as_json:
        print(json.dumps({**info, "lock_differences": details}, indent=2))
    else:
        table = Table(title="sge-repro environment", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        for key, value in info.items():
            table.add_row(key, Text(str(value)))
        console.print(table)
        for line in details:
            console.print(f"  {line}", highlight=False, markup=False)
    if check and (not matches or gpu_problem):
        raise typer.Exit(1)
