"""The visualize and report stages."""

from __future__ import annotations

from pathlib import Path

from sge_repro.atomic import write_json
from sge_repro.data.manifest import imagefolder_samples, read_manifest
from sge_repro.models.complexity import model_complexity
from sge_repro.params import CONVERT_STAGES, PARAMS_FILE, RELEASED_SEED, Params
from sge_repro.paths import ProjectPaths
from sge_repro.provenance import collect as collect_provenance
from sge_repro.report import build_report, write_report_files
from sge_repro.report.render import headline_metrics
from sge_repro.report.schema import Provenance, Report
from sge_repro.report.visualize import visualize_trained_models
from sge_repro.stage_status import stage_name, tracking
from sge_repro.stages.runtime import use_cpu_threads


def visualize(params: Params, paths: ProjectPaths) -> list[Path]:
    """SGE attention maps of every trained (first seed) or released SGE model of params.yaml on a few val images."""
    use_cpu_threads(params)
    written = []
    _, _, val_samples, _ = imagefolder_samples(read_manifest(paths.cls_manifest, "classification"), "val")
    with tracking(paths.stage_status("visualize"), "visualize"):  # the wall time, for the report's provenance
        for models, seed in ((params.models, params.seeds[0]), (list(params.released), RELEASED_SEED)):
            written += visualize_trained_models(
                models, seed, lambda name, s: paths.cls_checkpoint(name, s, "best"),
                val_samples, paths.attention_maps, image_size=params.eval_cls.image_size)
    return written


def report(params: Params, paths: ProjectPaths) -> Report:
    """Collect every metrics file, compare with the paper, write reports/ (each file once).

    The runs params.yaml asks for (models x seeds, detector-backbone pairs x seeds) are
    expected: any without a metrics file is listed as missing in the report.
    """
    use_cpu_threads(params)

    def complexity(name: str) -> dict:
        """#params / GFLOPs of the models as trained (width, classes, resolution of this profile)."""
        return model_complexity(name, num_classes=params.data.classification.num_classes,
                                image_size=params.eval_cls.image_size, **params.model.model_kwargs())

    p = params.report
    result = build_report(
        paths.root, profile=params.profile, tolerance=p.tolerance, bootstrap_samples=p.bootstrap_samples,
        seed=p.seed, complexity=complexity, expected_models=params.models,
        expected_detection=params.pairs(),
        seeds=params.seeds)
    made_by = collect_provenance(paths.root, paths.root / PARAMS_FILE, params.profile, paths.progress_dir,
                                 pipeline_stages(params))
    result.summary = result.summary.model_copy(update={"provenance": Provenance.model_validate(made_by)})
    write_report_files(result, paths.reports)
    write_json(paths.report_metrics, headline_metrics(result))  # for `dvc exp show`
    return result


def pipeline_stages(params: Params) -> list[str]:
    """dvc.yaml's stages before the report, as DVC names them, in its order (a test compares them
    with `dvc stage list`)."""
    seeds = params.seeds
    names = ["data"]
    names += [stage_name(group, m, s) for group in ("train_cls", "eval_cls") for m in params.models for s in seeds]
    names += [f"{group}@{m}" for group in ("import_cls", "eval_released") for m in params.released]
    names += [f"fetch_weights@{m}" for m in params.convert.torchvision]
    names += [f"copy_weights@{m}" for m in params.convert.files]
    for source, backbones in (("trained", params.convert.trained), ("file", params.convert.files),
                              ("torchvision", params.convert.torchvision)):
        names += [stage_name(CONVERT_STAGES[source], m, s) for m in backbones for s in seeds]
    names += [stage_name(f"{group}_{detector}", backbone, s) for detector in params.detectors
              for group in ("train", "eval") for backbone in getattr(params.detection, detector) for s in seeds]
    return names + ["visualize"]
