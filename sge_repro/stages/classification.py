"""The train_cls and eval_cls stages."""

from __future__ import annotations

from typing import Callable

from sge_repro.params import Params
from sge_repro.paths import ProjectPaths
from sge_repro.stages.runtime import use_cpu_threads

StepProgress = Callable[[int, int, int, dict], None]


def train_cls(params: Params, paths: ProjectPaths, model: str, seed: int,
              progress: StepProgress | None = None) -> dict:
    """Train one classifier on data/cls; resumes from runs/cls/<model>-seed<seed>/last.pt."""
    from sge_repro.classification.engine import train_classifier

    params.require_listed("models", model)
    params.require_listed("seeds", seed)
    use_cpu_threads(params)
    p = params.train_cls
    return train_classifier(
        model, params.model.model_kwargs(), paths.cls_data, paths.cls_run_dir(model, seed),
        paths.cls_train_metrics(model, seed), paths.cls_history(model, seed),
        epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, momentum=p.momentum,
        weight_decay=p.weight_decay, no_weight_decay_on_bn_bias=p.no_weight_decay_on_bn_bias,
        lr_schedule=p.lr_schedule, milestones=p.milestones, warmup_epochs=p.warmup_epochs,
        label_smoothing=p.label_smoothing, grad_clip_norm=p.grad_clip_norm,
        image_size=p.image_size, random_crop_min_scale=p.min_crop_scale,
        workers=p.workers, seed=seed, device=p.device, skip_corrupt=params.data.skip_corrupt,
        amp=p.amp, channels_last=p.channels_last, compile=p.compile, sync_bn=p.sync_bn,
        dataset_name=params.data.classification.dataset_name, progress=progress,
    )


def eval_cls(params: Params, paths: ProjectPaths, model: str, seed: int) -> dict:
    """Top-1 / top-5 of one classifier's best checkpoint on the val split."""
    from sge_repro.classification.engine import evaluate_classifier

    params.require_listed("models", model)
    params.require_listed("seeds", seed)
    use_cpu_threads(params)
    p = params.eval_cls
    return evaluate_classifier(
        paths.cls_checkpoint(model, seed, "best"), paths.cls_data, paths.cls_metrics(model, seed),
        paths.cls_predictions(model, seed), image_size=p.image_size, batch_size=p.batch_size,
        workers=p.workers, device=p.device, dataset_name=params.data.classification.dataset_name,
        seed=seed, model_name=model, skip_corrupt=params.data.skip_corrupt, amp=p.amp,
        channels_last=p.channels_last,
    )
