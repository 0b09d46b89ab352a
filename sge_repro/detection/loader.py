"""The detector's training data stream, resumable at any iteration, and named image failures.

detectron2's training loader is an infinite seeded stream: position p of the stream is image
`perm_e[p % N]` of epoch e = p // N (a torch.randperm per epoch from one generator seeded with
cfg.SEED); rank r of W takes positions r, r + W, ... and groups its images by aspect ratio into
batches of IMS_PER_BATCH / W. This module keeps that stream and adds an exact resume (the grouping
is replayed on the image sizes alone to find where iteration k starts) and augmentation seeded by
(SEED, p) per image, independent of the loader workers, the resume point and earlier draws.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils import data as torchdata

from sge_repro.data.imagefolder import decode_error
from sge_repro.detection.compat import import_detectron2
from sge_repro.errors import UserError
from sge_repro.seeds import derived_seed

import_detectron2()
from detectron2.config import CfgNode  # noqa: E402
from detectron2.data import DatasetFromList, DatasetMapper, get_detection_dataset_dicts  # noqa: E402
from detectron2.data.common import ToIterableDataset  # noqa: E402
from detectron2.utils import comm  # noqa: E402

Key = tuple[int, int]  # (stream position, dataset index)


def stream(size: int, seed: int, start: int = 0) -> Iterator[Key]:
    """(position, index) of detectron2's TrainingSampler stream from position `start` on."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    for epoch in itertools.count():
        permutation = torch.randperm(size, generator=generator)
        if (epoch + 1) * size <= start:
            continue  # drawn only to advance the generator
        first = max(0, start - epoch * size)
        for offset, index in enumerate(permutation[first:].tolist(), start=epoch * size + first):
            yield offset, index


def rank_keys(size: int, seed: int, rank: int, world_size: int, start: int = 0) -> Iterator[Key]:
    """This rank's share of the stream (positions rank, rank + world_size, ...) from `start` on."""
    return ((position, index) for position, index in stream(size, seed, start) if position % world_size == rank)


def resume_point(groups: list[int], seed: int, rank: int, world_size: int, batch_size: int,
                 batches_done: int) -> tuple[int, list[Key]]:
    """(next stream position, keys waiting in the aspect buckets) after this rank has formed
    `batches_done` batches: replays the grouping on each image's group alone."""
    if batches_done == 0:
        return 0, []
    buckets: dict[int, list[Key]] = {}
    done = 0
    for key in rank_keys(len(groups), seed, rank, world_size):
        bucket = buckets.setdefault(groups[key[1]], [])
        bucket.append(key)
        if len(bucket) == batch_size:
            bucket.clear()
            done += 1
            if done == batches_done:
                return key[0] + 1, sorted(itertools.chain.from_iterable(buckets.values()))
    raise AssertionError("unreachable: the stream is infinite")


class ResumedStreamSampler(torchdata.Sampler):
    """This rank's keys from a resume point: the waiting keys first, then the stream."""

    def __init__(self, size: int, seed: int, rank: int, world_size: int, start: int, waiting: list[Key]):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.start, self.waiting = start, list(waiting)

    def __iter__(self) -> Iterator[Key]:
        yield from self.waiting
        yield from rank_keys(self.size, self.seed, self.rank, self.world_size, self.start)


