"""The train_cls and eval_cls stages."""

from __future__ import annotations

from typing import Callable

from sge_repro.params import Params
from sge_repro.paths import ProjectPaths
from sge_repro.stages.runtime import use_cpu_threads

StepProgress = Callable[[int, int, int, dict], None]


def train_cls(params: Params, paths: ProjectPaths, model: str, seed: int,
              progress: StepProgress | None = None) -> dict:
    """Train one classifier on the files of data/manifests/cls.json; resumes from runs/cls/<model>-seed<seed>/last.pt."""
    from sge_repro.classification.train import train_classifier

    params.require_listed("models", model)
    params.require_listed("seeds", seed)
    use_cpu_threads(params)
    return train_classifier(
        params.train_cls, params.model, model, seed, paths.cls_manifest, paths.cls_run_dir(model, seed),
        paths.cls_train_metrics(model, seed), paths.cls_history(model, seed),
        dataset_name=params.data.classification.dataset_name, skip_corrupt=params.data.skip_corrupt,
        progress=progress)


def eval_cls(params: Params, paths: ProjectPaths, model: str, seed: int) -> dict:
    """Top-1 / top-5 of one classifier's best checkpoint on the val split."""
    from sge_repro.classification.evaluate import evaluate_classifier

    params.require_listed("models", model)
    params.require_listed("seeds", seed)
    use_cpu_threads(params)
    return evaluate_classifier(
        params.eval_cls, paths.cls_checkpoint(model, seed, "best"), paths.cls_manifest, paths.cls_metrics(model, seed),
        paths.cls_predictions(model, seed), model_name=model, seed=seed,
        dataset_name=params.data.classification.dataset_name, skip_corrupt=params.data.skip_corrupt)
