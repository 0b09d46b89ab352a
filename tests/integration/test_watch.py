"""Long runs a person can watch and trust, on one real smoke run through DVC:
the stages' status files and the live view over them, TensorBoard events, the report's
provenance, a second `run all` that stays a no-op, and a DVC experiment on top of it."""

import hashlib
import json
import os
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from integration.conftest import copy_project
from sge_repro.cli.run import PipelineView
from sge_repro.pipeline import StageEvent
from sge_repro.stage_status import read_status

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DVC = [sys.executable, "-m", "dvc"]


def sge_repro(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "sge-repro"), *args], cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"sge-repro {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A committed copy of the project after `sge-repro run all --profile smoke`."""
    project = copy_project(tmp_path_factory.mktemp("watch") / "project")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "copy")
    started = time.time()
    result = sge_repro(project, "run", "all", "--profile", "smoke")
    return {"root": project, "started": started, "ended": time.time(), "stdout": result.stdout}


def stage_list(root: Path) -> list[str]:
    return subprocess.run([*DVC, "stage", "list", "--name-only"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.split()


def test_training_and_evaluation_stages_leave_plausible_status_files(smoke):
    root = smoke["root"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    stages = [s for s in stage_list(root) if s.split("@")[0] in ("train_cls", "eval_cls", "train_faster_rcnn",
                                                                   "eval_faster_rcnn")]
    assert len(stages) == 8
    written = sorted(p.stem for p in (root / "logs" / "progress").glob("*.json"))
    assert written == sorted(set(stage_list(root)) - {"report"})  # every stage but the report has one
    for stage in stages:
        record = read_status(root / "logs" / "progress" / f"{stage}.json")
        assert record is not None and record["stage"] == stage
        assert record["state"] == "done" and record["done"] == record["total"] > 0 and record["eta_s"] == 0
        assert smoke["started"] <= record["started"] <= record["updated"] <= smoke["ended"]
        assert record["world_size"] == 1 and record["images_per_s"] > 0
        group = stage.split("@")[0]
        if group == "train_cls":
            epochs = params["train_cls"]["epochs"]
            assert (record["unit"], record["epoch"], record["epochs"]) == ("step", epochs, epochs)
            assert record["total"] % epochs == 0
            assert 0 < record["loss"] < 10 and math.isfinite(record["loss"])
            assert 0 <= record["top1"] <= 100 and 0 <= record["val_top1"] <= 100 and record["lr"] >= 0
        elif group == "train_faster_rcnn":
            assert (record["unit"], record["total"]) == ("iter", params["train_det"]["max_iter"])
            assert 0 < record["loss"] < 100 and record["lr"] > 0
        else:
            assert record["unit"] == "batch" and record["phase"] == "eval"
    # the classifier's eval status carries the top-1 its metrics file holds
    metrics = json.loads((root / "metrics" / "eval_cls" / "sge_resnet18-seed0.json").read_text())
    assert read_status(root / "logs" / "progress" / "eval_cls@sge_resnet18-0.json")["top1"] == metrics["top1"]


def test_the_live_view_shows_the_stages_own_progress(smoke):
    root = smoke["root"]
    stages = stage_list(root)
    view = PipelineView(list(stages), root / "logs" / "progress", wall_clock=lambda: smoke["started"])
    for stage in stages:
        view.on_event(StageEvent(stage, "running", at=0.0))
        view.on_event(StageEvent(stage, "done", at=1.0))
    console = Console(record=True, width=100)
    console.print(view)
    lines = console.export_text().splitlines()
    assert all(len(line) <= 100 for line in lines)
    rows = {line.split()[0]: line for line in lines if line.strip() and line.split()[0] in stages}
    assert set(rows) == set(stages)  # every stage on one line
    assert "done · 100% ep 2/2 loss" in rows["train_cls@sge_resnet18-0"]
    assert "done · 100% it 6/6 loss" in rows["train_faster_rcnn@sge_resnet18-0"]
    assert "done · 100% batch" in rows["eval_faster_rcnn@resnet18-0"]
    assert rows["report"].split()[1] == "done"
    # `run all` printed the same view (captured output is rendered once, at the end)
    assert "100% ep 2/2" in smoke["stdout"]


def test_classification_runs_have_tensorboard_events_in_their_run_folder(smoke):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = smoke["root"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    for model in params["models"]:
        folder = root / "runs" / "cls" / f"{model}-seed0" / "tensorboard"
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = set(accumulator.Tags()["scalars"])
        assert {"train/loss", "train/top1", "train/lr", "train/images_per_s", "epoch/val_top1"} <= tags
        history = (root / "plots" / "train_cls" / f"{model}-seed0.tsv").read_text().splitlines()
        epochs = len(history) - 1
        val = accumulator.Scalars("epoch/val_top1")
        steps = [event.step for event in val]
        assert len(steps) == epochs == params["train_cls"]["epochs"] and steps[-1] % epochs == 0
        column = history[0].split("\t").index("val_top1")
        assert [round(e.value, 3) for e in val] == [round(float(row.split("\t")[column]), 3) for row in history[1:]]


def test_summary_and_html_say_what_made_them(smoke):
    import torch

    root = smoke["root"]
    summary = json.loads((root / "reports" / "summary.json").read_text())
    made = summary["provenance"]
    assert made["git_commit"] == git(root, "rev-parse", "HEAD").strip()
    # `run all --profile smoke` rewrote params.yaml since the commit (dvc.lock, metrics/, plots/ are
    # results, not code: they do not count)
    assert made["git_dirty"] is True and made["git_changed"] == ["params.yaml"]
    assert made["params_sha256"] == hashlib.sha256((root / "params.yaml").read_bytes()).hexdigest()
    assert made["profile"] == "smoke" == summary["profile"]
    assert made["packages"]["torch"] == torch.__version__ and made["packages"]["dvc"] == "3.67.1"
    assert made["packages"]["detectron2"].startswith("0.6")
    assert made["hardware"]["cpu_count"] == os.cpu_count() and made["hardware"]["gpu_count"] == len(
        made["hardware"]["gpus"])
    runs = {run["stage"]: run for run in made["stages"]}
    assert set(runs) == set(stage_list(root)) - {"report"}
    for run in runs.values():
        assert run["state"] == "done" and run["wall_time_s"] > 0 and run["world_size"] == 1
    trained = read_status(root / "logs" / "progress" / "train_cls@sge_resnet18-0.json")
    assert runs["train_cls@sge_resnet18-0"]["wall_time_s"] == round(trained["elapsed_s"], 3)

    html = (root / "reports" / "report.html").read_text()
    body = html[html.index("<body>"):]
    assert body.index("<h2>What reproduced</h2>") < body.index("<h2>Classification</h2>")
    opening = body[body.index("<h2>What reproduced</h2>"):body.index("<h2>Classification</h2>")]
    assert "sge_resnet18 top-1 gain over resnet18 (embedded)" in opening
    assert "faster_rcnn sge_resnet18 AP gain over resnet18 (embedded)" in opening
    verdict = summary["comparison"]["classification"][1]["verdict"]
    assert verdict in opening and "+1.20 (R50)" in opening  # the paper's gain, from the nearest depth
    assert made["git_commit"][:12] in html and made["params_sha256"] in html and "train_faster_rcnn@sge_resnet18-0" in html


def dvc_changes(root: Path) -> dict:
    """`dvc status` without the data stage's standing 'always changed' (it rescans the image trees
    on every repro and rewrites its manifests only when they change: dvc.yaml)."""
    status = subprocess.run([*DVC, "status", "--json"], cwd=root, capture_output=True, text=True, check=True)
    return {stage: why for stage, why in json.loads(status.stdout or "{}").items() if why != ["always changed"]}


def test_a_second_run_and_a_rebuilt_report_change_nothing(smoke):
    root = smoke["root"]
    files = {name: (root / "reports" / name).read_bytes() for name in ("summary.json", "report.md", "report.html")}
    assert dvc_changes(root) == {}
    second = sge_repro(root, "run", "all")
    assert "0 stage(s) ran" in second.stdout
    sge_repro(root, "report")  # rebuilt by hand with nothing changed: the same bytes, DVC stays clean
    assert {name: (root / "reports" / name).read_bytes() for name in files} == files
    assert dvc_changes(root) == {}


EXP_SHOW_KEEP = r"Experiment|model\.groups|train_cls\.epochs|top1|gain"  # README: Experiments


def test_a_dvc_experiment_runs_and_dvc_exp_show_has_its_metric(smoke):
    root = smoke["root"]
    git(root, "add", "-A")  # the smoke results (params.yaml, dvc.lock, metrics/, plots/) as the baseline
    git(root, "commit", "-qm", "smoke results")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([*DVC, "exp", "run", "-S", "train_cls.epochs=3", "eval_cls"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = yaml.safe_load((root / "params.yaml").read_text())  # rewritten by DVC (ruamel, no quotes)
    assert written["train_cls"]["epochs"] == 3 and written["train_cls"]["amp"] == "fp32"
    workspace_top1 = json.loads((root / "metrics" / "eval_cls" / "sge_resnet18-seed0.json").read_text())["top1"]

    shown = json.loads(subprocess.run([*DVC, "exp", "show", "--json"], cwd=root, env=env, capture_output=True,
                                      text=True, check=True).stdout)
    experiments = [exp for entry in shown for exp in (entry.get("experiments") or [])]
    assert len(experiments) == 1
    data = experiments[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train_cls"]["epochs"] == 3
    assert data["metrics"]["metrics/train_cls/sge_resnet18-seed0.json"]["data"]["epochs"] == 3
    assert data["metrics"]["metrics/eval_cls/sge_resnet18-seed0.json"]["data"]["top1"] == workspace_top1
    baseline = next(entry for entry in shown if entry.get("experiments"))["data"]
    assert baseline["metrics"]["metrics/train_cls/sge_resnet18-seed0.json"]["data"]["epochs"] == 2

    # the readable view of README: a handful of named columns, the report's headline numbers among them
    header = subprocess.run([*DVC, "exp", "show", "--csv", "--drop", ".*", "--keep", EXP_SHOW_KEEP], cwd=root,
                            env=env, capture_output=True, text=True, check=True).stdout.splitlines()[0].split(",")
    assert header == ["Experiment", "top1.resnet18", "top1.sge_resnet18", "gain_top1.sge_resnet18",
                      "gain_AP.faster_rcnn-sge_resnet18", "model.groups", "train_cls.epochs"], header


def test_a_queued_dvc_experiment_changing_the_model_lists_runs_on_params_yaml_as_written(smoke):
    """DVC's own `dvc exp run -S` changes `models`, a detector's backbones and the convert lists:
    params.yaml holds nothing derived from them, so the queued experiment runs as DVC users expect,
    and the workspace file stays as it was."""
    root = smoke["root"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    git(root, "add", "-A")
    git(root, "commit", "-qm", "baseline for the queue")
    before = (root / "params.yaml").read_bytes()
    subprocess.run([*DVC, "exp", "run", "--queue", "-n", "g2-sge-only", "-S", "model.groups=2",
                    "-S", "models=[sge_resnet18]", "-S", "detection.faster_rcnn=[sge_resnet18]",
                    "-S", "convert.trained=[sge_resnet18]", "eval_cls"], cwd=root, env=env, check=True,
                   capture_output=True)
    assert (root / "params.yaml").read_bytes() == before
    subprocess.run([*DVC, "queue", "start", "-j", "1"], cwd=root, env=env, check=True, capture_output=True)
    deadline, state = time.monotonic() + 900, ""
    while time.monotonic() < deadline:
        listed = subprocess.run([*DVC, "queue", "status"], cwd=root, env=env, capture_output=True, text=True).stdout
        state = next((line for line in listed.splitlines() if "g2-sge-only" in line), "")
        if "Success" in state or "Failed" in state:
            break
        time.sleep(2)
    assert "Success" in state, listed + subprocess.run([*DVC, "queue", "logs", "g2-sge-only"], cwd=root, env=env,
                                                       capture_output=True, text=True).stdout[-3000:]

    shown = json.loads(subprocess.run([*DVC, "exp", "show", "--json"], cwd=root, env=env, capture_output=True,
                                      text=True, check=True).stdout)
    experiment = next(exp for entry in shown for exp in (entry.get("experiments") or []) if exp.get("name") == "g2-sge-only")
    data = experiment["revs"][0]["data"]
    params = data["params"]["params.yaml"]["data"]
    assert params["model"]["groups"] == 2 and params["models"] == ["sge_resnet18"]
    assert params["detection"]["faster_rcnn"] == params["convert"]["trained"] == ["sge_resnet18"]
    top1 = data["metrics"]["metrics/eval_cls/sge_resnet18-seed0.json"]["data"]["top1"]
    assert 0 <= top1 <= 100
    assert "metrics/eval_cls/resnet18-seed0.json" not in data["metrics"]


def test_a_g_sweep_retrains_only_the_sge_models(smoke):
    """model.groups is read by SGE blocks alone. Changing it reruns every stage DVC ties to `model`
    (plain ones too), but the plain ResNet's classifier, converted backbone, detector and its
    evaluation stay as they were (same bytes, nothing moved aside, nothing re-evaluated); the SGE
    classifier and detector are moved aside and trained again."""
    root = smoke["root"]
    sge_repro(root, "run", "all")  # earlier tests left the detection stages behind their classifiers
    plain = [root / "runs/cls/resnet18-seed0/last.pt", root / "runs/convert/resnet18-seed0.pth",
             root / "runs/det/faster_rcnn-resnet18-seed0/model_final.pth",
             root / "metrics/eval_det/faster_rcnn-resnet18-seed0.json"]
    before = {path: path.read_bytes() for path in plain}
    sge_last = (root / "runs/cls/sge_resnet18-seed0/last.pt").read_bytes()
    superseded = root / "runs" / "superseded"
    moved_before = {str(path.relative_to(superseded)) for path in superseded.glob("*/*")}
    groups = yaml.safe_load((root / "params.yaml").read_text())["model"]["groups"]

    result = sge_repro(root, "exp", "run", "-S", f"model.groups={2 if groups != 2 else 1}")
    moved = {str(path.relative_to(superseded)) for path in superseded.glob("*/*")} - moved_before
    assert {name.rsplit("-", 1)[0] for name in moved} == {"cls/sge_resnet18-seed0", "det/faster_rcnn-sge_resnet18-seed0"}, \
        (moved, result.stdout[-3000:])
    assert {path: path.read_bytes() for path in plain} == before
    assert (root / "runs/cls/sge_resnet18-seed0/last.pt").read_bytes() != sge_last
