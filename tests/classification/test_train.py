"""train_classifier: outputs, progress, resume (finished, SIGKILLed), stopping, runtime checks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sge_repro.errors import UserError

from .conftest import RECIPE, REPO, cls_manifest, outputs, read_history, train


def test_training_writes_checkpoints_metrics_and_history(finished_run):
    run, metrics, calls = finished_run
    run_dir, metrics_path, history_path = outputs(run)
    assert {p.name for p in run_dir.iterdir()} == {"last.pt", "best.pt"}
    assert json.loads(metrics_path.read_text()) == metrics
    assert metrics["model"] == "resnet18" and metrics["seed"] == 3 and metrics["epochs"] == 6
    assert metrics["num_train_images"] == 120 and metrics["num_val_images"] == 30
    assert 0 <= metrics["top1"] <= 100 and metrics["top5"] == 100.0  # 3 classes: top-5 is every class
    assert 1 <= metrics["best_epoch"] <= 6 and metrics["best_top1"] >= metrics["top1"]
    rows = read_history(history_path)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                            "images_per_s", "epoch_time_s"}
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0]
    assert float(rows[-1]["val_top1"]) == pytest.approx(metrics["top1"], abs=1e-3)
    # Cosine after one warmup epoch: lr falls every epoch.
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(0.02) and all(a > b for a, b in zip(lrs, lrs[1:]))


def test_progress_reports_every_step_and_epoch(finished_run):
    _, _, calls = finished_run
    steps = [c for c in calls if c[3]["phase"] == "train"]
    epochs = [c for c in calls if c[3]["phase"] == "epoch"]
    assert len(steps) == 6 * 7  # 120 images / batch 16 (last partial batch dropped), six epochs
    assert [c[:3] for c in steps[:2]] == [(1, 1, 7), (1, 2, 7)]
    assert [c[0] for c in epochs] == [1, 2, 3, 4, 5, 6] and "val_top1" in epochs[0][3]

def test_finished_run_is_not_retrained(finished_run, data_root):
    run, metrics, _ = finished_run
    run_dir, metrics_path, history_path = outputs(run)
    stamp = (run_dir / "last.pt").stat().st_mtime_ns
    calls = []
    again = train(data_root, run, progress=lambda *args: calls.append(args))
    assert calls == [] and (run_dir / "last.pt").stat().st_mtime_ns == stamp
    assert again["top1"] == metrics["top1"] and again["best_epoch"] == metrics["best_epoch"]


def test_sge_model_trains(data_root, tmp_path):
    metrics = train(data_root, tmp_path, model=("sge_resnet18", {"width": 8, "groups": 4}), epochs=1,
                    warmup_epochs=0, image_size=64)  # SGE needs more than 1x1 positions in layer4
    assert metrics["model"] == "sge_resnet18" and metrics["epochs"] == 1
    state = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert state["model_kwargs"]["groups"] == 4


class Interrupt(Exception):
    pass


def stop_in_epoch(epoch: int):
    def progress(current_epoch, step, total, info):
        if current_epoch == epoch and info["phase"] == "train":
            raise Interrupt
    return progress


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(data_root, tmp_path):
    with pytest.raises(Interrupt):
        train(data_root, tmp_path, epochs=2, warmup_epochs=0, progress=stop_in_epoch(2))
    last = tmp_path / "ckpt" / "last.pt"
    # The same recipe resumes from a checkpoint whose classifier weights overflow: the first step
    # of epoch 2 computes an infinite / NaN loss.
    state = torch.load(last, weights_only=True)
    state["state_dict"]["fc.weight"] *= 1e38
    torch.save(state, last)
    before = last.read_bytes()
    with pytest.raises(UserError, match=r"loss is (nan|inf) at epoch 2 step 1 \(global step 8\).*"
                                        r"Last good checkpoint kept"):
        train(data_root, tmp_path, epochs=2, warmup_epochs=0)
    assert last.read_bytes() == before
    assert not (tmp_path / "metrics.json").exists()


def test_batch_larger_than_the_training_set_is_rejected_before_training(data_root, tmp_path):
    # The schema checks each key (tests/test_params.py); only the data can reject this batch.
    with pytest.raises(UserError, match="batch_size=1000: larger than the 120 training images"):
        train(data_root, tmp_path, batch_size=1000)
    assert not (tmp_path / "ckpt").exists()


def test_another_sge_impl_resumes_and_another_recipe_moves_the_run_aside(data_root, tmp_path, caplog):
    """model.sge_impl picks how SGE is computed, not what (like device): a run of the fast impl
    resumes under the reference one; weight_decay changes the recipe: the run is moved aside."""
    options = dict(epochs=2, warmup_epochs=0, image_size=64)  # SGE needs more than 1x1 positions in layer4
    run = tmp_path / "cls"
    with pytest.raises(Interrupt):
        train(data_root, run, model=("sge_resnet18", {"width": 8, "groups": 4, "sge_impl": "fast"}),
              progress=stop_in_epoch(2), **options)
    calls = []
    train(data_root, run, model=("sge_resnet18", {"width": 8, "groups": 4, "sge_impl": "reference"}),
          progress=lambda *args: calls.append(args), **options)
    assert min(c[0] for c in calls) == 2  # resumed, not restarted
    assert not (tmp_path / "superseded").exists()
    state = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["recipe"]["model_kwargs"]["sge_impl"] == "reference"
    calls = []
    with caplog.at_level("WARNING", logger="sge_repro.superseded"):
        train(data_root, run, model=("sge_resnet18", {"width": 8, "groups": 4, "sge_impl": "reference"}),
              progress=lambda *args: calls.append(args), weight_decay=1e-3, **options)
    [moved] = (tmp_path / "superseded" / "cls").glob("ckpt-*")
    assert f"trained with other params (train_cls.weight_decay 0.0001 -> 0.001); moved to {moved}" in caplog.text
    assert min(c[0] for c in calls) == 1 and (moved / "last.pt").exists()


def test_a_train_subset_shortens_the_epochs_and_the_schedule_follows(tmp_path, caplog):
    """max_train_images=32 at batch 16: two steps an epoch, the lr schedule laid over those steps;
    another subset is another training, never resumed as this one."""
    from sge_repro.classification.schedule import lr_factor
    from sge_repro.params_sections import TrainClsParams

    manifest = cls_manifest(tmp_path / "project", max_train_images=32)
    options = dict(epochs=3, warmup_epochs=1)
    calls = []
    metrics = train(manifest, tmp_path / "run", progress=lambda *args: calls.append(args), **options)
    steps = [c[:3] for c in calls if c[3]["phase"] == "train"]
    assert steps == [(epoch, step, 2) for epoch in (1, 2, 3) for step in (1, 2)]
    assert metrics["num_train_images"] == 32 and metrics["num_val_images"] == 30
    state = torch.load(tmp_path / "run" / "ckpt" / "last.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 6   # one scheduler step per optimizer step, 3 x 2
    recipe = TrainClsParams(**{k: v for k, v in {**RECIPE, **options}.items() if k != "seed"})
    lrs = [float(row["lr"]) for row in read_history(outputs(tmp_path / "run")[2])]
    expected = [RECIPE["lr"] * lr_factor(2 * epoch - 1, 2, recipe) for epoch in (1, 2, 3)]
    assert lrs == pytest.approx(expected, rel=1e-5)   # the history holds 6 significant digits

    calls = []
    with caplog.at_level("WARNING", logger="sge_repro.superseded"):
        train(cls_manifest(tmp_path / "project", max_train_images=48), tmp_path / "run",
              progress=lambda *args: calls.append(args), **options)
    assert "data.classification.max_train_images 32 -> 48" in caplog.text
    assert calls[0][:3] == (1, 1, 3)   # trained again from the start, three steps an epoch


KILLABLE_TRAINING = """
import sys, torch
torch.set_num_threads(1)
from sge_repro.classification.train import train_classifier
from sge_repro.params import ModelParams, TrainClsParams
data_root, run_dir, metrics, history, recipe = sys.argv[1:6]
import json
recipe = json.loads(recipe)
seed = recipe.pop("seed")
train_classifier(TrainClsParams(**recipe), ModelParams(width=8, groups=64), "resnet18", seed, data_root, run_dir, metrics, history)
"""


def test_resume_after_sigkill_matches_an_uninterrupted_run(finished_run, data_root, tmp_path):
    run_dir, metrics_path, history_path = outputs(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_TRAINING, str(data_root), str(run_dir), str(metrics_path),
         str(history_path), json.dumps(RECIPE)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    try:
        while not (run_dir / "last.pt").exists():
            assert process.poll() is None, "training ended before writing its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)  # mid epoch 2: right after epoch 1's checkpoint
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    killed_at = torch.load(run_dir / "last.pt", weights_only=True)["epoch"]
    assert killed_at < RECIPE["epochs"] and not metrics_path.exists()
    print("killed after epoch", killed_at)

    calls = []
    resumed = train(data_root, tmp_path, progress=lambda *args: calls.append(args))
    assert min(c[0] for c in calls) == killed_at + 1  # it resumed rather than starting over

    reference_dir, _, _ = outputs(finished_run[0])
    expected = torch.load(reference_dir / "last.pt", weights_only=True)
    actual = torch.load(run_dir / "last.pt", weights_only=True)
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][name], tensor), name
    for key, buffers in expected["optimizer"]["state"].items():
        assert torch.equal(actual["optimizer"]["state"][key]["momentum_buffer"], buffers["momentum_buffer"])
    assert resumed["top1"] == finished_run[1]["top1"] and resumed["loss"] == finished_run[1]["loss"]
    assert [r["train_loss"] for r in actual["history"]] == [r["train_loss"] for r in expected["history"]]


def test_results_do_not_depend_on_the_number_of_workers(data_root, tmp_path):
    # Two epochs: the second one is served by the same (persistent) workers as the first.
    in_process = train(data_root, tmp_path / "a", epochs=2, warmup_epochs=0, workers=0)
    two_workers = train(data_root, tmp_path / "b", epochs=2, warmup_epochs=0, workers=2)
    assert in_process["train_loss"] == two_workers["train_loss"]
    a = torch.load(tmp_path / "a" / "ckpt" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "ckpt" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[name], b[name]) for name in a)



def _truncate(path, size=1000):
    with open(path, "r+b") as handle:
        handle.truncate(size)


def test_a_damaged_last_pt_resumes_from_best_pt_to_the_same_result(finished_run, data_root, tmp_path):
    """A checkpoint that does not load is not a finished run: with last.pt cut short, training
    resumes from best.pt's epoch and ends where the uninterrupted run ended, bit for bit."""
    import shutil

    run, metrics, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    run_dir = outputs(copy)[0]
    _truncate(run_dir / "last.pt")
    torch.set_num_threads(1)
    again = train(data_root, copy)
    assert again["top1"] == metrics["top1"] and again["best_epoch"] == metrics["best_epoch"]
    resumed = torch.load(run_dir / "last.pt", weights_only=True)
    original = torch.load(outputs(run)[0] / "last.pt", weights_only=True)
    assert resumed["epoch"] == original["epoch"]
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in original["state_dict"].items())


