"""The SLURM backend against a real single-host cluster (tests/slurm_cluster.py): CPU, gloo, nothing mocked."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sge_repro.errors import UserError
from sge_repro.launch.errors import LaunchError
from sge_repro.launch.slurm import RECORD_FILE, run, sbatch_parameters, submission_fingerprint
from sge_repro.params_sections import LaunchParams, SlurmParams

from .slurm_targets import all_reduce_ranks, fail_on_rank

# Two tasks on this host's two cores, little memory: the job fits the test node.
TWO_TASKS = LaunchParams(launcher="slurm", nproc_per_node=2,
                         slurm=SlurmParams(cpus_per_task=1, mem_per_task="1G", time_limit="15:00"))

pytestmark = pytest.mark.timeout(600)

# The head process as `sge-repro` would be: run() in its own process, which the tests kill.
HEAD = """
import json, sys
from pathlib import Path
from launch.slurm_targets import all_reduce_ranks
from sge_repro.launch.slurm import run
from sge_repro.params import LaunchParams
settings = LaunchParams.model_validate_json(sys.argv[1])
state_dir, markers, gate = sys.argv[2:5]
result = run(all_reduce_ranks, (2.0, markers, gate), settings, name="gated", state_dir=Path(state_dir))
print("RESULT", json.dumps(result), flush=True)
"""


def start_head(tmp_path: Path, tag: str) -> tuple[subprocess.Popen, Path]:
    stderr = tmp_path / f"head-{tag}.err"
    process = subprocess.Popen(
        [sys.executable, "-c", HEAD, TWO_TASKS.model_dump_json(), str(tmp_path / "state"), str(tmp_path / "markers"),
         str(tmp_path / "gate")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=open(stderr, "w"), text=True,
        preexec_fn=default_sigint)
    return process, stderr


def default_sigint() -> None:
    """Ctrl-C as at a terminal: a suite started in the background of a shell inherits SIGINT
    ignored, and Python then never raises KeyboardInterrupt (the Ctrl-C test would kill the head
    and leave its job holding the test node)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout_s} s")


def recorded_job(state_dir: Path) -> dict:
    return json.loads((state_dir / RECORD_FILE).read_text())


def both_ranks_started(tmp_path: Path) -> bool:
    return all((tmp_path / "markers" / f"started-{rank}").exists() for rank in (0, 1))


def test_two_tasks_all_reduce_over_gloo_and_rank_0_result(slurm_cluster, tmp_path, capsys):
    state_dir = tmp_path / "state"
    result = run(all_reduce_ranks, (2.0,), TWO_TASKS, name="allreduce", state_dir=state_dir)
    # Rank 0's return value; both ranks contributed (2 * 1 + 2 * 2).
    assert result["rank"] == 0 and result["world_size"] == 2 and result["sum"] == 6.0
    env = result["env"]
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("0", "0", "2", "2")
    assert env["MASTER_ADDR"] == slurm_cluster.node
    # Both tasks' logs were streamed to the console, rank-prefixed.
    streamed = capsys.readouterr()
    assert "[rank 0] rank 0 of 2 reduced 6.0" in streamed.out
    assert "[rank 1] rank 1 of 2 reduced 6.0" in streamed.out
    record = recorded_job(state_dir)
    job_id = record["job_id"]
    assert record["ntasks"] == 2 and f"submitted SLURM job {job_id}" in streamed.err
    assert slurm_cluster.job_state(job_id) == "COMPLETED"
    # A rerun of the same call collects the finished job: nothing is submitted again.
    again = run(all_reduce_ranks, (2.0,), TWO_TASKS, name="allreduce", state_dir=state_dir)
    assert again == result
    assert f"SLURM job {job_id} already finished" in capsys.readouterr().err
    assert slurm_cluster.jobs_named(record["job_name"]) == [job_id]
    # Other arguments are another computation: a new job.
    other = run(all_reduce_ranks, (3.0,), TWO_TASKS, name="allreduce", state_dir=state_dir)
    assert other["sum"] == 9.0
    assert recorded_job(state_dir)["job_id"] != job_id


