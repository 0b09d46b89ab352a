"""The data stage."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sge_repro.params import Params
from sge_repro.paths import ProjectPaths

if TYPE_CHECKING:
    from sge_repro.data.prepare import Progress


def data(params: Params, paths: ProjectPaths, progress: Progress | None = None) -> dict[str, Any]:
    """Build data/cls (ImageFolder) and data/det (COCO JSON) as params.yaml says; returns the manifest."""
    from sge_repro.data.prepare import prepare_data

    return prepare_data(params.data, paths, progress=progress)
