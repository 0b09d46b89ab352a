"""Train an ImageNet-style classifier: one loop for ImageNet and the embedded set.

Every epoch reseeds from (seed, epoch) (determinism.py), so a run resumed from an epoch checkpoint
computes exactly what an uninterrupted run computes. With WORLD_SIZE > 1 each rank takes its slice
of the same global batches a single process would use (sampling.py), validation is sharded and
all-reduced, and rank 0 alone writes files. Speed options (`amp`, `channels_last`, `compile`,
`sync_bn`) are off by default, so the default run is plain fp32 and bit-reproducible; with
`sync_bn` (BatchNorm statistics over the global batch) N ranks train what one process trains.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from sge_repro import atomic
from sge_repro.classification import checkpoint
from sge_repro.classification.checkpoint import TrainingState
from sge_repro.classification.determinism import deterministic_mode, seed_everything
from sge_repro.classification.evaluate import validate
from sge_repro.classification.history import final_metrics, write_history
from sge_repro.classification.precision import autocast, check_amp_on_device, grad_scaler, memory_format
from sge_repro.classification.sampling import set_train_epoch, train_loader, val_loader
from sge_repro.classification.schedule import lr_factor, lr_scheduler
from sge_repro.classification.sync_batchnorm import convert_sync_batchnorm
from sge_repro.classification.transforms import eval_transform, to_model_input, train_transform
from sge_repro.data.imagefolder import open_imagefolder
from sge_repro.distributed import (DistInfo, broadcast_buffers, join_process_group, leave_process_group,
                                   min_over_ranks, rank_device, sum_over_ranks)
from sge_repro.errors import UserError
from sge_repro.models import create_model
from sge_repro.params_sections import ModelParams, TrainClsParams
from sge_repro.seeds import derived_seed
from sge_repro.superseded import supersede_changed_run

log = logging.getLogger(__name__)

Progress = Callable[[int, int, int, dict], None]


@dataclass(frozen=True)
class Run:
    """The fixed facts of one training run, as the epoch and the step need them."""

    params: TrainClsParams
    model_name: str
    device: torch.device
    dist_info: DistInfo
    steps_per_epoch: int
    run_dir: Path


def train_classifier(params: TrainClsParams, model_params: ModelParams, model_name: str, seed: int,
                     data_root: str | os.PathLike, run_dir: str | os.PathLike, metrics_path: str | os.PathLike,
                     history_path: str | os.PathLike, *, dataset_name: str | None = None,
                     skip_corrupt: bool = False, progress: Progress | None = None) -> dict:
    """Train `model_name` on `data_root`: the data stage's manifest (data/manifests/cls.json) or an
    ImageFolder folder; returns the final metrics dict. Images are not re-verified here.

    `params.batch_size` is the global batch (split over ranks); `params.lr` applies to it as
    given. Writes run_dir/last.pt every epoch and run_dir/best.pt when val top-1 improves
    (atomic), `history_path` (TSV, one row per epoch) every epoch, and `metrics_path` (JSON) once
    training is complete. Rerunning resumes from run_dir/last.pt when it was written with the same
    recipe; a run of another recipe is moved aside (sge_repro.superseded) and training starts over;
    a finished run only rewrites the metrics.
    `progress(epoch, step, total_steps, info)` is called after each training step (info:
    phase="train", loss, top1, lr, images_per_s) and once per epoch with phase="epoch" and that
    epoch's history row. Epochs and steps are 1-based.
    """
    joins = not (dist.is_available() and dist.is_initialized())
    dist_info = join_process_group(cuda=params.device.startswith("cuda"))
    device = rank_device(params.device, dist_info)
    check_amp_on_device(params.amp, device)
    run_dir, metrics_path, history_path = Path(run_dir), Path(metrics_path), Path(history_path)
    dataset_name = dataset_name or Path(data_root).name

    train_set = open_imagefolder(data_root, "train", train_transform(params.image_size, params.min_crop_scale, decoder=params.decoder),
                                 skip_corrupt=skip_corrupt)
    val_set = open_imagefolder(data_root, "val", eval_transform(params.image_size, decoder=params.decoder),
                               expected_classes=train_set.classes, skip_corrupt=skip_corrupt)
    if params.batch_size % dist_info.world_size:
        raise UserError(f"train_cls.batch_size={params.batch_size}: expected a multiple of the world size "
                        f"{dist_info.world_size}")
    steps_per_epoch = len(train_set) // params.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"batch_size={params.batch_size}: larger than the {len(train_set)} training images in "
                        f"{train_set.root / 'train'}; expected at most that many")
    model_kwargs = model_params.model_kwargs()
    recipe = checkpoint.training_recipe(params, model_name, model_kwargs, train_set.classes, seed,
                                        dist_info.world_size)
    if train_set.subset_of is not None:
        # another train subset is another training (and epoch length): never resumed as this one
        recipe["data.classification.max_train_images"] = len(train_set)
    run = Run(params, model_name, device, dist_info, steps_per_epoch, run_dir)
    per_rank_batch = params.batch_size // dist_info.world_size

    with deterministic_mode(device, params.deterministic):
        model = build_model(run, model_kwargs, len(train_set.classes), seed)
        optimizer = torch.optim.SGD(parameter_groups(model, params.weight_decay, params.no_weight_decay_on_bn_bias),
                                    lr=params.lr, momentum=params.momentum)
        state = TrainingState(model, optimizer, lr_scheduler(optimizer, steps_per_epoch, params),
                              grad_scaler(params.amp, device))
        barrier = lambda: dist.barrier() if dist_info.enabled else None  # noqa: E731
        checkpoint.repair_damaged(run_dir, dist_info.is_main, barrier)
        supersede_changed_run(lambda: checkpoint.check_resumable(run_dir / "last.pt", recipe), run_dir,
                              dist_info.is_main, barrier)
        if checkpoint.resume(run_dir / "last.pt", state, recipe):
            log.info("resuming %s from %s (epoch %d of %d)", model_name, run_dir / "last.pt", state.epoch,
                     params.epochs)
        forward = train_forward(run, model)
        pin_memory = device.type == "cuda"
        validation = val_loader(val_set, per_rank_batch, params.workers, dist_info, pin_memory)
        loader = train_loader(train_set, params.batch_size, params.workers, dist_info, seed, pin_memory)
        criterion = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
        skipped = len(train_set.skipped) + len(val_set.skipped)

        for epoch in range(state.epoch, params.epochs):
            seed_everything(derived_seed("epoch", seed, epoch, dist_info.rank))
            set_train_epoch(loader, epoch)
            started = time.perf_counter()
            trained = train_epoch(run, state, forward, criterion, loader, epoch, progress)
            broadcast_buffers(model, dist_info)
            val = validate(model, validation, device, dist_info, amp=params.amp, channels_last=params.channels_last)
            row = {
                "epoch": epoch + 1,
                # lr of the epoch's last step (the schedule has already advanced one step past it).
                "lr": params.lr * lr_factor(state.scheduler.last_epoch - 1, steps_per_epoch, params),
                "train_loss": trained["loss"], "train_top1": trained["top1"],
                "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
                "images_per_s": trained["images_per_s"], "epoch_time_s": time.perf_counter() - started,
            }
            state.epoch = epoch + 1
            state.history.append(row)
            improved = val["top1"] > state.best["top1"]
            if improved:
                state.best = {"epoch": epoch + 1, "top1": val["top1"], "top5": val["top5"]}
            if progress is not None and dist_info.is_main:
                # before the checkpoint: a kill in between resumes this epoch (see tensorboard.py)
                progress(epoch + 1, steps_per_epoch, steps_per_epoch, {"phase": "epoch", **row})
            if dist_info.is_main:
                checkpoint.save(state, recipe, dataset_name, run_dir, improved)
                write_history(history_path, state.history)
            skipped += trained["skipped"]

    metrics = final_metrics(model_name, dataset_name, seed, state.history, state.best, len(train_set),
                            len(val_set), skipped, model)
    if dist_info.is_main:
        write_history(history_path, state.history)
        atomic.write_json(metrics_path, metrics)
    if joins:  # the group this call joined (started as torchrun starts a script): left in order
        leave_process_group()
    return metrics


def build_model(run: Run, model_kwargs: dict, num_classes: int, seed: int) -> nn.Module:
    """The seeded model on this rank's device, with sync_bn and memory layout applied."""
    model = create_model(run.model_name, num_classes=num_classes, seed=seed, **model_kwargs)
    if run.params.sync_bn:
        if run.dist_info.enabled:
            # Same parameters and buffers (state_dict keys unchanged); BN statistics over all ranks.
            model = convert_sync_batchnorm(model, run.device)
        else:
            log.info("sync_bn: a single process already normalises over the whole batch; using plain BatchNorm")
    # Layout before the optimizer exists, so its momentum buffers take the same layout.
    return model.to(run.device, memory_format=memory_format(run.params.channels_last))