def test_a_failing_task_fails_the_launch_with_the_job_and_its_error(slurm_cluster, tmp_path, capsys):
    with pytest.raises(LaunchError) as raised:
        run(fail_on_rank, (1, "the data is not there"), TWO_TASKS, name="failing", state_dir=tmp_path / "state")
    job_id = recorded_job(tmp_path / "state")["job_id"]
    message = str(raised.value)
    assert "\n" not in message
    assert re.match(rf"failing: SLURM job {job_id} failed on rank 1: ValueError: the data is not there \(log: ",
                    message), message
    # The job is over (rank 0 did not stay in its barrier until the time limit).
    assert slurm_cluster.wait_for_state(job_id, {"FAILED", "CANCELLED"}, timeout_s=60)
    # A rerun does not collect the failed job: it says so and submits a new one (which fails the same way).
    with pytest.raises(LaunchError, match="failed on rank 1: ValueError: the data is not there"):
        run(fail_on_rank, (1, "the data is not there"), TWO_TASKS, name="failing", state_dir=tmp_path / "state")
    assert f"the earlier SLURM job {job_id} ended" in capsys.readouterr().err
    assert recorded_job(tmp_path / "state")["job_id"] != job_id


def test_rerun_after_the_head_is_killed_reattaches_to_the_running_job(slurm_cluster, tmp_path):
    (tmp_path / "markers").mkdir()
    head, _ = start_head(tmp_path, "first")
    try:
        wait_until(lambda: both_ranks_started(tmp_path), 180, "running job")
        job_id = recorded_job(tmp_path / "state")["job_id"]
    finally:
        head.kill()  # SIGKILL: no cleanup in the head at all
        head.wait()
    assert slurm_cluster.job_state(job_id) == "RUNNING"

    rerun, rerun_err = start_head(tmp_path, "second")
    try:
        wait_until(lambda: "re-attaching" in rerun_err.read_text(), 60, "re-attach message")
        (tmp_path / "gate").touch()  # now the job may finish
        out, _ = rerun.communicate(timeout=180)
    finally:
        if rerun.poll() is None:
            rerun.kill()
    assert rerun.returncode == 0, rerun_err.read_text()
    assert json.loads(out.split("RESULT ", 1)[1])["sum"] == 6.0
    assert f"re-attaching to SLURM job {job_id} (RUNNING)" in rerun_err.read_text()
    # One job in all, and it completed.
    job_name = recorded_job(tmp_path / "state")["job_name"]
    assert slurm_cluster.jobs_named(job_name) == [job_id]
    wait_until(lambda: slurm_cluster.finished_jobs(job_name), 30, "job completion record")
    assert slurm_cluster.finished_jobs(job_name) == [(job_id, job_name, "COMPLETED")]


def test_a_job_submitted_but_never_recorded_is_adopted(slurm_cluster, tmp_path):
    # The head died between sbatch's answer and writing the record: the rerun finds the live job
    # by its name (stage + fingerprint) instead of submitting a second one.
    (tmp_path / "markers").mkdir()
    head, _ = start_head(tmp_path, "first")
    try:
        wait_until(lambda: both_ranks_started(tmp_path), 180, "running job")
        record = recorded_job(tmp_path / "state")
    finally:
        head.kill()
        head.wait()
    (tmp_path / "state" / RECORD_FILE).unlink()
    rerun, rerun_err = start_head(tmp_path, "second")
    try:
        wait_until(lambda: "adopting" in rerun_err.read_text(), 60, "adoption message")
        (tmp_path / "gate").touch()
        out, _ = rerun.communicate(timeout=180)
    finally:
        if rerun.poll() is None:
            rerun.kill()
    assert rerun.returncode == 0, rerun_err.read_text()
    assert json.loads(out.split("RESULT ", 1)[1])["sum"] == 6.0
    assert f"adopting SLURM job {record['job_id']} (RUNNING)" in rerun_err.read_text()
    assert recorded_job(tmp_path / "state")["job_id"] == record["job_id"]
    assert slurm_cluster.jobs_named(record["job_name"]) == [record["job_id"]]


