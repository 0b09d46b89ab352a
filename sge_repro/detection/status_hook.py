"""A detector stage's progress in its status file (sge_repro.stage_status), from inside detectron2.

`status_hooks(status, ims_per_batch)` are trainer hooks: after each iteration they report the
iteration of SOLVER.MAX_ITER, the smoothed total loss, lr and images/s that detectron2's own
hooks put in the event storage. `with_status(evaluator, status, total)` adds an evaluator that
counts inference batches. Both do nothing with `status=None`; the status writes only on rank 0.
"""

from __future__ import annotations

from sge_repro.detection.compat import import_detectron2
from sge_repro.stage_status import StageStatus

import_detectron2()
from detectron2.engine import HookBase  # noqa: E402
from detectron2.evaluation import DatasetEvaluator  # noqa: E402

SMOOTHING = 20  # iterations, as detectron2's console printer smooths


class StatusHook(HookBase):
    """Writes iteration / loss / lr / images/s / ETA after every step (throttled by the status)."""

    def __init__(self, status: StageStatus, ims_per_batch: int):
        self.status = status
        self.ims_per_batch = ims_per_batch

    def before_train(self) -> None:
        self.status.update(self.trainer.iter, self.trainer.max_iter, unit="iter", phase="train", force=True)

    def after_step(self) -> None:
        storage = self.trainer.storage
        histories = storage.histories()
        metrics = {}
        if "total_loss" in histories:
            metrics["loss"] = float(histories["total_loss"].median(SMOOTHING))
        if "lr" in histories:
            metrics["lr"] = float(histories["lr"].latest())
        if "time" in histories:
            seconds = histories["time"].median(SMOOTHING)
            if seconds > 0:
                metrics["images_per_s"] = self.ims_per_batch / seconds
        self.status.update(self.trainer.iter + 1, self.trainer.max_iter, unit="iter", phase="train", **metrics)


def status_hooks(status: StageStatus | None, ims_per_batch: int) -> list[HookBase]:
    """The hooks to register on a trainer: none without a status."""
    return [] if status is None else [StatusHook(status, ims_per_batch)]


class StatusEvaluator(DatasetEvaluator):
    """Counts the batches inference has processed (on this rank) in the status; evaluates nothing."""

    def __init__(self, status: StageStatus, total: int):
        self.status, self.total = status, total
        self.done = 0

    def reset(self) -> None:
        self.done = 0
        self.status.update(0, self.total, unit="batch", phase="eval", force=True)

    def process(self, inputs, outputs) -> None:
        self.done += 1
        self.status.update(self.done, self.total, unit="batch", phase="eval", images_per_unit=len(inputs))

    def evaluate(self):
        return None


def with_status(evaluator: DatasetEvaluator, status: StageStatus | None, total: int):
    """`evaluator` alone, or with a StatusEvaluator beside it (inference_on_dataset takes a list)."""
    return evaluator if status is None else [evaluator, StatusEvaluator(status, total)]
