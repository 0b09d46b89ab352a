"""What made a report: code (git commit, dirty or not), params.yaml's hash, the profile, package
versions, hardware, and each stage's last run (from its status file, sge_repro.stage_status).

Everything here is a function of the code, the environment and the stages' last runs, never of
the clock at report time: rebuilding the report with nothing changed writes the same bytes, so
DVC keeps the report stage up to date (a timestamp here would mark reports/ changed each time).
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable

import torch
import torchvision

from sge_repro import __version__
from sge_repro.data.download import file_digest
from sge_repro.detection.compat import detectron2_info
from sge_repro.stage_status import read_status

PACKAGES = ("dvc", "numpy", "pycocotools", "fvcore", "tensorboard")
MAX_CHANGED_FILES = 20
# What `dvc repro` itself writes into the git tree (committed with the results, DVC's way): a
# change there is a result, not a change of code or params, so it does not make the tree dirty.
PIPELINE_PRODUCTS = ("dvc.lock", "metrics/", "plots/")


def git_state(root: Path) -> dict[str, Any]:
    """{"commit", "dirty", "changed"}: HEAD, whether tracked or new (not ignored) files other than
    the PIPELINE_PRODUCTS differ from it, and which (at most MAX_CHANGED_FILES); None values
    outside a git work tree."""
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout if result.returncode == 0 else None

    commit = git("rev-parse", "--verify", "-q", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=all")
    changed = [line[3:] for line in (status or "").splitlines()
               if len(line) > 3 and not line[3:].startswith(PIPELINE_PRODUCTS)]
    return {"commit": commit.strip() if commit else None,
            "dirty": None if status is None else bool(changed),
            "changed": sorted(changed)[:MAX_CHANGED_FILES]}


def file_sha256(path: Path) -> str | None:
    try:
        return file_digest(Path(path), "sha256")
    except OSError:
        return None


def package_versions() -> dict[str, str]:
    """python, sge-repro, torch's CUDA / cuDNN, detectron2 (version and which build), and PACKAGES."""
    # torch's own version strings carry the build (e.g. 2.14.1+cu130)
    versions = {"python": platform.python_version(), "sge-repro": __version__, "torch": torch.__version__,
                "torchvision": torchvision.__version__}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    versions["cuda (torch built with)"] = str(torch.version.cuda)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    versions["cudnn"] = str(cudnn)
    try:
        info = detectron2_info()
        versions["detectron2"] = f"{info.get('version')} ({info.get('build')})"
    except Exception as error:  # noqa: BLE001 - provenance reports, it does not fail the report
        versions["detectron2"] = f"not importable: {type(error).__name__}"
    return versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """The machine building the report: CPU model and count, GPU models and count, OS."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count() or 0, "gpus": gpus, "gpu_count": len(gpus),
            "platform": platform.platform()}


def stage_runs(progress_dir: Path, stages: Iterable[str]) -> list[dict[str, Any]]:
    """The last recorded run of each stage that wrote a status file: state, wall time, when it
    finished (UTC), host, processes, devices."""
    runs = []
    for stage in stages:
        record = read_status(Path(progress_dir) / f"{stage}.json")
        if record is None:
            continue
        try:
            elapsed, updated = float(record.get("elapsed_s") or 0.0), float(record.get("updated") or 0.0)
            run = {
                "stage": stage,
                "state": str(record.get("state")),
                "wall_time_s": round(elapsed, 3),
                "finished": datetime.fromtimestamp(updated, timezone.utc).isoformat(timespec="seconds"),
                "host": str(record.get("host", "")),
                "world_size": int(record.get("world_size") or 1),
                "devices": str(record.get("devices", "")),
            }
        except (TypeError, ValueError, OverflowError, OSError):
            continue  # a status file is a view of a run, not its result: a damaged one is left out, as an unreadable one
        if math.isfinite(elapsed):
            runs.append(run)
    return runs


def collect(root: Path, params_file: Path, profile: str, progress_dir: Path, stages: Iterable[str]) -> dict[str, Any]:
    """Everything above, as summary.json's `provenance`."""
    git = git_state(root)
    return {
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "git_changed": git["changed"],
        "params_sha256": file_sha256(params_file),
        "profile": profile,
        "packages": package_versions(),
        "hardware": hardware(),
        "stages": stage_runs(progress_dir, stages),
    }