@pytest.mark.parametrize("damage", ["truncated", "missing", "empty"])
def test_a_damaged_best_pt_is_rewritten_from_last_pt_or_named(tmp_path, damage):
    from sge_repro.classification.checkpoint import repair_damaged

    def state(epoch, best_epoch):
        return {"optimizer": {}, "epoch": epoch, "best": {"epoch": best_epoch, "top1": 50.0}, "marker": torch.arange(3)}

    def damaged(run_dir, epoch, best_epoch):
        run_dir.mkdir()
        torch.save(state(epoch, best_epoch), run_dir / "last.pt")
        torch.save(state(best_epoch, best_epoch), run_dir / "best.pt")
        if damage == "missing":
            (run_dir / "best.pt").unlink()
        else:
            _truncate(run_dir / "best.pt", 0 if damage == "empty" else 200)
        return run_dir

    # the last epoch was the best: both files held the same state, best.pt is rewritten from last.pt
    run_dir = damaged(tmp_path / "same", 5, 5)
    repair_damaged(run_dir, True, lambda: None)
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == 5
    # an earlier epoch was the best: its weights are lost; one line says how to train again
    run_dir = damaged(tmp_path / "earlier", 5, 3)
    with pytest.raises(UserError, match=r"best\.pt: .*the best epoch's \(3\) weights are lost and last\.pt is epoch 5: "
                                        r"move .*earlier aside"):
        repair_damaged(run_dir, True, lambda: None)
    assert sorted(p.name for p in run_dir.iterdir()) == (["best.pt", "last.pt"] if damage != "missing" else ["last.pt"])
    # both damaged
    _truncate(run_dir / "last.pt", 10)
    with pytest.raises(UserError, match=r"neither checkpoint loads"):
        repair_damaged(run_dir, True, lambda: None)


