"""UserError's one-line contract: the preview of a list of names, and a UserError raised in a
data-loader worker process keeping its message through torch's re-raise."""

import pytest
from torch.utils.data import DataLoader, Dataset

from sge_repro.errors import UserError, preview
from sge_repro.launch.errors import LaunchError


def test_preview_shows_the_first_five_and_counts_the_rest():
    assert preview([]) == "none"
    assert preview(["a", "b"]) == "a, b"
    assert preview([f"n{i}" for i in range(5)]) == "n0, n1, n2, n3, n4"
    assert preview([f"n{i}" for i in range(8)]) == "n0, n1, n2, n3, n4 and 3 more"
    assert preview(["a", "b", "c"], limit=1) == "a and 2 more"


class Failing(Dataset):
    def __init__(self, error: type[UserError]):
        self.error = error

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        raise self.error(f"data/x_{index}.jpg: corrupt or unreadable image (truncated); expected a decodable image")


@pytest.mark.parametrize("error", [UserError, LaunchError])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_user_error_from_a_loader_worker_keeps_its_one_line_message(error, workers):
    # torch re-raises a worker's exception as type(error)("Caught ... Original Traceback ...")
    with pytest.raises(error) as raised:
        next(iter(DataLoader(Failing(error), num_workers=workers, multiprocessing_context="spawn"
                             if workers else None)))
    assert str(raised.value) == "data/x_0.jpg: corrupt or unreadable image (truncated); expected a decodable image"


def test_a_message_that_only_looks_like_a_worker_error_is_kept_whole():
    text = "Caught UserError in DataLoader worker process 0.\nno traceback follows"
    assert str(UserError(text)) == text
    assert str(UserError("Caught fire in the data centre")) == "Caught fire in the data centre"