def parameter_groups(model: nn.Module, weight_decay: float, exempt_bn_bias: bool) -> list[dict]:
    if not exempt_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            # 1-d tensors are biases and norm affine parameters (and SGE's per-group gamma/beta).
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_forward(run: Run, model: nn.Module) -> nn.Module:
    """The module the training steps call: DDP across ranks, compiled with `compile`."""
    forward = model
    if run.dist_info.enabled:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        # Gradients are views into DDP's all-reduce buckets: no second gradient-sized allocation.
        # forward_sync_buffers=False: DDP would broadcast rank 0's BatchNorm statistics before
        # every training forward, which in training mode only updates them (it normalises with
        # the batch's statistics), so that collective changes nothing rank 0 computes or saves.
        # What validation needs, every rank holding rank 0's statistics after the epoch's last
        # step, is broadcast_buffers() after each epoch: DDP's broadcast comes before a forward,
        # so the last step's updates would still differ between ranks.
        forward = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False,
                                                      gradient_as_bucket_view=True)
    if run.params.compile:
        forward = torch.compile(forward)
    return forward


# Steps between host synchronisations: the running loss / top-1 shown by `progress` and the
# non-finite-loss check are read from the device only every LOG_EVERY steps and at an epoch's
# last step (the same steps on every rank: the check is a collective). In between, nothing in the
# loop waits for the GPU.
LOG_EVERY = 10
NO_BAD_STEP = 2**62


