import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # Same thread count in this process and the subprocesses: CPU results are bit-reproducible.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
