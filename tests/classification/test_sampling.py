"""What each rank loads: the training loader (built once, persistent workers, epochs chosen in the
main process), global batches split over ranks, per-sample seeded augmentation."""

import pytest
import torch

from sge_repro.classification.sampling import (GlobalBatchSampler, PerSampleSeededDataset, set_train_epoch,
                                               train_loader)
from sge_repro.classification.transforms import train_transform
from sge_repro.data.imagefolder import build_imagefolder
from sge_repro.data.synthetic import generate_classification_set
from sge_repro.distributed import DistInfo


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "cls"
    generate_classification_set(root, num_classes=2, image_size=24, train_per_class=10, val_per_class=1, seed=4)
    return build_imagefolder(root, "train", train_transform(16, min_scale=0.3))


def epochs_of_batches(train_set, workers: int, epochs, dist_info=DistInfo()):
    loader = train_loader(train_set, 6, workers, dist_info, seed=7, pin_memory=False)
    result, worker_pids = [], []
    for epoch in epochs:
        set_train_epoch(loader, epoch)
        result.append([(images, targets) for images, targets, _ in loader])
        if workers:
            worker_pids.append([worker.pid for worker in loader._iterator._workers])
    return result, worker_pids


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (images_a, targets_a), (images_b, targets_b) in zip(a, b):
        assert torch.equal(targets_a, targets_b) and torch.equal(images_a, images_b)


def test_persistent_workers_give_the_in_process_batches_of_every_epoch(train_set):
    in_process, _ = epochs_of_batches(train_set, 0, [0, 1])
    with_workers, worker_pids = epochs_of_batches(train_set, 2, [0, 1])
    assert len(in_process[0]) == 20 // 6
    for epoch in (0, 1):
        assert_same_batches(with_workers[epoch], in_process[epoch])
    # The same two worker processes served both epochs.
    assert worker_pids[0] == worker_pids[1] and len(set(worker_pids[0])) == 2
    # ...and the epoch reached them: epoch 1 has another order and other crops.
    first_images = torch.cat([images for images, _ in with_workers[0]])
    second_images = torch.cat([images for images, _ in with_workers[1]])
    assert not torch.equal(first_images, second_images)


def test_workers_started_by_spawn_give_the_in_process_batches(train_set):
    """A rank the local launcher spawned starts its loader workers by spawn too (multiprocessing
    carries the start method into the child): each rebuilds the dataset from its pickle in a fresh
    interpreter, seeded as a forked one is."""
    in_process, _ = epochs_of_batches(train_set, 0, [1])
    loader = train_loader(train_set, 6, 1, DistInfo(), seed=7, pin_memory=False)
    loader.multiprocessing_context = "spawn"
    set_train_epoch(loader, 1)
    assert_same_batches([(images, targets) for images, targets, _ in loader], in_process[0])


def test_a_loader_started_at_epoch_one_gives_that_epoch_as_a_resumed_run_would(train_set):
    uninterrupted, _ = epochs_of_batches(train_set, 2, [0, 1])
    resumed, _ = epochs_of_batches(train_set, 2, [1])
    assert_same_batches(resumed[0], uninterrupted[1])


def test_ranks_split_every_global_batch_in_contiguous_slices():
    one = GlobalBatchSampler(20, 6, rank=0, world_size=1, seed=3)
    ranks = [GlobalBatchSampler(20, 6, rank=rank, world_size=2, seed=3) for rank in range(2)]
    for sampler in (one, *ranks):
        sampler.set_epoch(2)
    for whole, first, second in zip(one, *ranks, strict=True):
        assert whole == first + second and len(first) == 3
        assert {epoch for _, epoch in whole} == {2}
    assert len(one) == 3  # 20 // 6: the incomplete last global batch is dropped
    epoch2_order = [index for batch in one for index, _ in batch]
    one.set_epoch(3)
    assert [index for batch in one for index, _ in batch] != epoch2_order
    one.set_epoch(2)
    assert [index for batch in one for index, _ in batch] == epoch2_order


def test_augmentation_depends_only_on_seed_epoch_and_index(train_set):
    dataset = PerSampleSeededDataset(train_set, seed=7)
    state = torch.get_rng_state()
    image, _ = dataset[(3, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    torch.manual_seed(123)
    assert torch.equal(dataset[(3, 1)][0], image)
    assert not torch.equal(dataset[(3, 2)][0], image)
    assert not torch.equal(PerSampleSeededDataset(train_set, seed=8)[(3, 1)][0], image)
