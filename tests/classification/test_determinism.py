"""train_cls.deterministic: deterministic kernels (embedded, smoke) or cudnn autotuning (paper)."""

from pathlib import Path

import pytest
import torch

from sge_repro.classification.determinism import deterministic_mode
from sge_repro.params import PROFILES_DIR
from sge_repro.params_yaml import profile_params

from .conftest import train

REPO = Path(__file__).resolve().parents[2]


def test_profiles_choose_reproducible_or_fast():
    for name, expected in (("embedded", True), ("smoke", True), ("paper", False)):
        assert profile_params(name, REPO / PROFILES_DIR).train_cls.deterministic is expected, name


@pytest.mark.parametrize("enabled", [True, False])
def test_the_mode_follows_the_param_and_is_restored(enabled):
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    with deterministic_mode(torch.device("cpu"), enabled):
        assert torch.are_deterministic_algorithms_enabled() is enabled
        assert torch.backends.cudnn.benchmark is False  # autotuning is a CUDA matter
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


@pytest.mark.gpu
def test_off_on_cuda_turns_on_cudnn_autotuning():
    with deterministic_mode(torch.device("cuda"), False):
        assert torch.backends.cudnn.benchmark is True and not torch.are_deterministic_algorithms_enabled()
    with deterministic_mode(torch.device("cuda"), True):
        assert torch.backends.cudnn.benchmark is False and torch.are_deterministic_algorithms_enabled()


class Interrupt(Exception):
    pass


def stop_in_epoch_2(epoch, step, total, info):
    if epoch == 2 and info["phase"] == "train":
        raise Interrupt


def test_switching_it_resumes_the_same_recipe(data_root, tmp_path):
    # It picks kernels (float rounding), not what is trained: not part of the resume recipe.
    with pytest.raises(Interrupt):
        train(data_root, tmp_path, epochs=2, deterministic=True, progress=stop_in_epoch_2)
    calls = []
    metrics = train(data_root, tmp_path, epochs=2, deterministic=False, progress=lambda *a: calls.append(a))
    assert min(c[0] for c in calls) == 2 and metrics["epochs"] == 2
    saved = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert saved["recipe"]["deterministic"] is False and [r["epoch"] for r in saved["history"]] == [1, 2]
