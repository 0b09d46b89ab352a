"""torchvision's ImageNet ResNet weights: where they are, how they are checked, fetching one.

The authors' plain detectors start from these (mmdetection's `modelzoo://resnet50` is
torchvision's first ImageNet release, top-1 76.13), so a convert source `torchvision` gives the
same starting point. The pins are torchvision's IMAGENET1K_V1 files; their checksum is the one
torchvision itself checks: the hex digits after the dash in the file name are the start of the
file's SHA-256 (torch.hub's `check_hash`). params.yaml `convert.torchvision_weights` may replace a
pin (e.g. a mirror, or a full 64-digit SHA-256).
"""

from __future__ import annotations

import os
from pathlib import Path

from sge_repro.data.download import download, file_digest
from sge_repro.errors import UserError

# model name -> (url, SHA-256 or its leading hex digits)
TORCHVISION_IMAGENET_WEIGHTS: dict[str, tuple[str, str]] = {
    "resnet50": ("https://download.pytorch.org/models/resnet50-0676ba61.pth", "0676ba61"),
    "resnet101": ("https://download.pytorch.org/models/resnet101-63fe2227.pth", "63fe2227"),
}


def fetch_torchvision_weights(url: str, sha256: str, destination: str | os.PathLike) -> Path:
    """Download `url` to `destination` (resumable), verified against `sha256` (the full digest or
    its leading hex digits, at least 8); `destination` appears only once verified."""
    destination = Path(destination)
    expected = sha256.lower()
    if destination.is_file() and file_digest(destination, "sha256").startswith(expected):
        return destination
    staging = destination.with_name(destination.name + ".unverified")
    download(url, staging)
    actual = file_digest(staging, "sha256")
    if not actual.startswith(expected):
        staging.unlink()
        raise UserError(f"{url}: sha256 mismatch (expected {expected}..., got {actual}); not torchvision's "
                        f"weights file, nothing written to {destination}")
    os.replace(staging, destination)
    return destination
