"""The data stage."""

from __future__ import annotations

from typing import Any

from sge_repro.data.prepare import Progress, prepare_data
from sge_repro.params import Params
from sge_repro.paths import ProjectPaths
from sge_repro.stage_status import read_status, write_status, tracking


def data(params: Params, paths: ProjectPaths, progress: Progress | None = None) -> dict[str, Any]:
    """Index both datasets as params.yaml says into data/manifests/{cls,det}.json (generating the
    embedded sets first); returns a summary per dataset."""
    status_file = paths.stage_status("data")  # logs/progress/data.json
    made_them = read_status(status_file)
    with tracking(status_file, "data") as status:
        def report(name: str, done: int, total: int | None) -> None:
            status.update(done, total, unit="file", phase=name)
            if progress is not None:
                progress(name, done, total)

        summary = prepare_data(params.data, paths, progress=report)
    if made_them is not None and made_them.get("state") == "done" and all(
            item["manifest"] == "unchanged" for item in summary.values()):
        # DVC runs this stage on every repro (always_changed): a rescan that changed nothing keeps
        # the record of the run that wrote the manifests, which the report's provenance lists
        write_status(status_file, made_them)
    return summary
