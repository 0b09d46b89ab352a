"""TensorBoard events of a classification run: tags and steps, and a resume that neither
duplicates nor loses a step (read back with TensorBoard's own EventAccumulator)."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from sge_repro.classification.tensorboard import EVENTS_GLOB, TensorBoardLog

from .conftest import outputs, read_history, train

EPOCHS, STEPS = 2, 7  # 120 training images / batch 16 (conftest's tiny set and recipe)
TRAIN_TAGS = {"train/loss", "train/top1", "train/lr", "train/images_per_s"}
EPOCH_TAGS = {f"epoch/{k}" for k in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
                                     "images_per_s", "epoch_time_s")}


class Stop(Exception):
    pass


def scalars(log_dir):
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def train_logged(data_root, run, stop_at=None, calls=None):
    """Train with a TensorBoardLog; `stop_at=(epoch, step, phase)` interrupts the run at the first
    report at or past that point, after the events of that call were written (as a kill after a
    flush would leave them). `calls` collects the global steps of the engine's train reports."""
    log = TensorBoardLog(run / "tb")

    def progress(epoch, step, steps, info):
        log(epoch, step, steps, info)
        if calls is not None and info["phase"] == "train":
            calls.append((epoch - 1) * steps + step)
        if stop_at and info["phase"] == stop_at[2] and (epoch, step) >= stop_at[:2]:
            raise Stop

    try:
        return train(data_root, run, progress=progress, epochs=EPOCHS)
    finally:
        log.close()


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("tb_run")
    torch.set_num_threads(1)  # as the tests (conftest's one_thread): bit-equal runs
    SummaryWriter(str(run / "tb")).add_scalar("train/loss", 99.0, 3)  # left by a run that was started over
    calls = []
    train_logged(data_root, run, calls=calls)
    return run, calls


def test_tags_and_steps_of_a_run(uninterrupted):
    uninterrupted, reported = uninterrupted
    events = scalars(uninterrupted / "tb")
    assert set(events) == TRAIN_TAGS | EPOCH_TAGS
    # 7 steps an epoch: a point at each step the engine reports fresh running means (every step,
    # or its log points), once, in order, the last step of each epoch among them
    logged = [step for step, _ in events["train/loss"]]
    assert set(logged) <= set(reported) and {STEPS, 2 * STEPS} <= set(logged) and logged == sorted(set(logged))
    for tag in TRAIN_TAGS:
        assert [step for step, _ in events[tag]] == logged
    history = read_history(outputs(uninterrupted)[2])
    for tag in EPOCH_TAGS:
        assert [step for step, _ in events[tag]] == [STEPS * e for e in range(1, EPOCHS + 1)]
    for key in ("val_top1", "train_loss", "lr"):
        assert [value for _, value in events[f"epoch/{key}"]] == pytest.approx(
            [float(row[key]) for row in history], rel=1e-5)  # float32 events, 6-digit TSV
    # the points' losses (means since the previous point) average to the epoch's train loss
    first_epoch = [(step, value) for step, value in events["train/loss"] if step <= STEPS]
    weighted = sum(value * (step - previous) for (step, value), previous in
                   zip(first_epoch, [0] + [step for step, _ in first_epoch[:-1]]))
    assert weighted / STEPS == pytest.approx(float(history[0]["train_loss"]), rel=1e-5)
    assert 99.0 not in [value for _, value in events["train/loss"]]  # the old run's file is gone
    assert len(list((uninterrupted / "tb").glob(EVENTS_GLOB))) == 1


@pytest.mark.parametrize("stop_at", [(2, STEPS, "train"), (2, STEPS, "epoch")],
                         ids=["after-the-last-step-events", "after-the-epoch-events-before-its-checkpoint"])
def test_a_resumed_run_logs_each_step_once_with_the_uninterrupted_values(uninterrupted, data_root, tmp_path,
                                                                         stop_at):
    uninterrupted, _ = uninterrupted
    with pytest.raises(Stop):
        train_logged(data_root, tmp_path, stop_at=stop_at)
    assert scalars(tmp_path / "tb")["train/loss"][-1][0] > STEPS  # events past the epoch-1 checkpoint exist
    train_logged(data_root, tmp_path)  # resumes from epoch 1's last.pt
    resumed, expected = scalars(tmp_path / "tb"), scalars(uninterrupted / "tb")
    assert len(list((tmp_path / "tb").glob(EVENTS_GLOB))) == 2  # appended as a new file
    assert set(resumed) == set(expected)
    for tag in (TRAIN_TAGS | EPOCH_TAGS) - {"train/images_per_s", "epoch/images_per_s", "epoch/epoch_time_s"}:
        assert resumed[tag] == expected[tag], tag  # same steps, once each; bit-reproducible training


def test_a_finished_run_that_is_rerun_writes_no_events(uninterrupted, data_root):
    uninterrupted, _ = uninterrupted
    before = sorted(p.name for p in (uninterrupted / "tb").glob(EVENTS_GLOB))
    train_logged(data_root, uninterrupted)
    assert sorted(p.name for p in (uninterrupted / "tb").glob(EVENTS_GLOB)) == before
