"""What each rank loads: global batches split over ranks, per-sample seeded augmentation, loaders.

Augmentation is seeded per sample from (seed, epoch, index), so results do not depend on the
number of loader workers; the sampler hands each index to the workers together with its epoch,
so the train loader is built once and its workers persist across epochs.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, SequentialSampler, Subset

from sge_repro.classification.determinism import seed_worker
from sge_repro.seeds import derived_seed
from sge_repro.data.imagefolder import ImageFolderDataset, collate_skipping_none
from sge_repro.distributed import DistInfo


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
        self.generator_seed = derived_seed("sampler", self.seed, epoch)

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
            self._epoch_seeds[epoch] = derived_seed("augment", self.seed, epoch)
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


def resolve_workers(workers: int | str) -> int:
    """Loader worker processes for this process: `workers` as given, or for "auto" this process's
    share of the CPU cores, less one core for its own training loop; 0 (load in the process) when
    that leaves none. The share: under SLURM, the task's own cores (SLURM_CPUS_PER_TASK, within
    its affinity mask: with task binding the mask already holds only this task's cores, so it is
    not divided again); otherwise the cores of the affinity mask (taskset) divided among the
    training processes of this node (torchrun's LOCAL_WORLD_SIZE)."""
    if workers != "auto":
        return int(workers)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS)
        cores = os.cpu_count() or 1
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        return max(0, min(cores, int(per_task)) - 1)
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, cores // local_processes - 1)


def train_loader(dataset: ImageFolderDataset, global_batch: int, workers: int | str, dist_info: DistInfo,
                 seed: int, pin_memory: bool) -> DataLoader:
    """One loader for the whole run; call set_train_epoch(loader, epoch) before iterating it.

    With workers, they persist across epochs (no re-spawn and dataset copy per epoch). The loader
    draws its workers' base seed from a generator of its own, never from the global RNG, so the
    global RNG of epoch k is the same whether the run started at epoch 0 or resumed at k.
    Batches are what the dataset's transform gives, collated: uint8 images with our transforms
    (transforms.to_model_input normalises them on the device)."""
    workers = resolve_workers(workers)
    seeded = PerSampleSeededDataset(dataset, seed)
    batches = GlobalBatchSampler(len(seeded), global_batch, dist_info.rank, dist_info.world_size, seed)
    return DataLoader(seeded, batch_sampler=batches, num_workers=workers, collate_fn=collate_skipping_none,
                      pin_memory=pin_memory, worker_init_fn=seed_worker, persistent_workers=workers > 0,
                      prefetch_factor=2 if workers > 0 else None,
                      generator=torch.Generator().manual_seed(derived_seed("loader", seed, dist_info.rank)))


def set_train_epoch(loader: DataLoader, epoch: int) -> None:
    loader.batch_sampler.set_epoch(epoch)


def val_loader(dataset: ImageFolderDataset, batch_size: int, workers: int | str, dist_info: DistInfo,
               pin_memory: bool) -> DataLoader:
    """This rank's shard of the val set, in order, without padding (DistributedSampler would repeat
    images)."""
    workers = resolve_workers(workers)
    indices = list(range(dist_info.rank, len(dataset), dist_info.world_size))
    shard = Subset(dataset, indices) if dist_info.enabled else dataset
    return DataLoader(shard, batch_size=batch_size, sampler=SequentialSampler(shard), num_workers=workers,
                      collate_fn=collate_skipping_none, pin_memory=pin_memory,
                      persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)