def test_ctrl_c_in_the_head_cancels_the_job(slurm_cluster, tmp_path):
    (tmp_path / "markers").mkdir()
    head, head_err = start_head(tmp_path, "interrupted")
    try:
        wait_until(lambda: both_ranks_started(tmp_path), 180, "running job")
        job_id = recorded_job(tmp_path / "state")["job_id"]
        head.send_signal(signal.SIGINT)
        head.communicate(timeout=60)
    finally:
        if head.poll() is None:
            head.kill()
    assert head.returncode != 0
    assert f"cancelled SLURM job {job_id}" in head_err.read_text()
    assert "KeyboardInterrupt" in head_err.read_text()
    assert slurm_cluster.wait_for_state(job_id, {"CANCELLED"}, timeout_s=60) == "CANCELLED"


def test_a_job_ended_from_outside_fails_the_launch_with_its_state(slurm_cluster, tmp_path):
    (tmp_path / "markers").mkdir()
    head, head_err = start_head(tmp_path, "cancelled")
    try:
        wait_until(lambda: both_ranks_started(tmp_path), 180, "running job")
        job_id = recorded_job(tmp_path / "state")["job_id"]
        slurm_cluster.run("scancel", job_id)  # as an administrator, preemption or a time limit would
        head.communicate(timeout=120)
    finally:
        if head.poll() is None:
            head.kill()
    assert head.returncode == 1
    last = head_err.read_text().strip().splitlines()[-1]
    assert re.match(rf"sge_repro.launch.errors.LaunchError: gated: SLURM job {job_id} ended CANCELLED without a "
                    rf"result from rank 0: .*CANCELLED.* \(log: ", last), last


def test_a_job_still_running_for_other_arguments_is_not_overrun(slurm_cluster, tmp_path):
    (tmp_path / "markers").mkdir()
    head, _ = start_head(tmp_path, "first")
    try:
        wait_until(lambda: both_ranks_started(tmp_path), 180, "running job")
        job_id = recorded_job(tmp_path / "state")["job_id"]
    finally:
        head.kill()
        head.wait()
    try:
        with pytest.raises(UserError, match=rf"gated: SLURM job {job_id} .* was submitted for other params and is "
                                            rf"still RUNNING.*`scancel {job_id}`"):
            run(all_reduce_ranks, (5.0,), TWO_TASKS, name="gated", state_dir=tmp_path / "state")
    finally:
        slurm_cluster.run("scancel", job_id)
    assert recorded_job(tmp_path / "state")["job_id"] == job_id


def test_sbatch_parameters_from_params():
    settings = LaunchParams(launcher="slurm", nodes=4, nproc_per_node=8, slurm=SlurmParams(
        partition="gpu", account="vision", time_limit="2-00:00:00", cpus_per_task=10, mem_per_task="60G",
        extra_options=["--qos=high", "--exclusive"]))
    parameters = sbatch_parameters(settings, 8, cuda=True, job_name="sge-x")
    assert parameters["nodes"] == 4 and parameters["ntasks_per_node"] == 8 and parameters["gpus_per_node"] == 8
    assert parameters["cpus_per_task"] == 10 and parameters["mem"] == f"{60 * 1024 * 8}M"
    assert parameters["partition"] == "gpu" and parameters["account"] == "vision"
    assert parameters["additional_parameters"] == {"time": "2-00:00:00", "qos": "high", "exclusive": True}
    assert "gpus_per_node" not in sbatch_parameters(settings, 8, cuda=False, job_name="sge-x")


