"""Mixed precision, channels_last, torch.compile and SyncBN options of the training engine."""

import time
from pathlib import Path

import pytest
import torch

from sge_repro.classification.evaluate import evaluate_classifier
from sge_repro.data.synthetic import generate_classification_set
from sge_repro.errors import UserError
from sge_repro.params_sections import EvalClsParams

from .conftest import train_with_recipe

RECIPE = dict(epochs=3, batch_size=16, lr=0.02, momentum=0.9, weight_decay=1e-4, lr_schedule="cosine",
              warmup_epochs=0, image_size=32, workers=0, seed=5, min_crop_scale=0.35)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "cls"
    generate_classification_set(root, num_classes=3, image_size=32, train_per_class=32, val_per_class=8, seed=1)
    return root


def train(data_root, run: Path, model=("resnet18", {"width": 8}), progress=None, **overrides):
    return train_with_recipe({**RECIPE, **overrides}, model, data_root, run / "ckpt", run / "metrics.json",
                             run / "history.tsv", progress=progress)


class Interrupt(Exception):
    pass


def stop_at_epoch(epoch: int):
    def progress(current_epoch, step, total, info):
        if current_epoch == epoch and info["phase"] == "train":
            raise Interrupt
    return progress


@pytest.fixture(scope="module")
def bf16_run(data_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("bf16")
    torch.set_num_threads(1)
    metrics = train(data_root, run, amp="bf16", channels_last=True)
    return run, metrics


def test_bf16_channels_last_trains_on_cpu(bf16_run, data_root, tmp_path):
    run, metrics = bf16_run
    history = torch.load(run / "ckpt" / "last.pt", weights_only=True)["history"]
    losses = [row["train_loss"] for row in history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    state = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    assert state["recipe"]["amp"] == "bf16" and state["recipe"]["channels_last"] is True
    assert "grad_scaler" not in state  # bf16 needs no loss scaling
    conv = state["state_dict"]["conv1.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    # Weights are fp32 master weights; autocast only lowers the arithmetic.
    assert all(t.dtype == torch.float32 for t in state["state_dict"].values() if t.is_floating_point())

    # The checkpoint evaluates (plain fp32 / contiguous and with the training options);
    # with the training options and batch it reproduces the best epoch's validation exactly.
    plain = evaluate_classifier(EvalClsParams(image_size=32, batch_size=16), run / "ckpt" / "best.pt", data_root,
                                tmp_path / "m.json", tmp_path / "p.json")
    same = evaluate_classifier(EvalClsParams(image_size=32, batch_size=16, amp="bf16", channels_last=True),
                               run / "ckpt" / "best.pt", data_root, tmp_path / "m2.json", tmp_path / "p2.json")
    assert same["top1"] == pytest.approx(metrics["best_top1"], abs=1e-9)
    assert abs(plain["top1"] - same["top1"]) <= 100 / 24 + 1e-9  # bf16 may flip at most a borderline image
    assert plain["num_images"] == 24


def test_bf16_resume_matches_an_uninterrupted_run(bf16_run, data_root, tmp_path):
    with pytest.raises(Interrupt):
        train(data_root, tmp_path, amp="bf16", channels_last=True, progress=stop_at_epoch(2))
    assert torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["epoch"] == 1
    calls = []
    resumed = train(data_root, tmp_path, amp="bf16", channels_last=True, progress=lambda *a: calls.append(a))
    assert min(c[0] for c in calls) == 2  # resumed, not restarted
    expected = torch.load(bf16_run[0] / "ckpt" / "last.pt", weights_only=True)["state_dict"]
    actual = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(actual[name], tensor) for name, tensor in expected.items())
    assert resumed["loss"] == bf16_run[1]["loss"]


def test_changing_amp_moves_the_run_aside_and_starts_over(bf16_run, data_root, tmp_path, caplog):
    run = tmp_path / "cls"
    with pytest.raises(Interrupt):
        train(data_root, run, amp="bf16", epochs=2, progress=stop_at_epoch(2))
    last = run / "ckpt" / "last.pt"
    bf16_bytes = last.read_bytes()
    bf16_epoch1 = torch.load(last, weights_only=True)["history"][0]
    # amp changes the arithmetic: resuming would mix two recipes, deleting would throw the epoch
    # away. The run is moved aside (one warning naming the key) and training starts over.
    calls = []
    with caplog.at_level("WARNING", logger="sge_repro.superseded"):
        train(data_root, run, amp="fp32", epochs=2, progress=lambda *a: calls.append(a))
    [moved] = (tmp_path / "superseded" / "cls").glob("ckpt-*")
    assert (moved / "last.pt").read_bytes() == bf16_bytes
    assert f"train_cls.amp bf16 -> fp32); moved to {moved}" in caplog.text
    assert min(c[0] for c in calls) == 1
    state = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    assert state["recipe"]["amp"] == "fp32"
    # Autocast really changed the arithmetic: same data and seed, different first-epoch loss.
    assert state["history"][0]["train_loss"] != bf16_epoch1["train_loss"]


def test_fp16_on_cpu_is_rejected_before_training(data_root, tmp_path):
    # An unknown amp mode is the schema's error (tests/test_params.py); the device is known only here.
    with pytest.raises(UserError, match="amp='fp16' on device cpu: .*needs CUDA"):
        train(data_root, tmp_path, amp="fp16")
    assert not (tmp_path / "ckpt").exists()


def test_sync_bn_in_one_process_is_plain_batchnorm(data_root, tmp_path):
    # A single process has no peers to sync with: identical to a run without the option (the
    # model keeps nn.BatchNorm2d, so SGE blocks keep their fused BN + SGE path). Multi-rank
    # sync_bn is tested in test_distributed.py (two gloo ranks) and test_sync_batchnorm.py.
    a = train(data_root, tmp_path / "a", epochs=1)
    b = train(data_root, tmp_path / "b", epochs=1, sync_bn=True)
    assert a["train_loss"] == b["train_loss"] and a["loss"] == b["loss"]


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_mixed_precision_channels_last(tmp_path_factory, amp):
    root = tmp_path_factory.mktemp("gpu_data") / "cls"
    generate_classification_set(root, num_classes=4, image_size=64, train_per_class=64, val_per_class=16, seed=2)
    run = tmp_path_factory.mktemp(f"gpu_{amp}")
    started = time.perf_counter()
    recipe = dict(epochs=4, batch_size=32, lr=0.05, weight_decay=1e-4, lr_schedule="cosine", warmup_epochs=0,
                  image_size=64, seed=0, workers=2, device="cuda", amp=amp, channels_last=True, min_crop_scale=0.35)
    metrics = train_with_recipe(recipe, ("sge_resnet18", {"width": 32, "groups": 8}), root, run / "ckpt",
                                run / "m.json", run / "h.tsv")
    print(f"{amp}: top1 {metrics['top1']:.1f} images/s {metrics['images_per_s']:.0f} "
          f"({time.perf_counter() - started:.1f}s)")
    history = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    losses = [row["train_loss"] for row in history["history"]]
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]
    assert metrics["top1"] > 100 / 4  # better than chance on 4 classes
    if amp == "fp16":
        assert history["grad_scaler"]["scale"] > 0
    else:
        assert "grad_scaler" not in history


@pytest.mark.gpu
def test_cuda_fp16_resume_restores_the_grad_scaler(data_root, tmp_path):
    options = dict(epochs=2, device="cuda", amp="fp16", channels_last=True)
    reference = train(data_root, tmp_path / "a", **options)
    with pytest.raises(Interrupt):
        train(data_root, tmp_path / "b", progress=stop_at_epoch(2), **options)
    after_epoch1 = torch.load(tmp_path / "b" / "ckpt" / "last.pt", weights_only=True)
    assert after_epoch1["epoch"] == 1 and after_epoch1["grad_scaler"]["scale"] > 0
    resumed = train(data_root, tmp_path / "b", **options)
    expected = torch.load(tmp_path / "a" / "ckpt" / "last.pt", weights_only=True)
    actual = torch.load(tmp_path / "b" / "ckpt" / "last.pt", weights_only=True)
    assert actual["grad_scaler"] == expected["grad_scaler"]
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][name], tensor), name
    assert resumed["loss"] == reference["loss"]