def test_a_full_disk_is_one_line_leaves_no_temp_and_a_rerun_ends_as_the_uninterrupted_run(
        finished_run, data_root, tmp_path):
    """The disk fills while the first epoch's checkpoints are written (best.pt fits, last.pt not):
    UserError naming last.pt, no temp file left; with space freed the rerun resumes (from best.pt)
    and ends where the uninterrupted run ended."""
    from small_disk import resize, small_disk

    run, metrics, _ = finished_run
    size = (outputs(run)[0] / "last.pt").stat().st_size
    copy = tmp_path / "copy"
    run_dir = outputs(copy)[0]
    torch.set_num_threads(1)
    with small_disk(run_dir, int(size * 1.5)):
        with pytest.raises(UserError, match=rf"^{run_dir}/last\.pt: no space left on device \(writing in {run_dir}\); "
                                            "free space there and rerun"):
            train(data_root, copy)
        assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt"]
        resize(run_dir, 64 << 20)
        again = train(data_root, copy)
        resumed = torch.load(run_dir / "last.pt", weights_only=True)
    assert again["top1"] == metrics["top1"] and again["best_epoch"] == metrics["best_epoch"]
    original = torch.load(outputs(run)[0] / "last.pt", weights_only=True)
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in original["state_dict"].items())
