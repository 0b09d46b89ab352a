"""The live view of `sge-repro run`: each stage's row, with a running stage's own progress."""

from rich.console import Console

from sge_repro.cli.run import PipelineView, duration, progress_text
from sge_repro.pipeline import StageEvent
from sge_repro.stage_status import StageStatus

STAGES = ["data", "train_cls@sge_resnet18-0", "eval_cls@sge_resnet18-0",
          "train_faster_rcnn@sge_resnet18-0", "report"]


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def render(view: PipelineView, width: int) -> list[str]:
    console = Console(record=True, width=width, force_terminal=False)
    console.print(view)
    return console.export_text().splitlines()


def row(lines: list[str], stage: str) -> str:
    matches = [line for line in lines if line.strip().startswith(stage)]
    assert len(matches) == 1, lines
    return matches[0]


def test_running_stage_shows_its_own_progress_in_its_row(tmp_path):
    wall = Clock(5000.0)
    view = PipelineView(list(STAGES), tmp_path, clock=Clock(75.0), wall_clock=wall)
    view.on_event(StageEvent("data", "skipped", at=0.0))
    view.on_event(StageEvent("train_cls@sge_resnet18-0", "running", at=0.0))
    wall.now += 1.5  # the stage's process starts
    status = StageStatus(tmp_path / "train_cls@sge_resnet18-0.json", "train_cls@sge_resnet18-0", clock=wall,
                         min_interval=0.0)
    for step in range(1, 31):  # epoch 3 of 12, 10 steps per epoch, 0.5 s per step
        wall.now += 0.5
        status.update(step, 120, unit="step", phase="train", epoch=(step - 1) // 10 + 1, epochs=12,
                      loss=1.2345, lr=0.05, images_per_s=640.0, val_top1=41.25)
    for width in (80, 100):
        lines = render(view, width)
        assert all(len(line) <= width for line in lines)
        text = row(lines, "train_cls@sge_resnet18-0")
        assert "25% ep 3/12" in text and "ETA 45.0s" in text  # 90 steps left at 0.5 s
        assert text.rstrip().endswith("1m15s")  # the stage's time column is kept
        assert "up to date" in row(lines, "data") and "pending" in row(lines, "report")
    wide = row(render(view, 100), "train_cls@sge_resnet18-0")
    assert "loss 1.23" in wide and "640 im/s" in wide and "val 41.2" in wide


def test_a_quiet_stage_is_flagged_and_a_finished_one_keeps_its_summary(tmp_path):
    wall, clock = Clock(100.0), Clock(0.0)
    view = PipelineView(list(STAGES), tmp_path, clock=clock, wall_clock=wall)
    view.on_event(StageEvent("train_faster_rcnn@sge_resnet18-0", "running", at=0.0))
    status = StageStatus(tmp_path / "train_faster_rcnn@sge_resnet18-0.json",
                         "train_faster_rcnn@sge_resnet18-0", clock=wall)
    status.update(40, 300, unit="iter", phase="train", loss=0.9, images_per_s=12.5)
    wall.now += 600.0
    clock.now += 600.0
    text = row(render(view, 100), "train_faster_rcnn@sge_resnet18-0")
    assert "13% it 40/300 no update for 10m00s" in text and text.rstrip().endswith("10m00s")

    status.update(300, 300, unit="iter", phase="train", loss=0.5, images_per_s=12.5)
    status.finish("done")
    clock.now += 0.5  # sooner than the view re-reads a running stage: the end forces a read
    view.on_event(StageEvent("train_faster_rcnn@sge_resnet18-0", "done", at=clock.now))
    text = row(render(view, 100), "train_faster_rcnn@sge_resnet18-0")
    assert "done · 100% it 300/300 loss 0.5" in text and "ETA" not in text and "no update" not in text


def test_stage_without_a_status_file_of_this_run_shows_its_state_only(tmp_path):
    wall = Clock(1000.0)
    previous = StageStatus(tmp_path / "eval_cls@sge_resnet18-0.json", "eval_cls@sge_resnet18-0", clock=wall)
    previous.update(10, 10, unit="batch", phase="eval")
    previous.finish()
    wall.now += 300.0  # the stage runs again five minutes later; its new process has not written yet
    view = PipelineView(list(STAGES), tmp_path, wall_clock=wall)
    view.on_event(StageEvent("eval_cls@sge_resnet18-0", "running", at=0.0))
    view.on_event(StageEvent("train_cls@sge_resnet18-0", "running", at=0.0))
    lines = render(view, 100)
    assert row(lines, "eval_cls@sge_resnet18-0").split()[1] == "running"  # not the old "100% batch 10/10"
    assert row(lines, "train_cls@sge_resnet18-0").split()[1] == "running"  # no file at all
    wall.now += 1.0
    StageStatus(tmp_path / "eval_cls@sge_resnet18-0.json", "eval_cls@sge_resnet18-0", clock=wall).update(
        2, 10, unit="batch", phase="eval")
    view.READ_EVERY_S = 0.0
    assert "20% batch 2/10" in row(render(view, 100), "eval_cls@sge_resnet18-0")


def test_durations_and_progress_text():
    assert (duration(12.34), duration(252), duration(93780)) == ("12.3s", "4m12s", "26h03m")
    record = {"done": 4, "total": 10, "unit": "batch", "phase": "eval", "eta_s": 3.0, "images_per_s": 250.0,
              "updated": 0.0}
    assert progress_text(record, now=1.0, running=True) == "40% batch 4/10 ETA 3.0s 250 im/s"
