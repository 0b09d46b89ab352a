"""The train_cls and eval_cls stages."""

from __future__ import annotations

from typing import Callable

from sge_repro.launch import launch, runs_in_process
from sge_repro.params import RELEASED_SEED, Params
from sge_repro.paths import ProjectPaths
from sge_repro.stages.runtime import use_cpu_threads

StepProgress = Callable[[int, int, int, dict], None]


def train_cls(params: Params, paths: ProjectPaths, model: str, seed: int,
              progress: StepProgress | None = None) -> dict:
    """Train one classifier on data/cls; resumes from runs/cls/<model>-seed<seed>/last.pt.

    Runs on the processes params.launch asks for (sge_repro.launch); `progress` is called in
    this process only when it trains here, otherwise rank 0 prints one line per epoch."""
    params.require_listed("models", model)
    params.require_listed("seeds", seed)
    name = f"train_cls@{model}-{seed}"
    if not runs_in_process(params.launch):
        progress = EpochLines(name)
    return launch(train_cls_worker, (params, paths, model, seed, progress), params.launch, name=name,
                  state_dir=paths.launch_state_dir(name))


def train_cls_worker(params: Params, paths: ProjectPaths, model: str, seed: int,
                     progress: StepProgress | None) -> dict:
    """One process of train_cls (all of it, when it runs alone): rank 0 writes the files."""
    from sge_repro.classification.train import train_classifier

    use_cpu_threads(params)
    return train_classifier(
        params.train_cls, params.model, model, seed, paths.cls_data, paths.cls_run_dir(model, seed),
        paths.cls_train_metrics(model, seed), paths.cls_history(model, seed),
        dataset_name=params.data.classification.dataset_name, skip_corrupt=params.data.skip_corrupt,
        progress=progress)


class EpochLines:
    """The progress of a launched training: one printed line per epoch (called on rank 0 only)."""

    KEYS = ("train_loss", "train_top1", "val_loss", "val_top1", "images_per_s", "epoch_time_s")

    def __init__(self, name: str):
        self.name = name

    def __call__(self, epoch: int, step: int, total_steps: int, info: dict) -> None:
        if info.get("phase") == "epoch":
            values = " ".join(f"{key} {info[key]:.4g}" for key in self.KEYS if key in info)
            print(f"{self.name}: epoch {epoch} {values}", flush=True)


def import_cls(params: Params, paths: ProjectPaths, model: str) -> dict:
    """A released classifier (params.yaml `released`) as run seed 0 instead of training: the file,
    loaded strictly, in our format in runs/cls/<model>-seed0/ (best.pt = last.pt), and a
    metrics/train_cls record of where it came from (no training history: an empty TSV)."""
    from sge_repro import atomic
    from sge_repro.models.checkpoints import import_classifier

    source = _released_file(params, paths, model)
    run_dir = paths.cls_run_dir(model, RELEASED_SEED)
    header = import_classifier(model, source, run_dir / "best.pt", seed=RELEASED_SEED,
                               dataset=params.data.classification.dataset_name)
    atomic.write_bytes(run_dir / "last.pt", (run_dir / "best.pt").read_bytes())
    record = {"model": model, "seed": RELEASED_SEED, "released": str(source), "epochs_trained_here": 0, **header}
    atomic.write_json(paths.cls_train_metrics(model, RELEASED_SEED), record)
    atomic.write_text(paths.cls_history(model, RELEASED_SEED), "epoch\tval_top1\n")
    return record


def _released_file(params: Params, paths: ProjectPaths, model: str):
    from pathlib import Path

    from sge_repro.errors import UserError

    if model not in params.released:
        raise UserError(f"params.yaml: released: {model!r} is not listed "
                        f"(listed: {', '.join(params.released) or 'none'})")
    path = paths.root / Path(params.released[model])
    if not path.is_file():
        raise UserError(f"params.yaml: released.{model}: {path}: file not found")
    return path


def eval_cls(params: Params, paths: ProjectPaths, model: str, seed: int) -> dict:
    """Top-1 / top-5 of one classifier's best checkpoint on the val split (a trained one, or a
    released one imported as seed 0)."""
    from sge_repro.classification.evaluate import evaluate_classifier

    if model in params.released and seed == RELEASED_SEED:
        pass
    else:
        params.require_listed("models", model)
        params.require_listed("seeds", seed)
    use_cpu_threads(params)
    return evaluate_classifier(
        params.eval_cls, paths.cls_checkpoint(model, seed, "best"), paths.cls_data, paths.cls_metrics(model, seed),
        paths.cls_predictions(model, seed), model_name=model, seed=seed,
        dataset_name=params.data.classification.dataset_name, skip_corrupt=params.data.skip_corrupt)
