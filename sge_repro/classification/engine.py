"""Train and evaluate ImageNet-style classifiers: one loop for ImageNet and the embedded set.

Reads top to bottom: data -> model -> optimizer and schedule -> resume -> epochs (train, validate,
checkpoint) -> metrics. Determinism: every epoch reseeds the sampler, the augmentation and the
global RNG from (seed, epoch), so a run resumed from an epoch checkpoint computes exactly what an
uninterrupted run computes (bit for bit on CPU).

Augmentation is seeded per sample from (seed, epoch, index), so results do not depend on the
number of loader workers either; the sampler hands each index to the workers together with its
epoch, so the train loader is built once and its workers persist across epochs.

Distributed: with WORLD_SIZE > 1 (torchrun) the process group is initialised from env://; each
rank takes its slice of the same global batches a single process would use (GlobalBatchSampler),
validation is sharded and all-reduced, and rank 0 alone writes files.

Speed options (all off by default, so the default run is plain fp32 and bit-reproducible):
mixed precision (`amp`: bf16 autocast, or fp16 autocast with a GradScaler whose state lives in
the checkpoint), channels_last memory format, torch.compile of the training forward, and
BatchNorm statistics synchronised across ranks (sync_bn: torch's SyncBatchNorm on CUDA,
GlobalBatchNorm2d on CPU / gloo), with which N ranks train what one process trains on the same
global batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler, Subset

from sge_repro import atomic
from sge_repro.classification.sync_batchnorm import convert_sync_batchnorm
from sge_repro.classification.transforms import eval_transform, train_transform
from sge_repro.data.imagefolder import ImageFolderDataset, build_imagefolder, collate_skipping_none
from sge_repro.errors import UserError

log = logging.getLogger(__name__)

Progress = Callable[[int, int, int, dict], None]
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                   "images_per_s", "epoch_time_s")
LR_SCHEDULES = ("step", "cosine")
AMP_MODES = ("off", "bf16", "fp16")


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Join the env:// process group when launched by torchrun with WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _resolve_device(device: str, dist_info: DistInfo) -> torch.device:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={device!r}: CUDA is not available here; expected 'cpu'")
        if dist_info.enabled and device == "cuda":
            return torch.device("cuda", dist_info.local_rank)
    elif device != "cpu":
        raise UserError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:<index>'")
    return torch.device(device)


def _all_reduce_sum(values: list[float], dist_info: DistInfo, device: torch.device) -> list[float]:
    if not dist_info.enabled:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _broadcast_buffers(model: nn.Module, dist_info: DistInfo) -> None:
    """Give every rank rank 0's BN running statistics (without sync_bn each rank updated them on
    its own shard in the last step), so sharded validation evaluates exactly the model rank 0 saves."""
    if not dist_info.enabled:
        return
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def _finite_everywhere(loss: torch.Tensor, dist_info: DistInfo) -> bool:
    """Whether the loss is finite on every rank (all ranks must stop together, not hang)."""
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


# --------------------------------------------------------------------------- precision and layout


def _check_amp(amp: str, device: torch.device) -> None:
    if amp not in AMP_MODES:
        raise UserError(f"amp={amp!r}: expected one of {', '.join(AMP_MODES)}")
    if amp == "fp16" and device.type != "cuda":
        # fp16 needs loss scaling, which we only run on CUDA; bf16 has fp32's range and needs none.
        raise UserError(f"amp='fp16' on device {device}: fp16 autocast with loss scaling needs CUDA; "
                        "expected amp='bf16' or amp='off' on CPU")


def _autocast(amp: str, device: torch.device):
    """The forward-pass autocast context for `amp` (a no-op context when amp is off)."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


# --------------------------------------------------------------------------- determinism


def _derived_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple of values, stable across processes and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # torch already seeds each worker from the loader's generator; align numpy / random with it.
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


@contextlib.contextmanager
def _deterministic_mode(device: torch.device):
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.backends.cudnn.benchmark = previous_benchmark


