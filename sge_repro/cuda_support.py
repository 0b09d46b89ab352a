"""Whether this torch build can run on this machine's NVIDIA GPU and driver (`sge-repro env`).

torch's wheels carry kernels for a list of GPU architectures (`torch.cuda.get_arch_list()`) and
need a driver that supports their CUDA version. A mismatch shows only as a CUDA error deep in the
first stage (or as CUDA unavailable), so `sge-repro env --check` compares them up front and says
the way out in one line. The CUDA-13 builds (requirements.lock: torch 2.14.1+cu130) have no
kernels for Volta (sm_70, V100) and need a driver >= 580; the same torch version built for CUDA 12
has both (README: "GPU clusters")."""

from __future__ import annotations

import re
import shutil
import subprocess

CUDA12_BUILD = ("reinstall torch and torchvision at the locked versions built for CUDA 12: "
                "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126")


def _version(text: str | None) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_problem(capability: tuple[int, int] | None, arch_list: list[str], built_cuda: str | None,
                 driver_cuda: str | None) -> str | None:
    """One line saying why this torch build cannot use this GPU / driver and what to do; None when
    it can (or when there is no GPU to judge). `capability`: the GPU's (major, minor); `arch_list`:
    torch.cuda.get_arch_list(); `built_cuda`: torch.version.cuda; `driver_cuda`: the newest CUDA
    version the driver supports (nvidia-smi's "CUDA Version")."""
    built, driver = _version(built_cuda), _version(driver_cuda)
    if built is not None and driver is not None and driver[0] < built[0]:
        return (f"the NVIDIA driver supports CUDA up to {driver_cuda}, this torch is built for CUDA {built_cuda}: "
                f"update the driver, or {CUDA12_BUILD}")
    if capability is None or not arch_list:
        return None
    major, minor = capability
    kernels = [int(arch[3:]) for arch in arch_list if arch.startswith("sm_") and arch[3:].isdigit()]
    ptx = [int(arch[8:]) for arch in arch_list if arch.startswith("compute_") and arch[8:].isdigit()]
    ours = major * 10 + minor
    # a binary kernel runs on its own architecture and later minor ones of the same major (sm_80 on
    # sm_86); PTX is compiled for any later architecture by the driver
    if any(k // 10 == major and k <= ours for k in kernels) or any(p <= ours for p in ptx):
        return None
    return (f"this GPU is sm_{ours}, and this torch (built for CUDA {built_cuda}) has kernels for "
            f"{', '.join(arch_list)} only: {CUDA12_BUILD}")


def probe() -> dict:
    """What cuda_problem needs, from torch and nvidia-smi (empty values where there is no GPU)."""
    import torch

    found: dict = {"capability": None, "arch_list": [], "built_cuda": torch.version.cuda, "driver_cuda": None}
    if shutil.which("nvidia-smi"):
        try:
            header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
            query = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            header = query = ""
        match = re.search(r"CUDA Version:\s*(\d+\.\d+)", header)
        found["driver_cuda"] = match.group(1) if match else None
        found["capability"] = _version(query.strip().splitlines()[0] if query.strip() else None)
    if torch.version.cuda:
        found["arch_list"] = torch.cuda.get_arch_list()
        if found["capability"] is None and torch.cuda.is_available():
            found["capability"] = torch.cuda.get_device_capability(0)
    return found
