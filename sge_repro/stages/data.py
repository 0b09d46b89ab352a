"""The data stage."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sge_repro.params import Params
from sge_repro.paths import ProjectPaths

if TYPE_CHECKING:
    from sge_repro.data.prepare import Progress


def data(params: Params, paths: ProjectPaths, progress: Progress | None = None) -> dict[str, Any]:
    """Index both datasets as params.yaml says into data/manifests/{cls,det}.json (generating the
    embedded sets first); returns a summary per dataset."""
    from sge_repro.data.prepare import prepare_data

    return prepare_data(params.data, paths, progress=progress)


def data_changes(params: Params, paths: ProjectPaths) -> dict[str, str | None]:
    """What the data stage would change now ({dataset: None or why}); reads, writes nothing."""
    from sge_repro.data.prepare import pending_changes

    return pending_changes(params.data, paths)