# --------------------------------------------------------------------------- schedule


def lr_factor(iteration: int, steps_per_epoch: int, epochs: int, schedule: str, milestones: Sequence[int],
              gamma: float, warmup_epochs: float) -> float:
    """Multiplier of the base lr at optimizer step `iteration` (0-based), per-step resolution.

    Linear warmup from 1/steps to 1 over `warmup_epochs`, then "step" (x gamma at each
    milestone epoch) or "cosine" (to 0 at the end of training).
    """
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if iteration < warmup_steps:
        return (iteration + 1) / warmup_steps
    if schedule == "step":
        epoch = iteration // steps_per_epoch
        return gamma ** sum(1 for milestone in milestones if epoch >= milestone)
    total = epochs * steps_per_epoch
    progress = (iteration - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- metrics


def _topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> list[torch.Tensor]:
    """Per-sample 0/1 correctness within the top k, for each k (k capped at the class count)."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = top.eq(targets[:, None])
    return [hits[:, : min(k, logits.shape[1])].any(dim=1) for k in ks]


@torch.no_grad()
def _validate(model: nn.Module, loader: DataLoader, device: torch.device, dist_info: DistInfo,
              collect: bool = False, amp: str = "off", channels_last: bool = False) -> dict:
    """Loss and top-1/top-5 (percent) over the loader; with collect, per-sample results too."""
    model.eval()
    loss_sum, top1_sum, top5_sum, count, skipped = 0.0, 0.0, 0.0, 0, 0
    predictions, correct1, correct5 = [], [], []
    for images, targets, num_skipped in loader:
        skipped += num_skipped
        if images is None:
            continue
        images = images.to(device, non_blocking=True, memory_format=_memory_format(channels_last))
        targets = targets.to(device, non_blocking=True)
        with _autocast(amp, device):
            logits = model(images)
        logits = logits.float()  # top-k ties and the loss in fp32, whatever the autocast dtype
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        hit1, hit5 = _topk_correct(logits, targets, (1, 5))
        top1_sum += hit1.sum().item()
        top5_sum += hit5.sum().item()
        count += targets.shape[0]
        if collect:
            predictions += logits.argmax(dim=1).tolist()
            correct1 += hit1.int().tolist()
            correct5 += hit5.int().tolist()
    loss_sum, top1_sum, top5_sum, count, skipped = _all_reduce_sum(
        [loss_sum, top1_sum, top5_sum, float(count), float(skipped)], dist_info, device)
    if count == 0:
        raise UserError("validation: no image could be loaded; expected at least one readable val image")
    result = {"loss": loss_sum / count, "top1": 100.0 * top1_sum / count, "top5": 100.0 * top5_sum / count,
              "num_images": int(count), "skipped": int(skipped)}
    if collect:
        result.update(predictions=predictions, correct_top1=correct1, correct_top5=correct5)
    return result


def _write_history(path: Path, rows: list[dict]) -> None:
    lines = ["\t".join(HISTORY_COLUMNS)]
    for row in rows:
        lines.append("\t".join(_format_cell(row[column]) for column in HISTORY_COLUMNS))
    atomic.write_text(path, "\n".join(lines) + "\n")


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# --------------------------------------------------------------------------- data


def _val_loader(dataset: ImageFolderDataset, batch_size: int, workers: int, dist_info: DistInfo,
                pin_memory: bool) -> DataLoader:
    # Shard validation without padding (DistributedSampler would repeat images).
    indices = list(range(dist_info.rank, len(dataset), dist_info.world_size))
    shard = Subset(dataset, indices) if dist_info.enabled else dataset
    return DataLoader(shard, batch_size=batch_size, sampler=SequentialSampler(shard), num_workers=workers,
                      collate_fn=collate_skipping_none, pin_memory=pin_memory,
                      persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)


class GlobalBatchSampler:
    """This rank's share of each global batch of one epoch, as (dataset index, epoch) pairs.

    The epoch's permutation depends only on (seed, epoch); global batch k is permutation
    [k*B, (k+1)*B) and rank r takes its r-th contiguous slice. So N ranks see exactly the images
    one process would see in each step (what a DistributedSampler does not guarantee), and the
    incomplete last global batch is dropped. The epoch travels with every index, so persistent
    loader workers need no state of their own: set_epoch here, in the main process, is enough.
    """

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int, seed: int, epoch: int = 0):
        self.size, self.global_batch, self.rank, self.world_size = size, global_batch, rank, world_size
        self.per_rank = global_batch // world_size
        self.seed = seed
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator_seed = _derived_seed("sampler", self.seed, epoch)

    def __len__(self) -> int:
        return self.size // self.global_batch

    def __iter__(self):
        epoch = self.epoch
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.generator_seed)).tolist()
        for step in range(len(self)):
            start = step * self.global_batch + self.rank * self.per_rank
            yield [(index, epoch) for index in order[start:start + self.per_rank]]


class PerSampleSeededDataset(torch.utils.data.Dataset):
    """Item (index, epoch): sample `index` with its augmentation seeded from (seed, epoch, index).

    The random crop and flip of an image then depend on nothing else: not on the number of
    loader workers, not on the rank, not on what ran before (resume).
    """

    def __init__(self, dataset: ImageFolderDataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._epoch_seeds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def epoch_seed(self, epoch: int) -> int:
        if epoch not in self._epoch_seeds:
            self._epoch_seeds[epoch] = _derived_seed("augment", self.seed, epoch)
        return self._epoch_seeds[epoch]

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        # torchvision's transforms draw from the global CPU generator; seed it for this sample and
        # restore it after (torch.random.fork_rng does the same but costs ~100x more).
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed((self.epoch_seed(epoch) + index * 0x9E3779B97F4A7C15) % 2**63)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(saved)


def _train_loader(dataset: PerSampleSeededDataset, global_batch: int, workers: int, dist_info: DistInfo,
                  seed: int, pin_memory: bool) -> DataLoader:
    """One loader for the whole run; call set_train_epoch(loader, epoch) before iterating it.

    With workers, they persist across epochs (no re-spawn and dataset copy per epoch). The loader
    draws its workers' base seed from a generator of its own, never from the global RNG, so the
    global RNG of epoch k is the same whether the run started at epoch 0 or resumed at k."""
    batches = GlobalBatchSampler(len(dataset), global_batch, dist_info.rank, dist_info.world_size, seed)
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_skipping_none,
                      pin_memory=pin_memory, worker_init_fn=_seed_worker, persistent_workers=workers > 0,
                      prefetch_factor=2 if workers > 0 else None,
                      generator=torch.Generator().manual_seed(_derived_seed("loader", seed, dist_info.rank)))


def set_train_epoch(loader: DataLoader, epoch: int) -> None:
    loader.batch_sampler.set_epoch(epoch)


# --------------------------------------------------------------------------- training


@dataclass
class TrainRecipe:
    """Everything that determines the trained weights (the fingerprint a resume must match)."""

    model_name: str
    model_kwargs: dict
    classes: list[str]
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    lr_schedule: str
    milestones: list[int]
    lr_gamma: float
    warmup_epochs: float
    label_smoothing: float
    image_size: int
    random_crop_min_scale: float
    no_weight_decay_on_bn_bias: bool
    seed: int
    world_size: int
    # Speed options change the arithmetic (precision, kernels, BN statistics), so a resume must
    # match them too. Left at their defaults they are kept out of the fingerprint, so checkpoints
    # written before these options existed still resume.
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False

    def fingerprint(self) -> str:
        fields = asdict(self)
        for name, default in _SPEED_OPTION_DEFAULTS.items():
            if fields[name] == default:
                del fields[name]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


_SPEED_OPTION_DEFAULTS = {"amp": "off", "channels_last": False, "compile": False, "sync_bn": False}


def _check_recipe(recipe: TrainRecipe) -> None:
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise UserError(message)

    need(isinstance(recipe.epochs, int) and recipe.epochs >= 1, f"epochs={recipe.epochs!r}: expected an integer >= 1")
    need(isinstance(recipe.batch_size, int) and recipe.batch_size >= 1,
         f"batch_size={recipe.batch_size!r}: expected an integer >= 1")
    need(recipe.batch_size % recipe.world_size == 0,
         f"batch_size={recipe.batch_size}: expected a multiple of the world size {recipe.world_size}")
    need(recipe.lr > 0, f"lr={recipe.lr!r}: expected a positive number")
    need(0 <= recipe.momentum < 1, f"momentum={recipe.momentum!r}: expected 0 <= momentum < 1")
    need(recipe.weight_decay >= 0, f"weight_decay={recipe.weight_decay!r}: expected >= 0")
    need(recipe.lr_schedule in LR_SCHEDULES,
         f"lr_schedule={recipe.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
    need(all(isinstance(m, int) and 0 < m for m in recipe.milestones),
         f"milestones={recipe.milestones!r}: expected positive epoch numbers")
    need(0 <= recipe.warmup_epochs <= recipe.epochs,
         f"warmup_epochs={recipe.warmup_epochs:g}: expected 0 <= warmup_epochs <= epochs ({recipe.epochs})")
    need(0 <= recipe.label_smoothing < 1, f"label_smoothing={recipe.label_smoothing!r}: expected in [0, 1)")
    need(isinstance(recipe.image_size, int) and recipe.image_size >= 8,
         f"image_size={recipe.image_size!r}: expected an integer >= 8")
    need(0 < recipe.random_crop_min_scale <= 1,
         f"random_crop_min_scale={recipe.random_crop_min_scale!r}: expected in (0, 1]")
    need(recipe.amp in AMP_MODES, f"amp={recipe.amp!r}: expected one of {', '.join(AMP_MODES)}")


def _parameter_groups(model: nn.Module, weight_decay: float, exempt_bn_bias: bool) -> list[dict]:
    if not exempt_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            # 1-d tensors are biases and norm affine parameters (and SGE's per-group gamma/beta).
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _load_resume_state(path: Path, recipe: TrainRecipe) -> dict | None:
    from sge_repro.models.checkpoints import load_checkpoint_file

    state = load_checkpoint_file(path)
    if not isinstance(state, dict) or "recipe_fingerprint" not in state or "optimizer" not in state:
        raise UserError(f"checkpoint {path}: not a training checkpoint of this engine; "
                        "expected last.pt written by train_classifier (delete the run folder to start over)")
    if state["recipe_fingerprint"] != recipe.fingerprint():
        log.warning("%s was trained with a different recipe; starting from scratch", path)
        return None
    return state


def train_classifier(model_name: str, model_kwargs: dict, data_root: str | os.PathLike,
                     run_dir: str | os.PathLike, metrics_path: str | os.PathLike,
                     history_path: str | os.PathLike, *, epochs: int, batch_size: int, lr: float,
                     momentum: float = 0.9, weight_decay: float = 1e-4, lr_schedule: str = "step",
                     milestones: Sequence[int] = (), lr_gamma: float = 0.1, warmup_epochs: float = 0,
                     label_smoothing: float = 0.0, image_size: int = 224, workers: int = 0, seed: int = 0,
                     device: str = "cpu", progress: Progress | None = None,
                     random_crop_min_scale: float = 0.08, no_weight_decay_on_bn_bias: bool = False,
                     skip_corrupt: bool = False, verify_images: bool = True,
                     dataset_name: str | None = None, grad_clip_norm: float | None = None,
                     amp: str = "off", channels_last: bool = False, compile: bool = False,
                     sync_bn: bool = False) -> dict:
    """Train `model_name` on the ImageFolder tree `data_root`; returns the final metrics dict.

    `batch_size` is the global batch (split over ranks); `lr` applies to it as given (scale it
    for the batch yourself, e.g. 0.1 * batch / 256). Writes run_dir/last.pt every epoch and
    run_dir/best.pt when val top-1 improves (atomic), `history_path` (TSV, one row per epoch)
    every epoch, and `metrics_path` (JSON) once training is complete. Rerunning resumes from
    run_dir/last.pt when it was written with the same recipe (else starts over); a finished run
    only rewrites the metrics. `progress(epoch, step, total_steps, info)` is called after each
    training step (info: phase="train", loss, top1, lr, images_per_s) and once per epoch with
    phase="epoch" and that epoch's history row. Epochs and steps are 1-based.

    Speed options: `amp` "off" (fp32), "bf16" (autocast; CPU or CUDA) or "fp16" (autocast plus
    a GradScaler; CUDA only, else UserError); `channels_last` (NHWC weights and inputs);
    `compile` (torch.compile the training forward; validation runs the plain module);
    `sync_bn` (BatchNorm statistics over the global batch of all ranks: nn.SyncBatchNorm on
    CUDA, GlobalBatchNorm2d on CPU / gloo; a no-op for a single process). Validation during training uses the same amp and layout.
    """
    dist_info = init_distributed(device)
    torch_device = _resolve_device(device, dist_info)
    _check_amp(amp, torch_device)
    run_dir, metrics_path, history_path = Path(run_dir), Path(metrics_path), Path(history_path)
    model_kwargs = dict(model_kwargs or {})
    for reserved in ("num_classes", "checkpoint", "seed"):
        if reserved in model_kwargs:
            raise UserError(f"model_kwargs.{reserved}: set by the training engine; remove it")

    train_set = build_imagefolder(data_root, "train", train_transform(image_size, random_crop_min_scale),
                                  skip_corrupt=skip_corrupt, verify_images=verify_images)
    val_set = build_imagefolder(data_root, "val", eval_transform(image_size), expected_classes=train_set.classes,
                                skip_corrupt=skip_corrupt, verify_images=verify_images)
    recipe = TrainRecipe(
        model_name=model_name, model_kwargs=model_kwargs, classes=train_set.classes, epochs=epochs,
        batch_size=batch_size, lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay),
        lr_schedule=lr_schedule, milestones=sorted(int(m) for m in milestones), lr_gamma=float(lr_gamma),
        warmup_epochs=float(warmup_epochs), label_smoothing=float(label_smoothing), image_size=image_size,
        random_crop_min_scale=float(random_crop_min_scale),
        no_weight_decay_on_bn_bias=bool(no_weight_decay_on_bn_bias), seed=int(seed),
        world_size=dist_info.world_size, amp=amp, channels_last=bool(channels_last), compile=bool(compile),
        sync_bn=bool(sync_bn))
    _check_recipe(recipe)
    per_rank_batch = batch_size // dist_info.world_size
    steps_per_epoch = len(train_set) // batch_size
    if steps_per_epoch < 1:
        raise UserError(f"batch_size={batch_size}: larger than the {len(train_set)} training images in "
                        f"{Path(data_root) / 'train'}; expected at most that many")

    with _deterministic_mode(torch_device):
        return _train(recipe, dist_info, torch_device, train_set, val_set, run_dir, metrics_path, history_path,
                      per_rank_batch, steps_per_epoch, workers, progress, dataset_name or Path(data_root).name,
                      grad_clip_norm)


def _train(recipe: TrainRecipe, dist_info: DistInfo, device: torch.device, train_set: ImageFolderDataset,
           val_set: ImageFolderDataset, run_dir: Path, metrics_path: Path, history_path: Path,
           per_rank_batch: int, steps_per_epoch: int, workers: int, progress: Progress | None,
           dataset_name: str, grad_clip_norm: float | None) -> dict:
    from sge_repro.models import create_model
    from sge_repro.models.checkpoints import make_classifier_checkpoint

    model = create_model(recipe.model_name, num_classes=len(recipe.classes), seed=recipe.seed,
                         **recipe.model_kwargs)
    if recipe.sync_bn:
        if dist_info.enabled:
            # Same parameters and buffers (state_dict keys unchanged); BN statistics over all ranks:
            # torch's SyncBatchNorm on CUDA, GlobalBatchNorm2d on CPU / gloo.
            model = convert_sync_batchnorm(model, device)
        else:
            log.info("sync_bn: a single process already normalises over the whole batch; using plain BatchNorm")
    # Layout before the optimizer exists, so its momentum buffers take the same layout.
    model = model.to(device, memory_format=_memory_format(recipe.channels_last))
    optimizer = torch.optim.SGD(
        _parameter_groups(model, recipe.weight_decay, recipe.no_weight_decay_on_bn_bias),
        lr=recipe.lr, momentum=recipe.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: lr_factor(
        iteration, steps_per_epoch, recipe.epochs, recipe.lr_schedule, recipe.milestones, recipe.lr_gamma,
        recipe.warmup_epochs))
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    # fp16 overflows without loss scaling; bf16 and fp32 need none (a disabled scaler is a no-op).
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.amp == "fp16")

    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    start_epoch, history, best = 0, [], {"epoch": 0, "top1": -1.0, "top5": 0.0}
    if last_path.is_file():
        state = _load_resume_state(last_path, recipe)
        if state is not None:
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler.is_enabled():
                if "grad_scaler" not in state:
                    raise UserError(f"checkpoint {last_path}: amp='fp16' run without grad_scaler state; "
                                    "expected last.pt written by an fp16 run (delete the run folder to start over)")
                scaler.load_state_dict(state["grad_scaler"])
            start_epoch, history, best = int(state["epoch"]), list(state["history"]), dict(state["best"])
            log.info("resuming %s from %s (epoch %d of %d)", recipe.model_name, last_path, start_epoch,
                     recipe.epochs)

    train_model: nn.Module = model
    if dist_info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if recipe.compile:
        train_model = torch.compile(train_model)
    pin_memory = device.type == "cuda"
    val_loader = _val_loader(val_set, per_rank_batch, workers, dist_info, pin_memory)
    skipped_total = len(train_set.skipped) + len(val_set.skipped)
    loader = _train_loader(PerSampleSeededDataset(train_set, recipe.seed), recipe.batch_size, workers, dist_info,
                           recipe.seed, pin_memory)

    for epoch in range(start_epoch, recipe.epochs):
        _seed_everything(_derived_seed("epoch", recipe.seed, epoch, dist_info.rank))
        set_train_epoch(loader, epoch)
        train_model.train()
        loss_sum, correct_sum, seen, epoch_skipped = 0.0, 0.0, 0, 0
        started = time.perf_counter()
        for step, (images, targets, num_skipped) in enumerate(loader, start=1):
            epoch_skipped += num_skipped
            if images is None:
                continue
            images = images.to(device, non_blocking=True, memory_format=_memory_format(recipe.channels_last))
            targets = targets.to(device, non_blocking=True)
            with _autocast(recipe.amp, device):
                logits = train_model(images)
                loss = criterion(logits, targets)  # autocast computes cross-entropy in fp32
            if not _finite_everywhere(loss, dist_info):
                raise UserError(
                    f"training {recipe.model_name}: loss is {loss.item()} at epoch {epoch + 1} step {step} "
                    f"(global step {epoch * steps_per_epoch + step}); stopped. "
                    + (f"Last good checkpoint kept: {last_path}" if last_path.is_file() else "No checkpoint yet")
                    + "; expected a finite loss (lower lr or check the data)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if grad_clip_norm:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
            scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
            scaler.update()
            scheduler.step()
            loss_sum += loss.item() * targets.shape[0]
            correct_sum += logits.argmax(dim=1).eq(targets).sum().item()
            seen += targets.shape[0]
            if progress is not None and dist_info.is_main:
                elapsed = time.perf_counter() - started
                progress(epoch + 1, step, steps_per_epoch, {
                    "phase": "train", "loss": loss_sum / seen, "top1": 100.0 * correct_sum / seen,
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": seen * dist_info.world_size / max(elapsed, 1e-9)})
        train_time = time.perf_counter() - started
        loss_sum, correct_sum, seen, epoch_skipped = _all_reduce_sum(
            [loss_sum, correct_sum, float(seen), float(epoch_skipped)], dist_info, device)
        _broadcast_buffers(model, dist_info)
        val = _validate(model, val_loader, device, dist_info, amp=recipe.amp, channels_last=recipe.channels_last)
        epoch_time = time.perf_counter() - started
        row = {
            "epoch": epoch + 1,
            # lr of the epoch's last step (the schedule has already advanced one step past it).
            "lr": recipe.lr * lr_factor(scheduler.last_epoch - 1, steps_per_epoch, recipe.epochs, recipe.lr_schedule,
                                        recipe.milestones, recipe.lr_gamma, recipe.warmup_epochs),
            "train_loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct_sum / max(seen, 1),
            "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
            "images_per_s": seen / max(train_time, 1e-9), "epoch_time_s": epoch_time,
        }
        history.append(row)
        improved = val["top1"] > best["top1"]
        if improved:
            best = {"epoch": epoch + 1, "top1": val["top1"], "top5": val["top5"]}
        if dist_info.is_main:
            checkpoint = make_classifier_checkpoint(
                recipe.model_name, {**recipe.model_kwargs, "num_classes": len(recipe.classes)}, model,
                epoch=epoch + 1, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                rng={"torch": torch.get_rng_state()}, history=history, best=best, seed=recipe.seed,
                classes=recipe.classes, dataset=dataset_name, recipe=asdict(recipe),
                recipe_fingerprint=recipe.fingerprint(),
                **({"grad_scaler": scaler.state_dict()} if scaler.is_enabled() else {}))
            if improved:
                atomic.torch_save(checkpoint, best_path)
            atomic.torch_save(checkpoint, last_path)
            _write_history(history_path, history)
        if progress is not None and dist_info.is_main:
            progress(epoch + 1, steps_per_epoch, steps_per_epoch, {"phase": "epoch", **row})
        skipped_total += int(epoch_skipped)

    metrics = _final_metrics(recipe, history, best, dataset_name, len(train_set), len(val_set), skipped_total,
                             model)
    if dist_info.is_main:
        _write_history(history_path, history)
        atomic.write_json(metrics_path, metrics)
    return metrics


def _final_metrics(recipe: TrainRecipe, history: list[dict], best: dict, dataset_name: str,
                   num_train: int, num_val: int, skipped: int, model: nn.Module) -> dict:
    final = history[-1]
    return {
        "model": recipe.model_name,
        "dataset": dataset_name,
        "seed": recipe.seed,
        "epochs": recipe.epochs,
        "top1": final["val_top1"],
        "top5": final["val_top5"],
        "loss": final["val_loss"],
        "train_loss": final["train_loss"],
        "train_top1": final["train_top1"],
        "best_epoch": best["epoch"],
        "best_top1": best["top1"],
        "best_top5": best["top5"],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_time_s": sum(row["epoch_time_s"] for row in history),
        "images_per_s": sum(row["images_per_s"] for row in history) / len(history),
        "num_train_images": num_train,
        "num_val_images": num_val,
        "skipped_corrupt": skipped,
    }


# --------------------------------------------------------------------------- evaluation


def evaluate_classifier(checkpoint_path: str | os.PathLike, data_root: str | os.PathLike,
                        metrics_path: str | os.PathLike, predictions_path: str | os.PathLike, *,
                        image_size: int, batch_size: int, workers: int = 0, model_name: str | None = None,
                        model_kwargs: dict | None = None, dataset_name: str | None = None,
                        seed: int | None = None, device: str = "cpu", skip_corrupt: bool = False,
                        verify_images: bool = True, progress: Progress | None = None, amp: str = "off",
                        channels_last: bool = False) -> dict:
    """Top-1/top-5/loss on data_root/val of a checkpoint; writes metrics and per-image predictions.

    `amp` ("off", "bf16", "fp16"; fp16 needs CUDA) and `channels_last` as in train_classifier.

    The checkpoint may be ours (model and classes read from it; `model_name`, if given, must
    match) or a foreign file (torchvision / official release), which needs `model_name` (and
    `model_kwargs` such as width/groups); then the val class folders define the classes.
    metrics JSON: {"model", "dataset", "seed", "top1", "top5", "loss", "num_images"} (percent).
    predictions JSON: {"model", "dataset", "seed", "classes", "files", "targets", "predictions",
    "correct_top1", "correct_top5"}, lists in dataset order (sorted class folder, file name).
    """
    from sge_repro.models import create_model
    from sge_repro.models.checkpoints import interpret_checkpoint, load_checkpoint_file

    checkpoint_path = Path(checkpoint_path)
    raw = load_checkpoint_file(checkpoint_path)
    _, detected, header = interpret_checkpoint(raw, checkpoint_path)
    expected_classes = None
    if header is not None:
        if model_name is not None and model_name != header["model"]:
            raise UserError(f"checkpoint {checkpoint_path}: holds model {header['model']!r}, expected {model_name!r}")
        model_name = header["model"]
        kwargs = dict(header["model_kwargs"])
        expected_classes = raw.get("classes")
        seed = raw.get("seed", seed) if seed is None else seed
        dataset_name = dataset_name or raw.get("dataset")
    else:
        if model_name is None:
            raise UserError(f"checkpoint {checkpoint_path}: a {detected} file does not name its model; "
                            "expected model_name (e.g. resnet50)")
        kwargs = dict(model_kwargs or {})
    del raw

    dist_info = DistInfo()
    torch_device = _resolve_device(device, dist_info)
    _check_amp(amp, torch_device)
    dataset = build_imagefolder(data_root, "val", eval_transform(image_size), expected_classes=expected_classes,
                                skip_corrupt=skip_corrupt, verify_images=verify_images)
    kwargs.setdefault("num_classes", len(dataset.classes))
    if kwargs["num_classes"] != len(dataset.classes):
        raise UserError(f"checkpoint {checkpoint_path}: has {kwargs['num_classes']} classes but "
                        f"{Path(data_root) / 'val'} has {len(dataset.classes)}; expected the same number")
    model = create_model(model_name, checkpoint=checkpoint_path, **kwargs).to(
        torch_device, memory_format=_memory_format(channels_last))
    loader = _val_loader(dataset, batch_size, workers, dist_info, torch_device.type == "cuda")
    if progress is not None:
        progress(1, 0, len(loader), {"phase": "eval"})
    with _deterministic_mode(torch_device):
        result = _validate(model, loader, torch_device, dist_info, collect=True, amp=amp,
                           channels_last=channels_last)
    if progress is not None:
        progress(1, len(loader), len(loader), {"phase": "eval", "top1": result["top1"]})

    dataset_name = dataset_name or Path(data_root).name
    metrics = {"model": model_name, "dataset": dataset_name, "seed": seed, "top1": result["top1"],
               "top5": result["top5"], "loss": result["loss"], "num_images": result["num_images"],
               "skipped_corrupt": len(dataset.skipped) + result["skipped"]}
    files, targets = dataset.file_names, dataset.targets
    if result["skipped"]:
        # Drop the files that failed at load time so the lists stay aligned.
        loaded = [i for i in range(len(dataset)) if dataset[i] is not None]
        files, targets = [files[i] for i in loaded], [targets[i] for i in loaded]
    predictions = {"model": model_name, "dataset": dataset_name, "seed": seed, "classes": dataset.classes,
                   "files": files, "targets": targets, "predictions": result["predictions"],
                   "correct_top1": result["correct_top1"], "correct_top5": result["correct_top5"]}
    atomic.write_json(predictions_path, predictions)
    atomic.write_json(metrics_path, metrics)
    return metrics
