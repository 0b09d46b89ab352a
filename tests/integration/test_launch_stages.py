"""Training stages launched on 2 local processes through the real pipeline (`sge-repro run`, real
DVC, torch elastic, gloo on CPU): what they train, what they write, what survives a killed rank."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from classification.test_distributed import LOSS_TOLERANCE, SYNC_BN_TOLERANCE
from float_compare import largest_relative_error
from sge_repro.params import PROFILES_DIR, validate_params
from sge_repro.params_yaml import dump_params, profile_params

pytestmark = pytest.mark.slow

# The conditions of tests/classification/test_distributed.py (3 classes of 32 px images, 40 per class;
# ResNet-18 layout at width 8; global batch 16; a small lr after a warmup epoch, so this tiny net's
# training is smooth enough that float rounding is not amplified), where 2 gloo ranks with sync_bn
# end within SYNC_BN_TOLERANCE of 1 process (its derivation: a reordered float32 sum of n terms
# moves by ~ sqrt(n) * 2**-24). Measured through the pipeline on this machine (AMD EPYC): weights
# <= 3.5e-6, momentum <= 1.2e-5 — and 1 process on 1 vs 2 threads differs by as much. (On the smoke
# profile's 64 px / 4-class set the BN biases after 4 steps are ~1e-4 in norm and 1 vs 2 threads of
# ONE process already differ by 3e-2 there: no tolerance could tell layouts apart on it.)
DATA = {"num_classes": 3, "image_size": 32, "train_per_class": 40, "val_per_class": 10}
RECIPE = {"image_size": 32, "batch_size": 16, "weight_decay": 1e-4, "min_crop_scale": 0.35}
EQUIVALENCE = {"sync_bn": True, "epochs": 2, "warmup_epochs": 1, "lr": 0.001}


def cli(bin_path: str, cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([bin_path, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def set_params(project: Path, **sections) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stale(project: Path) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True,
                         text=True, check=True).stdout
    return {name.split(":", 1)[-1] for name in json.loads(out or "{}")}


def run_files(project: Path, model: str) -> list[str]:
    """The files a training run wrote, sorted; a TensorBoard events file (its name holds the time,
    host and pid) as `events.out.tfevents.*`, so two of them (one per rank) would show as two."""
    run = f"{model}-seed0"  # exactly this run's: runs/cls/resnet18-seed0/*, metrics/train_cls/resnet18-seed0.json
    folders = [project / "runs" / "cls", project / "metrics" / "train_cls", project / "plots" / "train_cls"]
    names = [str(p.relative_to(project)) for folder in folders for p in folder.rglob("*")
             if p.is_file() and run in (p.relative_to(folder).parts[0], p.stem if p.parent == folder else None)]
    return sorted(re.sub(r"events\.out\.tfevents\..*$", "events.out.tfevents.*", name) for name in names)


@pytest.fixture(scope="module")
def sge_repro_bin_path() -> str:
    return str(Path(sys.executable).parent / "sge-repro")


@pytest.fixture(scope="module")
def smoke_project(tmp_path_factory, sge_repro_bin_path):
    """The smoke profile with the classification data and recipe above; data prepared."""
    from .conftest import copy_project

    project = copy_project(tmp_path_factory.mktemp("launch") / "project")
    raw = profile_params("smoke", project / PROFILES_DIR).model_dump(mode="json")
    raw["data"]["classification"].update(DATA)
    raw["train_cls"].update(RECIPE)
    raw["eval_cls"]["image_size"] = 32
    raw["cpu_threads"] = 2  # 2 processes: 1 thread each
    (project / "params.yaml").write_text(dump_params(validate_params(raw)))
    ok(cli(sge_repro_bin_path, project, "run", "data"))
    return project


def test_two_processes_train_what_one_trains_and_write_only_its_files(smoke_project, sge_repro_bin_path):
    project, bin_path = smoke_project, sge_repro_bin_path
    set_params(project, launch={"nproc_per_node": 2}, train_cls=EQUIVALENCE)
    ok(cli(bin_path, project, "run", "train_cls@resnet18-0"))
    log = (project / "logs" / "dvc-repro.log").read_text()
    assert "train_cls@resnet18-0: epoch 2 train_loss" in log  # rank 0's lines reach DVC's output
    two = torch.load(project / "runs/cls/resnet18-seed0/last.pt", weights_only=True)
    assert two["recipe"]["world_size"] == 2 and two["recipe"]["sync_bn"] is True
    launched_files = run_files(project, "resnet18")
    assert launched_files == sorted(["runs/cls/resnet18-seed0/last.pt", "runs/cls/resnet18-seed0/best.pt",
                                     "runs/cls/resnet18-seed0/tensorboard/events.out.tfevents.*",
                                     "metrics/train_cls/resnet18-seed0.json", "plots/train_cls/resnet18-seed0.tsv"])
    assert [p.name for p in (project / "logs" / "launch" / "train_cls@resnet18-0").iterdir()] == []

    # How the stage was launched is not a dependency: nothing to redo, in either layout.
    assert "0 stage(s) ran" in ok(cli(bin_path, project, "run", "train_cls@resnet18-0")).stdout
    set_params(project, launch={"nproc_per_node": 1})
    assert not {s for s in stale(project) if s.startswith("train_cls@resnet18")}
    assert "0 stage(s) ran" in ok(cli(bin_path, project, "run", "train_cls@resnet18-0")).stdout

    # The same stage in one process (outputs moved away first: they persist and would be resumed).
    (project / "runs/cls/resnet18-seed0").rename(project / "two-processes")
    ok(cli(bin_path, project, "run", "train_cls@resnet18-0", "--force"))
    one = torch.load(project / "runs/cls/resnet18-seed0/last.pt", weights_only=True)
    assert one["recipe"]["world_size"] == 1 and run_files(project, "resnet18") == launched_files
    assert_trained_the_same(two, one)


def assert_trained_the_same(two: dict, one: dict) -> None:
    """Two processes (sync_bn) trained what one trains: weights and SGD momentum within
    SYNC_BN_TOLERANCE, losses within LOSS_TOLERANCE, the same top-1 every epoch."""
    error, name = largest_relative_error(two["state_dict"], one["state_dict"])
    assert error <= SYNC_BN_TOLERANCE, (name, error)
    momentum = {key: state["momentum_buffer"] for key, state in one["optimizer"]["state"].items()}
    error, key = largest_relative_error(
        {key: state["momentum_buffer"] for key, state in two["optimizer"]["state"].items()}, momentum)
    assert error <= SYNC_BN_TOLERANCE, (key, error)
    for row_one, row_two in zip(one["history"], two["history"], strict=True):
        for key in ("train_loss", "val_loss"):
            assert row_two[key] == pytest.approx(row_one[key], rel=LOSS_TOLERANCE)
        for key in ("train_top1", "val_top1"):
            assert row_two[key] == row_one[key]


def worker_pids(project: Path) -> list[int]:
    """The pids of the launched workers of the `sge-repro train cls` running in `project`: the
    spawned children of that process (torch elastic's multiprocessing start method is spawn)."""
    def cmdline(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")

    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or Path(os.readlink(entry / "cwd")) != project:
                continue
            pid = int(entry.name)
            if "spawn_main" in cmdline(pid) and " train cls " in cmdline(parent(pid)) + " ":
                found.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)


def test_a_killed_rank_fails_the_stage_in_one_line_and_a_rerun_on_fewer_processes_resumes(
        smoke_project, sge_repro_bin_path):
    project, bin_path = smoke_project, sge_repro_bin_path
    epochs = 6
    set_params(project, launch={"nproc_per_node": 2},
               # SGE needs more than 1x1 positions in layer4: 64 px crops of the 32 px images
               train_cls={"sync_bn": True, "epochs": epochs, "warmup_epochs": 0, "lr": 0.05, "image_size": 64})
    last = project / "runs/cls/sge_resnet18-seed0/last.pt"
    with open(project / "run.out", "w") as out:
        run = subprocess.Popen([bin_path, "run", "train_cls@sge_resnet18-0"], cwd=project, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not last.exists():
            assert run.poll() is None, (project / "run.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.05)
        workers = worker_pids(project)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)  # the one spawned last (rank 1, unless pids wrapped)
        run.wait(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 2
    log = (project / "logs" / "dvc-repro.log").read_text()
    message = r"train_cls@sge_resnet18-0: rank [01] failed: killed by signal 9 \(SIGKILL\)\n"
    assert re.search("(^|\n)error: " + message, log)  # one line, as the stage command printed it
    assert re.search("\nerror: " + message, (project / "run.out").read_text())  # and `run` shows it
    killed = torch.load(last, weights_only=True)
    assert 1 <= killed["epoch"] < epochs and not (project / "metrics/train_cls/sge_resnet18-seed0.json").exists()

    # A recipe change moves the run aside (rank 0, the other rank waiting) and trains from scratch:
    # one warning names the key and where the old run went, which is left as it was.
    before = last.read_bytes()
    set_params(project, train_cls={"lr": 0.01})
    changed = ok(cli(bin_path, project, "train", "cls", "--model", "sge_resnet18", "--seed", "0"))
    [moved] = (project / "runs/superseded/cls").glob("sge_resnet18-seed0-*")
    assert (moved / "last.pt").read_bytes() == before
    assert re.search(rf"runs/cls/sge_resnet18-seed0: trained with other params \(train_cls.lr 0.05 -> 0.01\); "
                     rf"moved to {re.escape(str(moved.relative_to(project)))}, training from scratch",
                     changed.stdout + changed.stderr), changed.stderr[-3000:]
    retrained = torch.load(last, weights_only=True)
    assert retrained["recipe"]["lr"] == 0.01 and [row["epoch"] for row in retrained["history"]] == list(
        range(1, epochs + 1))
    # the way back to the old run: its values restored, its folder put back
    shutil.rmtree(project / "runs/cls/sge_resnet18-seed0")
    moved.rename(project / "runs/cls/sge_resnet18-seed0")

    # The same recipe on 1 process (the same global batch of 32): resumes after the killed run's
    # last epoch rather than starting over, and finishes.
    set_params(project, train_cls={"lr": 0.05}, launch={"nproc_per_node": 1})
    ok(cli(bin_path, project, "run", "train_cls@sge_resnet18-0"))
    final = torch.load(last, weights_only=True)
    assert final["epoch"] == epochs and final["recipe"]["world_size"] == 1
    # The epochs before the kill are the killed run's own rows (their timings too: not retrained).
    assert final["history"][:killed["epoch"]] == killed["history"]
    assert json.loads((project / "metrics/train_cls/sge_resnet18-seed0.json").read_text())["epochs"] == epochs