def train_epoch(run: Run, state: TrainingState, forward: nn.Module, criterion: nn.Module, loader: DataLoader,
                epoch: int, progress: Progress | None) -> dict:
    """One pass over the train loader; loss, top-1 and images/s over all ranks, skipped images.

    Losses and correct counts accumulate on the device (float64); the host reads them at log
    points only. A loss that is not finite stops every rank at the next log point (UserError),
    before the epoch's checkpoint: last.pt stays the previous epoch's."""
    forward.train()
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss sum, correct count
    bad_step = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=run.device)  # first non-finite
    bad_loss = torch.zeros((), dtype=torch.float32, device=run.device)
    seen, skipped = 0, 0
    shown = {"loss": float("nan"), "top1": float("nan")}
    started = time.perf_counter()
    for step, (images, targets, num_skipped) in enumerate(loader, start=1):
        skipped += num_skipped
        if images is not None:
            images = to_model_input(images, run.device, run.params.channels_last)
            targets = targets.to(run.device, non_blocking=True)
            loss, logits = train_step(run, state, forward, criterion, images, targets)
            loss = loss.detach()
            first = (bad_step == NO_BAD_STEP) & ~torch.isfinite(loss)
            bad_step = torch.where(first, step, bad_step)
            bad_loss = torch.where(first, loss.float(), bad_loss)
            totals += torch.stack([loss.double() * targets.shape[0],
                                   logits.detach().argmax(dim=1).eq(targets).sum().double()])
            seen += targets.shape[0]
        if step % LOG_EVERY == 0 or step == run.steps_per_epoch:
            stop_if_not_finite(run, bad_step, bad_loss, epoch)
            if progress is not None and run.dist_info.is_main and seen:
                loss_sum, correct_sum = totals.tolist()
                shown = {"loss": loss_sum / seen, "top1": 100.0 * correct_sum / seen}
        if progress is not None and run.dist_info.is_main:
            elapsed = time.perf_counter() - started
            progress(epoch + 1, step, run.steps_per_epoch, {
                "phase": "train", **shown, "lr": state.optimizer.param_groups[0]["lr"],
                "images_per_s": seen * run.dist_info.world_size / max(elapsed, 1e-9)})
    stop_if_not_finite(run, bad_step, bad_loss, epoch)  # reads the device: the epoch's work is done
    train_time = time.perf_counter() - started
    loss_sum, correct_sum, seen, skipped = sum_over_ranks(
        torch.cat([totals, torch.tensor([seen, skipped], dtype=torch.float64).to(run.device)]), run.dist_info)
    return {"loss": loss_sum / max(seen, 1), "top1": 100.0 * correct_sum / max(seen, 1),
            "images_per_s": seen / max(train_time, 1e-9), "skipped": int(skipped)}


def stop_if_not_finite(run: Run, bad_step: torch.Tensor, bad_loss: torch.Tensor, epoch: int) -> None:
    """UserError on every rank when some rank saw a non-finite loss this epoch (a collective)."""
    first = min_over_ranks(bad_step, run.dist_info)
    if first == NO_BAD_STEP:
        return
    local = bad_step.item() == first
    last = run.run_dir / "last.pt"
    raise UserError(
        f"training {run.model_name}: loss is {bad_loss.item() if local else 'not finite (on another rank)'} "
        f"at epoch {epoch + 1} step {first} (global step {epoch * run.steps_per_epoch + first}); stopped. "
        + (f"Last good checkpoint kept: {last}" if last.is_file() else "No checkpoint yet")
        + "; expected a finite loss (lower lr or check the data)")


def train_step(run: Run, state: TrainingState, forward: nn.Module, criterion: nn.Module, images: torch.Tensor,
               targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and one optimizer and schedule step; returns (loss, logits), on the device."""
    with autocast(run.params.amp, run.device):
        logits = forward(images)
        loss = criterion(logits, targets)  # autocast computes cross-entropy in fp32
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if run.params.grad_clip_norm:
        state.scaler.unscale_(state.optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(state.model.parameters(), run.params.grad_clip_norm)
    state.scaler.step(state.optimizer)  # skips the step when fp16 gradients overflowed
    state.scaler.update()
    state.scheduler.step()
    return loss, logits
