"""sge_repro.distributed in a single process (multi-process runs: tests/classification/test_distributed.py)."""

import pytest
import torch

from sge_repro.distributed import DistInfo, all_reduce_sum, join_process_group, rank_device
from sge_repro.errors import UserError


def test_a_single_process_joins_no_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    info = join_process_group(cuda=False)
    assert info == DistInfo() and info.is_main and not info.enabled
    assert not torch.distributed.is_initialized()
    assert all_reduce_sum([1.0, 2.5], info, torch.device("cpu")) == [1.0, 2.5]


def test_device_names_are_checked():
    assert rank_device("cpu", DistInfo()) == torch.device("cpu")
    with pytest.raises(UserError, match="device='tpu': expected 'cpu', 'cuda' or 'cuda:<index>'"):
        rank_device("tpu", DistInfo())
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device='cuda': CUDA is not available here"):
            rank_device("cuda", DistInfo())


@pytest.mark.gpu
def test_each_rank_takes_its_local_gpu_and_a_named_gpu_is_refused_for_several():
    two_ranks = DistInfo(rank=1, world_size=2, local_rank=1)
    assert rank_device("cuda", two_ranks) == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"device='cuda:0': with 2 processes each uses cuda:LOCAL_RANK; "
                                        r"expected 'cuda'"):
        rank_device("cuda:0", two_ranks)
