"""TensorBoard events of a classification run: loss, top-1, lr and images/s over training steps.

`TensorBoardLog(log_dir)` consumes train.py's `progress` calls (rank 0 only) and writes against the
global step (epochs x steps_per_epoch + step, 1-based):

- about every 1/20 epoch and at an epoch's last step: `train/loss` and `train/top1` (means over the
  steps since the last point, on rank 0's share of the batches), `train/lr`, `train/images_per_s`;
- at the end of each epoch (all ranks), flushed at once: `epoch/train_loss`, `epoch/train_top1`,
  `epoch/val_loss`, `epoch/val_top1`, `epoch/val_top5`, `epoch/lr`, `epoch/images_per_s`,
  `epoch/epoch_time_s`.

The writer opens at the first call, so a finished run that is rerun writes nothing. A run that
starts from step 1 removes event files left in log_dir; a resumed run (first step g > 1) opens a
new file with purge_step = g, so TensorBoard drops what the interrupted epoch logged past the
checkpoint (the engine reports an epoch before writing its checkpoint: a kill in between is
covered too), and nothing is logged twice.
"""

from __future__ import annotations

import math
from pathlib import Path

POINTS_PER_EPOCH = 20
EVENTS_GLOB = "events.out.tfevents.*"


class TensorBoardLog:
    """Consumes the engine's progress calls; see the module docstring for what it writes."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.writer = None
        self._last = (0, 0.0, 0.0)  # (step in the epoch, running loss mean, running top-1 mean) at the last point
        self._reported: tuple = ()  # (loss, top1) of the engine's previous train report

    def __call__(self, epoch: int, step: int, steps: int, info: dict) -> None:
        global_step = (epoch - 1) * steps + step
        if self.writer is None:
            self._open(global_step)
        if info.get("phase") == "epoch":
            for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "images_per_s",
                        "epoch_time_s"):
                if key in info:
                    self.writer.add_scalar(f"epoch/{key}", float(info[key]), global_step)
            self.writer.flush()
            return
        if info.get("phase") != "train":
            return
        if step <= self._last[0]:  # a new epoch (the engine reports every LOG_EVERY steps, not every step)
            self._last = (0, 0.0, 0.0)
        reported, self._reported = self._reported, (info.get("loss"), info.get("top1"))
        if not all(isinstance(v, float) and math.isfinite(v) for v in self._reported):
            return  # no running mean yet (the engine reads its device sums at log points only)
        if self._reported == reported and step != steps:
            return  # the engine repeats its last running means between log points: nothing new
        interval = max(1, steps // POINTS_PER_EPOCH)
        if step - self._last[0] < interval and step != steps:
            return  # a point at least every `interval` steps, whatever steps the engine reports at
        last_step, last_loss, last_top1 = self._last
        # The engine reports running means over the epoch: the mean since the last point is
        # the difference of sums (batches of one epoch have the same size).
        count = step - last_step
        loss = (info["loss"] * step - last_loss * last_step) / count
        top1 = (info["top1"] * step - last_top1 * last_step) / count
        self._last = (step, info["loss"], info["top1"])
        self.writer.add_scalar("train/loss", loss, global_step)
        self.writer.add_scalar("train/top1", top1, global_step)
        self.writer.add_scalar("train/lr", float(info["lr"]), global_step)
        self.writer.add_scalar("train/images_per_s", float(info["images_per_s"]), global_step)

    def _open(self, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        if first_step <= 1:
            for old in self.log_dir.glob(EVENTS_GLOB):
                old.unlink()
        self.writer = SummaryWriter(str(self.log_dir), purge_step=first_step if first_step > 1 else None)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