def test_the_job_fingerprint_covers_what_is_computed_not_how_it_is_launched():
    """README: changing launch settings (time limit, partition) while a job runs re-attaches to it;
    changing what the stage computes does not."""
    from sge_repro.params import Params

    base = Params()
    fingerprint = submission_fingerprint(all_reduce_ranks, (base, "resnet18"))
    relaunched = base.model_copy(update={"launch": LaunchParams(launcher="slurm", nproc_per_node=4, slurm=SlurmParams(
        time_limit="1-00:00:00", partition="long"))})
    assert submission_fingerprint(all_reduce_ranks, (relaunched, "resnet18")) == fingerprint
    retrained = base.model_copy(update={"cpu_threads": base.cpu_threads + 1})
    assert submission_fingerprint(all_reduce_ranks, (retrained, "resnet18")) != fingerprint
    assert submission_fingerprint(all_reduce_ranks, (base, "resnet50")) != fingerprint
    assert submission_fingerprint(fail_on_rank, (base, "resnet18")) != fingerprint


def test_an_argument_whose_repr_is_a_memory_address_is_refused():
    class Plain:
        pass

    with pytest.raises(TypeError, match="Plain: its repr names a memory address"):
        submission_fingerprint(all_reduce_ranks, (Plain(),))


def test_nproc_per_node_auto_is_refused_for_slurm(tmp_path):
    settings = LaunchParams(launcher="slurm", nproc_per_node="auto")
    with pytest.raises(UserError, match="launch.nproc_per_node: auto cannot be resolved for launcher slurm"):
        run(all_reduce_ranks, (1.0,), settings, name="auto", state_dir=tmp_path)


def test_a_classifier_trained_by_two_slurm_tasks_with_sync_bn_equals_one_process(slurm_cluster, tmp_path):
    import torch

    from classification.conftest import RECIPE, TINY_MODEL, outputs, train
    from classification.test_distributed import EQUIVALENCE_OPTIONS, LOSS_TOLERANCE, SYNC_BN_TOLERANCE, TIMING_KEYS
    from float_compare import largest_relative_error
    from sge_repro.data.synthetic import generate_classification_set
    from sge_repro.params_sections import ModelParams, TrainClsParams

    from .slurm_targets import train_one_thread

    data_root = tmp_path / "data" / "cls"
    generate_classification_set(data_root, num_classes=3, image_size=32, train_per_class=40, val_per_class=10, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each SLURM task (train_one_thread)
    try:
        single = train(data_root, tmp_path / "one", **EQUIVALENCE_OPTIONS)
    finally:
        torch.set_num_threads(threads)
    recipe = {**RECIPE, **EQUIVALENCE_OPTIONS, "sync_bn": True}
    seed = recipe.pop("seed")
    args = (TrainClsParams(**recipe), ModelParams(**TINY_MODEL[1]), TINY_MODEL[0], seed, data_root,
            *outputs(tmp_path / "two"))
    launched = run(train_one_thread, args, TWO_TASKS, name="train_cls", state_dir=tmp_path / "state")

    expected = torch.load(outputs(tmp_path / "one")[0] / "last.pt", weights_only=True)
    actual = torch.load(outputs(tmp_path / "two")[0] / "last.pt", weights_only=True)
    assert actual["recipe"]["world_size"] == 2 and actual["recipe"]["sync_bn"] is True
    # The tolerances of tests/classification/test_distributed.py (justified there).
    error, name = largest_relative_error(actual["state_dict"], expected["state_dict"])
    assert error <= SYNC_BN_TOLERANCE, (name, error)
    momentum = {key: state["momentum_buffer"] for key, state in expected["optimizer"]["state"].items()}
    error, key = largest_relative_error(
        {key: state["momentum_buffer"] for key, state in actual["optimizer"]["state"].items()}, momentum)
    assert error <= SYNC_BN_TOLERANCE, (key, error)
    # Rank 0's metrics came back through SLURM and equal what rank 0 wrote and the single process's.
    assert launched == json.loads(outputs(tmp_path / "two")[1].read_text())
    for key in set(single) - TIMING_KEYS:
        expected_value = single[key]
        if isinstance(expected_value, float):
            expected_value = pytest.approx(expected_value, rel=LOSS_TOLERANCE)
        assert launched[key] == expected_value, key
