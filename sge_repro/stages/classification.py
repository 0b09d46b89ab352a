"""The train_cls and eval_cls stages."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator

from sge_repro import atomic
from sge_repro.classification.evaluate import evaluate_classifier
from sge_repro.classification.tensorboard import TensorBoardLog
from sge_repro.classification.train import train_classifier
from sge_repro.errors import UserError
from sge_repro.launch import launch, runs_in_process
from sge_repro.models.registry import import_classifier
from sge_repro.params import RELEASED_SEED, Params
from sge_repro.paths import ProjectPaths
from sge_repro.stage_status import StageStatus, stage_name, tracking
from sge_repro.stages.runtime import use_cpu_threads

StepProgress = Callable[[int, int, int, dict], None]


def train_cls(params: Params, paths: ProjectPaths, model: str, seed: int,
              progress: StepProgress | None = None) -> dict:
    """Train one classifier on the files of data/manifests/cls.json; resumes from runs/cls/<model>-seed<seed>/last.pt.

    The stage's progress goes to logs/progress/train_cls@<model>-<seed>.json (rank 0), TensorBoard
    events to runs/cls/<model>-seed<seed>/tensorboard/, and to `progress` when given.

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
    use_cpu_threads(params)
    with training_progress(params, paths, model, seed, progress) as report:
        return train_classifier(
            params.train_cls, params.model, model, seed, paths.cls_manifest, paths.cls_run_dir(model, seed),
            paths.cls_train_metrics(model, seed), paths.cls_history(model, seed),
            dataset_name=params.data.classification.dataset_name, skip_corrupt=params.data.skip_corrupt,
            progress=report)


@contextmanager
def training_progress(params: Params, paths: ProjectPaths, model: str, seed: int,
                      progress: StepProgress | None = None) -> Iterator[StepProgress]:
    """The progress callback of one train_cls run (call it in the process that trains: the
    engine calls it on rank 0): the status file, TensorBoard events, and `progress`."""
    stage = stage_name("train_cls", model, seed)
    events = TensorBoardLog(paths.cls_tensorboard(model, seed))
    with tracking(paths.stage_status(stage), stage) as status:
        try:
            yield _chain(training_status(status, params.train_cls.epochs), events, progress)
        finally:
            events.close()


@dataclass(frozen=True)
class EpochLines:
    """The progress of a launched training: one printed line per epoch (called on rank 0 only).

    A dataclass for its repr (`EpochLines(name='...')`): it is an argument of the launched call, and
    the SLURM launcher fingerprints the arguments (their repr for objects like this) to find the job
    of the same computation when the stage is rerun; the default repr holds a memory address, which
    differs in every process, so a rerun would not recognise its own job."""

    KEYS: ClassVar[tuple[str, ...]] = ("train_loss", "train_top1", "val_loss", "val_top1", "images_per_s",
                                       "epoch_time_s")

    name: str

    def __call__(self, epoch: int, step: int, total_steps: int, info: dict) -> None:
        if info.get("phase") == "epoch":
            values = " ".join(f"{key} {info[key]:.4g}" for key in self.KEYS if key in info)
            print(f"{self.name}: epoch {epoch} {values}", flush=True)


def import_cls(params: Params, paths: ProjectPaths, model: str) -> dict:
    """A released classifier (params.yaml `released`) as run seed 0 instead of training: the file,
    loaded strictly, in our format in runs/cls/<model>-seed0/ (best.pt = last.pt), and a
    metrics/train_cls record of where it came from (no training history: an empty TSV)."""
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
    if model in params.released and seed == RELEASED_SEED:
        pass
    else:
        params.require_listed("models", model)
        params.require_listed("seeds", seed)
    use_cpu_threads(params)
    stage = stage_name("eval_cls", model, seed)
    with tracking(paths.stage_status(stage), stage) as status:
        return evaluate_classifier(
            params.eval_cls, paths.cls_checkpoint(model, seed, "best"), paths.cls_manifest,
            paths.cls_metrics(model, seed), paths.cls_predictions(model, seed), model_name=model, seed=seed,
            dataset_name=params.data.classification.dataset_name, skip_corrupt=params.data.skip_corrupt,
            progress=evaluation_status(status, params.eval_cls.batch_size))


def training_status(status: StageStatus, epochs: int) -> StepProgress:
    """The classifier engine's progress (epoch, step, steps, info) as status-file updates:
    steps of all epochs, the running loss / top-1 / lr / images/s, val top-1 after each epoch."""

    def update(epoch: int, step: int, steps: int, info: dict) -> None:
        done, total = (epoch - 1) * steps + step, epochs * steps
        if info.get("phase") == "epoch":
            status.update(done, total, unit="step", phase="train", force=True, epoch=epoch, epochs=epochs,
                          loss=info["train_loss"], top1=info["train_top1"], val_top1=info["val_top1"],
                          lr=info["lr"], images_per_s=info["images_per_s"])
        else:
            status.update(done, total, unit="step", phase="train", epoch=epoch, epochs=epochs,
                          loss=info.get("loss"), top1=info.get("top1"), lr=info.get("lr"),
                          images_per_s=info.get("images_per_s"))

    return update


def evaluation_status(status: StageStatus, batch_size: int) -> StepProgress:
    """evaluate_classifier's progress (1, batch, batches, info) as status-file updates."""

    def update(_epoch: int, done: int, total: int, info: dict) -> None:
        status.update(done, total, unit="batch", phase="eval", images_per_unit=batch_size,
                      **({"top1": info["top1"]} if "top1" in info else {}))

    return update


def _chain(*callbacks: StepProgress | None) -> StepProgress:
    present = [callback for callback in callbacks if callback is not None]

    def call(*args) -> None:
        for callback in present:
            callback(*args)

    return call
