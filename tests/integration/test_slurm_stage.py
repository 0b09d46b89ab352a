"""A training stage launched as a SLURM job through the real pipeline (`sge-repro run`, real DVC,
submitit, the private test cluster of tests/slurm_cluster.py, gloo on CPU): what it trains, what it
writes, how many jobs it submits, and a rerun after the head process was killed mid-job.

Nothing is mocked. The job runs in the project folder with the head's Python and environment (the
"shared filesystem" is this host's); SLURM_CONF and PYTHONPATH come from the `slurm_cluster`
fixture."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from sge_repro import run_lock
from sge_repro.launch.slurm import RECORD_FILE

# The data, recipe and equivalence conditions of the local 2-process test (justified there), and
# its module-scoped smoke project with that data prepared.
from .test_launch_stages import (EQUIVALENCE, assert_trained_the_same, cli, ok, run_files,  # noqa: F401
                                 set_params, sge_repro_bin_path, smoke_project, stale)

# Each test takes 1-3 minutes on 2 busy cores; the limit only ends a hang (a job that never starts).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STAGE = "train_cls@resnet18-0"
RUN_DIR = "runs/cls/resnet18-seed0"
OUTPUTS = sorted([f"{RUN_DIR}/last.pt", f"{RUN_DIR}/best.pt", f"{RUN_DIR}/tensorboard/events.out.tfevents.*",
                  "metrics/train_cls/resnet18-seed0.json", "plots/train_cls/resnet18-seed0.tsv"])


def slurm_launch(cluster) -> dict:
    """Two tasks on the test node's two cores, one core and 1 GB each: the job fits the node. The
    time limit only bounds a job a failed test leaves behind (the cluster cancels the rest at exit)."""
    return {"launcher": "slurm", "nproc_per_node": 2, "nodes": 1,
            "slurm": {"partition": cluster.partition, "cpus_per_task": 1, "mem_per_task": "1G",
                      "time_limit": "15:00"}}


def wait_until(condition, timeout_s: float, what: str, process: subprocess.Popen | None = None,
               output: Path | None = None) -> None:
    """Poll `condition` until it holds; fail after `timeout_s`, or at once when `process` exited."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"no {what}: the process exited {process.returncode}\n"
                                 + (output.read_text()[-3000:] if output else ""))
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s:.0f} s")
        time.sleep(0.1)


def record(project: Path) -> dict:
    return json.loads((project / "logs" / "launch" / STAGE / RECORD_FILE).read_text())


def repro_log(project: Path) -> str:
    path = project / "logs" / "dvc-repro.log"
    return path.read_text() if path.exists() else ""


def completion_record(cluster, job_id: str, job_name: str) -> list:
    """Every job of that name the cluster holds and, once it is written (the controller writes the
    job completion log as the job ends), the one completion record of the job."""
    assert cluster.jobs_named(job_name) == [job_id]
    wait_until(lambda: cluster.finished_jobs(job_name), 60, f"completion record of job {job_id}")
    return cluster.finished_jobs(job_name)


def test_a_slurm_job_of_two_tasks_trains_what_one_process_trains_and_writes_only_its_files(
        slurm_cluster, smoke_project, sge_repro_bin_path):
    project, bin_path = smoke_project, sge_repro_bin_path
    set_params(project, launch=slurm_launch(slurm_cluster), train_cls=EQUIVALENCE)
    ok(cli(bin_path, project, "run", STAGE))
    log = repro_log(project)
    job = record(project)
    job_id, job_name = job["job_id"], job["job_name"]
    assert job["ntasks"] == 2 and log.count("submitted SLURM job") == 1
    assert f"{STAGE}: submitted SLURM job {job_id} (1 node(s) x 2 task(s))" in log
    # Rank 0's epoch lines came from the job's log through the head to DVC's output; rank 1 prints none.
    assert f"[rank 0] {STAGE}: epoch 2 train_loss" in log, log[-3000:]
    assert f"[rank 1] {STAGE}: epoch" not in log
    # One job for the stage, and it completed.
    assert completion_record(slurm_cluster, job_id, job_name) == [(job_id, job_name, "COMPLETED")]

    two = torch.load(project / RUN_DIR / "last.pt", weights_only=True)
    assert two["recipe"]["world_size"] == 2 and two["recipe"]["sync_bn"] is True
    assert run_files(project, "resnet18") == OUTPUTS  # one TensorBoard events file: rank 0's

    # How the stage was launched is not a dependency: a rerun, in either layout, has nothing to
    # redo and submits nothing.
    assert "0 stage(s) ran" in ok(cli(bin_path, project, "run", STAGE)).stdout
    set_params(project, launch={"launcher": "local", "nproc_per_node": 1})
    assert not {s for s in stale(project) if s.startswith("train_cls@resnet18")}
    assert slurm_cluster.jobs_named(job_name) == [job_id]

    # The same stage in one local process (the SLURM run moved away: its outputs persist and
    # would be resumed).
    (project / RUN_DIR).rename(project / "slurm-two-tasks")
    ok(cli(bin_path, project, "run", STAGE, "--force"))
    one = torch.load(project / RUN_DIR / "last.pt", weights_only=True)
    assert one["recipe"]["world_size"] == 1 and run_files(project, "resnet18") == OUTPUTS
    assert_trained_the_same(two, one)


