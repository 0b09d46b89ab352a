"""The visualize and report stages."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sge_repro.params import Params
from sge_repro.paths import ProjectPaths
from sge_repro.stages.runtime import use_cpu_threads

if TYPE_CHECKING:
    from sge_repro.report.schema import Report


def visualize(params: Params, paths: ProjectPaths) -> list[Path]:
    """SGE attention maps of every trained SGE model of params.yaml on a few val images."""
    from sge_repro.report.visualize import visualize_trained_models

    from sge_repro.data.manifest import imagefolder_samples, read_manifest

    use_cpu_threads(params)
    seed = params.seeds[0]
    _, _, val_samples, _ = imagefolder_samples(read_manifest(paths.cls_manifest, "classification"), "val")
    return visualize_trained_models(
        params.models, seed, lambda name, s: paths.cls_checkpoint(name, s, "best"),
        val_samples, paths.attention_maps, image_size=params.eval_cls.image_size)


def report(params: Params, paths: ProjectPaths) -> Report:
    """Collect every metrics file, compare with the paper, write reports/ (each file once).

    The runs params.yaml asks for (models x seeds, detectors x detection_backbones x seeds) are
    expected: any without a metrics file is listed as missing in the report.
    """
    from sge_repro.models.complexity import model_complexity
    from sge_repro.report import build_report, write_report_files

    use_cpu_threads(params)

    def complexity(name: str) -> dict:
        """#params / GFLOPs of the models as trained (width, classes, resolution of this profile)."""
        return model_complexity(name, num_classes=params.data.classification.num_classes,
                                image_size=params.eval_cls.image_size, **params.model.model_kwargs())

    p = params.report
    result = build_report(
        paths.root, profile=params.profile, tolerance=p.tolerance, bootstrap_samples=p.bootstrap_samples,
        seed=p.seed, complexity=complexity, expected_models=params.models,
        expected_detection=[(d, b) for d in params.detectors for b in params.detection_backbones],
        seeds=params.seeds)
    write_report_files(result, paths.reports)
    return result
