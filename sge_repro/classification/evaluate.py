"""Validation (during training, sharded over ranks) and the evaluation of a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from sge_repro import atomic
from sge_repro.classification.determinism import deterministic_mode
from sge_repro.classification.precision import autocast, check_amp_on_device, memory_format
from sge_repro.classification.sampling import val_loader
from sge_repro.classification.transforms import eval_transform, to_model_input
from sge_repro.data.imagefolder import open_imagefolder
from sge_repro.distributed import DistInfo, rank_device, sum_over_ranks
from sge_repro.errors import UserError
from sge_repro.models import create_model
from sge_repro.models.weight_files import interpret_checkpoint, load_checkpoint_file
from sge_repro.params_sections import EvalClsParams

Progress = Callable[[int, int, int, dict], None]


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> list[torch.Tensor]:
    """Per-sample 0/1 correctness within the top k, for each k (k capped at the class count)."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = top.eq(targets[:, None])
    return [hits[:, : min(k, logits.shape[1])].any(dim=1) for k in ks]


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, device: torch.device, dist_info: DistInfo,
             collect: bool = False, amp: str = "fp32", channels_last: bool = False,
             on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Loss and top-1/top-5 (percent) over the loader, summed over the ranks' shards; with
    collect, per-sample results of this rank too. `on_batch(index, total)` as each batch (1-based) starts.

    Sums accumulate on the device (float64: the same additions, in the same order, as summing the
    batches' values on the host) and the host reads them once, after the last batch."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits
    count, skipped = 0, 0
    predictions, correct1, correct5 = [], [], []
    for batch, (images, targets, num_skipped) in enumerate(loader, start=1):
        skipped += num_skipped
        if on_batch is not None:
            on_batch(batch, len(loader))
        if images is None:
            continue
        images = to_model_input(images, device, channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(amp, device):
            logits = model(images)
        logits = logits.float()  # top-k ties and the loss in fp32, whatever the autocast dtype
        hit1, hit5 = topk_correct(logits, targets, (1, 5))
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                               hit1.sum().double(), hit5.sum().double()])
        count += targets.shape[0]
        if collect:
            predictions.append(logits.argmax(dim=1))
            correct1.append(hit1)
            correct5.append(hit5)
    if collect:
        predictions, correct1, correct5 = ([] if not parts else torch.cat(parts).int().tolist()
                                           for parts in (predictions, correct1, correct5))
    loss_sum, top1_sum, top5_sum, count, skipped = sum_over_ranks(
        torch.cat([totals, torch.tensor([count, skipped], dtype=torch.float64).to(device)]), dist_info)
    if count == 0:
        raise UserError("validation: no image could be loaded; expected at least one readable val image")
    result = {"loss": loss_sum / count, "top1": 100.0 * top1_sum / count, "top5": 100.0 * top5_sum / count,
              "num_images": int(count), "skipped": int(skipped)}
    if collect:
        result.update(predictions=predictions, correct_top1=correct1, correct_top5=correct5)
    return result


def evaluate_classifier(params: EvalClsParams, checkpoint_path: str | os.PathLike, data_root: str | os.PathLike,
                        metrics_path: str | os.PathLike, predictions_path: str | os.PathLike, *,
                        model_name: str | None = None, model_kwargs: dict | None = None,
                        dataset_name: str | None = None, seed: int | None = None, skip_corrupt: bool = False,
                        progress: Progress | None = None) -> dict:
    """Top-1/top-5/loss on the val split of `data_root` (the data stage's manifest, or an ImageFolder
    folder) of a checkpoint; writes metrics and per-image predictions.

    The checkpoint may be ours (model and classes read from it; `model_name`, if given, must
    match) or a foreign file (torchvision / official release), which needs `model_name` (and
    `model_kwargs` such as width/groups); then the val class folders define the classes.
    `params.amp` and `params.channels_last` as in training (fp16 needs CUDA).
    metrics JSON: {"model", "dataset", "seed", "top1", "top5", "loss", "num_images"} (percent), and
    "subset_of": the val split's size when the manifest takes a subset of it.
    predictions JSON: {"model", "dataset", "seed", "classes", "files", "targets", "predictions",
    "correct_top1", "correct_top5"}, lists in dataset order (sorted class folder, file name).
    """
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
    device = rank_device(params.device, dist_info)
    check_amp_on_device(params.amp, device)
    dataset = open_imagefolder(data_root, "val", eval_transform(params.image_size, decoder=params.decoder), expected_classes=expected_classes,
                               skip_corrupt=skip_corrupt)
    kwargs.setdefault("num_classes", len(dataset.classes))
    if kwargs["num_classes"] != len(dataset.classes):
        raise UserError(f"checkpoint {checkpoint_path}: has {kwargs['num_classes']} classes but "
                        f"{dataset.root / 'val'} has {len(dataset.classes)}; expected the same number")
    model = create_model(model_name, checkpoint=checkpoint_path, **kwargs).to(
        device, memory_format=memory_format(params.channels_last))
    loader = val_loader(dataset, params.batch_size, params.workers, dist_info, device.type == "cuda")
    if progress is not None:
        progress(1, 0, len(loader), {"phase": "eval"})
    with deterministic_mode(device):
        result = validate(model, loader, device, dist_info, collect=True, amp=params.amp,
                          channels_last=params.channels_last,
                          on_batch=None if progress is None else lambda done, total: progress(
                              1, done - 1, total, {"phase": "eval"}))
    if progress is not None:
        progress(1, len(loader), len(loader), {"phase": "eval", "top1": result["top1"]})

    dataset_name = dataset_name or Path(data_root).name
    metrics = {"model": model_name, "dataset": dataset_name, "seed": seed, "top1": result["top1"],
               "top5": result["top5"], "loss": result["loss"], "num_images": result["num_images"],
               "skipped_corrupt": len(dataset.skipped) + result["skipped"],
               # a val subset (data.classification.max_val_images): num_images of this many
               **({"subset_of": dataset.subset_of} if dataset.subset_of is not None else {})}
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