@contextlib.contextmanager
def _seeded(seed: int):
    """numpy's and python's global RNGs seeded for one image, restored afterwards."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


class PositionedDataset(torchdata.Dataset):
    """dataset[(position, index)] = mapper(record index), with the augmentation seeded by
    (seed, position)."""

    def __init__(self, records: list[dict], mapper: Callable[[dict], Any], seed: int):
        self.records = DatasetFromList(records, copy=False)
        self.mapper = mapper
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Key):
        position, index = key
        with _seeded(derived_seed("detection-augmentation", self.seed, position)):
            mapped = self.mapper(self.records[index])
        if mapped is None:
            raise RuntimeError(f"the dataset mapper dropped image {self.records[index].get('file_name')}")
        return mapped


def aspect_group(record: dict, grouping: bool) -> int:
    return (0 if record["width"] > record["height"] else 1) if grouping else 0


class GroupedBatches(torchdata.IterableDataset):
    """Batches of `batch_size` consecutive images of one aspect group (detectron2's
    AspectRatioGroupedDataset; with grouping off, one group)."""

    def __init__(self, items, batch_size: int, grouping: bool):
        self.items, self.batch_size, self.grouping = items, batch_size, grouping

    def __iter__(self):
        buckets: dict[int, list] = {}
        for item in self.items:
            bucket = buckets.setdefault(aspect_group(item, self.grouping), [])
            bucket.append(item)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()


class ShimsFirst(torchdata.IterableDataset):
    """The loader's dataset as its workers receive it. A worker started by spawn or forkserver (every
    loader worker of a rank that the local launcher spawned) imports the pickled classes afresh, in
    pickling order: this class comes first, so this module, and with it compat's shims, are
    imported before any detectron2 module (whose import fails on Pillow >= 10 without them)."""

    def __init__(self, dataset: torchdata.IterableDataset):
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)


def training_records(cfg: CfgNode) -> list[dict]:
    """The training set's records as detectron2's default loader reads them."""
    return get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )


def build_train_loader(cfg: CfgNode, records: list[dict], start_iter: int):
    """This rank's batches for iterations start_iter, start_iter + 1, ... of the run."""
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise UserError(f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN!r}: only TrainingSampler "
                        "is supported (its stream is what a resume replays)")
    world_size, rank = comm.get_world_size(), comm.get_rank()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total % world_size:
        raise UserError(f"train_det.ims_per_batch={total}: the global batch must split evenly over "
                        f"{world_size} processes")
    batch_size, grouping = total // world_size, bool(cfg.DATALOADER.ASPECT_RATIO_GROUPING)
    groups = [aspect_group(record, grouping) for record in records]
    start, waiting = resume_point(groups, cfg.SEED, rank, world_size, batch_size, start_iter)
    sampler = ResumedStreamSampler(len(records), cfg.SEED, rank, world_size, start, waiting)
    dataset = ShimsFirst(ToIterableDataset(
        PositionedDataset(records, NamedImageErrors(DatasetMapper(cfg, True)), cfg.SEED), sampler))
    # the loader's own generator: starting its iterator (lazily, at the first batch) must not
    # draw from the global torch RNG, whose state a resume restores before that first batch
    generator = torch.Generator()
    generator.manual_seed(derived_seed("detection-loader", cfg.SEED, rank))
    items = torchdata.DataLoader(dataset, num_workers=cfg.DATALOADER.NUM_WORKERS,
                                 collate_fn=operator.itemgetter(0), generator=generator)
    return GroupedBatches(items, batch_size, grouping)


# --------------------------------------------------------------------------- image failures
class NamedImageErrors:
    """mapper(record), where a record whose image cannot be decoded raises the one-line UserError
    naming the file (also from a loader worker: UserError survives torch's re-raise).

    The data stage decoded every image once; a file that fails here changed since. Not skipped
    even with data.skip_corrupt: a training stream with a hole would not be the one a resume
    replays, and an evaluation would not be over the images the manifest lists. Rerunning the
    data stage names it again, or with data.skip_corrupt leaves it out of the manifest.
    """

    def __init__(self, mapper: Callable[[dict], Any]):
        self.mapper = mapper

    def __call__(self, record: dict):
        try:
            return self.mapper(record)
        except Exception as error:
            reason = decode_error(record["file_name"])  # the image, decoded as the data stage did
            if reason is None:
                raise  # not the image's fault
            raise UserError(f"{record['file_name']}: corrupt or unreadable image ({reason}); it changed after the "
                            "data stage verified it: rerun the data stage (`sge-repro run data`), which names it "
                            "or, with data.skip_corrupt, leaves it out") from error