def kill_process_group(process: subprocess.Popen) -> None:
    """SIGKILL `sge-repro run` with its `dvc repro` and the stage command (the SLURM head; DVC runs
    it in the run's process group): no cleanup anywhere; the SLURM job is not in it."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_a_rerun_after_the_head_is_killed_reattaches_to_the_running_job_and_completes(
        slurm_cluster, smoke_project, sge_repro_bin_path, tmp_path):
    project, bin_path = smoke_project, sge_repro_bin_path
    # ~1 s per epoch here: after the first checkpoint the job trains for seconds more, while the
    # suspension below follows it within a poll (0.1 s) and one scontrol call.
    epochs = 8
    # A fresh start whatever ran before in this project.
    for folder in (project / RUN_DIR, project / "logs" / "launch" / STAGE):
        shutil.rmtree(folder, ignore_errors=True)
    for name in ("metrics/train_cls/resnet18-seed0.json", "plots/train_cls/resnet18-seed0.tsv"):
        (project / name).unlink(missing_ok=True)
    set_params(project, launch=slurm_launch(slurm_cluster), train_cls={**EQUIVALENCE, "epochs": epochs})
    last = project / RUN_DIR / "last.pt"

    first_out = tmp_path / "first.out"
    with open(first_out, "w") as out:
        first = subprocess.Popen([bin_path, "run", STAGE], cwd=project, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    job_id = None
    suspended = False
    try:
        try:
            # Mid-job: the job has trained and saved at least one epoch (the first run's start,
            # queueing and imports take most of this bound on 2 busy cores).
            wait_until(last.exists, 600, "checkpoint of the SLURM job", first, first_out)
            job = record(project)
            job_id, job_name = job["job_id"], job["job_name"]
            # Hold the job (SIGSTOP to its tasks, as an operator's `scontrol suspend`) so that it is
            # still live however long the rerun takes to start; no race with a fast machine.
            slurm_cluster.run("scontrol", "suspend", job_id)
            suspended = True
            assert slurm_cluster.wait_for_state(job_id, {"SUSPENDED"}, timeout_s=60) == "SUSPENDED"
            killed = torch.load(last, weights_only=True)  # written atomically: whole, and now frozen
        finally:
            kill_process_group(first)
        assert 1 <= killed["epoch"] < epochs
        # The killed DVC processes are gone once reaped (their pids stay in DVC's rwlock, which DVC
        # clears itself when they are dead); the job lives on without its head.
        wait_until(lambda: not any(run_lock.pid_alive(h.pid) for h in run_lock.dvc_rwlock_holders(project)),
                   60, "end of the killed dvc processes")
        assert slurm_cluster.job_state(job_id) == "SUSPENDED"

        second_out = tmp_path / "second.out"
        with open(second_out, "w") as out:
            second = subprocess.Popen([bin_path, "run", STAGE], cwd=project, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # The rerun truncated the log before DVC started: only its own lines are in it.
            wait_until(lambda: f"re-attaching to SLURM job {job_id} (SUSPENDED)" in repro_log(project), 300,
                       "re-attach message", second, second_out)
            slurm_cluster.run("scontrol", "resume", job_id)
            suspended = False
            second.wait(timeout=600)
        finally:
            if second.poll() is None:
                kill_process_group(second)
    finally:
        if suspended:
            slurm_cluster.run("scontrol", "resume", job_id)
    log = repro_log(project)
    assert second.returncode == 0, second_out.read_text()[-3000:] + log[-3000:]
    assert "submitted SLURM job" not in log  # nothing was submitted again
    assert f"[rank 0] {STAGE}: epoch {epochs} train_loss" in log, log[-3000:]
    # One job for the stage in the cluster's records, and it completed.
    assert record(project)["job_id"] == job_id
    assert completion_record(slurm_cluster, job_id, job_name) == [(job_id, job_name, "COMPLETED")]

    # Complete outputs, trained on by the same job: the rows before the kill are the killed run's own
    # (their timings too: not retrained), and DVC recorded the stage.
    final = torch.load(last, weights_only=True)
    assert final["epoch"] == epochs and final["recipe"]["world_size"] == 2
    assert [row["epoch"] for row in final["history"]] == list(range(1, epochs + 1))
    assert final["history"][:killed["epoch"]] == killed["history"]
    assert json.loads((project / "metrics/train_cls/resnet18-seed0.json").read_text())["epochs"] == epochs
    assert len((project / "plots/train_cls/resnet18-seed0.tsv").read_text().strip().splitlines()) == 1 + epochs
    assert run_files(project, "resnet18") == OUTPUTS
    assert not {s for s in stale(project) if s.startswith("train_cls@resnet18")}
