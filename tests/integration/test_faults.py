"""Fault injection: concurrent runs, live and dead lock holders, bad params types, corrupt and
hostile checkpoints. Real processes, real DVC, real fcntl locks and SIGKILL; no mocks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sge_repro import run_lock
from sge_repro.errors import UserError
from sge_repro.models.weight_files import load_checkpoint_file
from sge_repro.params_yaml import dump_params, profile_params

REPO = Path(__file__).resolve().parents[2]


def cli(bin_path: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([bin_path, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The whole output of a failed command: exactly one line, on stderr."""
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr
    assert lines[0] in result.stderr
    return lines[0]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ----------------------------------------------------------------------------- a second run, status and the log while a run holds the lock
@pytest.mark.slow
def test_second_run_and_status_while_a_run_holds_the_lock(project, sge_repro_bin, tmp_path):
    smoke_params = dump_params(profile_params("smoke", project / "pipelines" / "profiles"))
    log = project / "logs" / "dvc-repro.log"
    with open(tmp_path / "first.out", "w") as out:
        first = subprocess.Popen([sge_repro_bin, "run", "all", "--profile", "smoke"], cwd=project,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: log.exists() and "Running stage" in log.read_text(), 180, "the first run's first stage")
        log_before = log.read_text()

        # the second run exits 2 on the lock without touching params.yaml
        second = cli(sge_repro_bin, project, "run", "all", "--profile", "embedded")
        message = one_line(second)
        assert f"a pipeline run is in progress (pid {first.pid}: sge-repro run all --profile smoke)" in message
        assert (project / "params.yaml").read_text() == smoke_params
        # ... nor the first run's log (its "full log" pointer would show another run)
        assert log.read_text().startswith(log_before)
        assert "full log" not in second.stderr

        # status names the run and never advises removing a live run's lock
        status = one_line(cli(sge_repro_bin, project, "status"))
        assert f"in progress (pid {first.pid}: sge-repro run all --profile smoke)" in status
        assert "rwlock" not in status and "remove" not in status
        assert first.poll() is None, "the first run must still be running"
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the run, dvc repro and the stage command
        first.wait()
    # dvc repro and its stage were the run's children: they go once init has reaped them. Until then
    # they are zombies, which DVC's own check (psutil) still counts as running: wait for the pids to
    # be gone altogether, not only dead (run_lock.pid_alive counts a zombie as dead)
    wait_for(lambda: not any(run_lock.pid_exists(h.pid) for h in run_lock.dvc_rwlock_holders(project)),
             60, "the killed dvc processes to be reaped")

    # a killed run leaves no lock behind that needs removing: the kernel dropped the fcntl lock,
    # DVC drops dead pids from its rwlock itself
    assert cli(sge_repro_bin, project, "status").returncode == 0
    assert run_lock.busy(project) is None


def test_after_ctrl_c_the_run_ends_only_with_its_dvc_child(project, sge_repro_bin, tmp_path):
    """SIGINT to `sge-repro run` alone (a Ctrl-C at a terminal also reaches DVC; a `kill -INT` does
    not): the run stops DVC and waits for it, so a rerun right after is not refused 'in progress'."""
    log = project / "logs" / "dvc-repro.log"
    with open(tmp_path / "run.out", "w") as out:
        # SIGINT as at a terminal, even when this suite inherited it ignored (started in the background)
        first = subprocess.Popen([sge_repro_bin, "run", "all", "--profile", "smoke"], cwd=project,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: log.exists() and "Running stage 'train_cls" in log.read_text(), 300, "a training stage")
        os.kill(first.pid, signal.SIGINT)
        first.wait(timeout=120)
        assert run_lock.busy(project) is None
        assert not [h for h in run_lock.dvc_rwlock_holders(project) if run_lock.pid_exists(h.pid)]
        status = cli(sge_repro_bin, project, "status")
        assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-2000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()


# ----------------------------------------------------------------------------- DVC's own locks
def write_rwlock(project: Path, pid: int, cmd: str) -> None:
    lock = {"write": {str(project / "data" / "cls"): {"pid": pid, "cmd": cmd}}}
    (project / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    (project / ".dvc" / "tmp" / "rwlock").write_text(json.dumps(lock))


def test_live_dvc_process_in_rwlock_blocks_run_and_status(project, sge_repro_bin):
    """A `dvc repro` started by hand (or orphaned by a killed run) is listed in DVC's rwlock (here a
    process whose command line reads like one: `python -c <sleep> dvc repro train_cls`)."""
    params_before = (project / "params.yaml").read_text()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "dvc", "repro", "train_cls"])
    try:
        write_rwlock(project, holder.pid, "dvc repro train_cls")
        run = one_line(cli(sge_repro_bin, project, "run", "all", "--profile", "smoke"))
        assert f"a pipeline run is in progress (pid {holder.pid}: dvc repro train_cls)" in run
        assert (project / "params.yaml").read_text() == params_before
        assert not (project / "logs").exists()
        status = one_line(cli(sge_repro_bin, project, "status"))
        assert f"in progress (pid {holder.pid}: dvc repro train_cls)" in status
        assert "remove" not in status
    finally:
        holder.kill()
        holder.wait()
    # the same file naming a dead process: DVC drops the entry itself, status works
    result = cli(sge_repro_bin, project, "status")
    assert result.returncode == 0, result.stderr
    assert "will run" in result.stdout


@pytest.mark.parametrize("mode", ["write", "read"])
def test_an_rwlock_pid_now_of_another_program_does_not_block(project, sge_repro_bin, mode):
    """A dead DVC process's pid given to another program (not a dvc command) is not a holder:
    status and run go on, and the run drops the entry as DVC drops dead ones."""
    other = subprocess.Popen(["sleep", "300"])
    try:
        info = {"pid": other.pid, "cmd": "dvc repro train_cls"}
        lock = {"write": {str(project / "data" / "cls"): info}} if mode == "write" else \
            {"read": {str(project / "data" / "manifests" / "cls.json"): [info]}}
        (project / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
        rwlock = project / ".dvc" / "tmp" / "rwlock"
        rwlock.write_text(json.dumps(lock))
        assert run_lock.busy(project) is None
        status = cli(sge_repro_bin, project, "status")
        assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-2000:]
        result = cli(sge_repro_bin, project, "run", "data", "--profile", "smoke")
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert str(other.pid) not in rwlock.read_text()
        assert other.poll() is None  # the other program is left alone
    finally:
        other.kill()


def test_dvc_lock_message_advises_removal_only_for_dead_pids(tmp_path):
    def blocked(pid: int) -> str:
        return (f"ERROR: '/p/data/cls' is busy, it is being blocked by:\n  (PID {pid}): dvc repro\n\n"
                "If there are no processes with such PIDs, you can manually remove '/p/.dvc/tmp/rwlock' and try again.")

    live = run_lock.explain_dvc_lock_error(blocked(os.getpid()), tmp_path)
    assert live == run_lock.in_progress_message(run_lock.Holder(os.getpid(), "dvc repro"))
    assert "remove" not in live
    pid = dead_pid()
    dead = run_lock.explain_dvc_lock_error(blocked(pid), tmp_path)
    assert f"pid {pid}: dvc repro" in dead and "no longer run" in dead and "remove .dvc/tmp/rwlock" in dead
    assert run_lock.explain_dvc_lock_error("ERROR: failed to reproduce 'data'", tmp_path) is None


def test_run_lock_excludes_a_second_holder_in_another_process(tmp_path):
    (tmp_path / ".dvc").mkdir()
    code = ("import sys, time; from pathlib import Path; from sge_repro import run_lock\n"
            "with run_lock.hold('holder test', Path(sys.argv[1])):\n"
            "    print('held', flush=True); time.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in progress \(pid {holder.pid}: holder test\)"):
            with run_lock.hold("second", tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock.hold("third", tmp_path):  # SIGKILL released it
        assert run_lock.busy(tmp_path).pid == os.getpid()
    assert run_lock.busy(tmp_path) is None


# ----------------------------------------------------------------------------- unknown stages
def test_unknown_stage_is_one_line(project, sge_repro_bin):
    message = one_line(cli(sge_repro_bin, project, "run", "nosuchstage"))
    assert "unknown stage 'nosuchstage'" in message


def test_unknown_stage_with_a_profile_leaves_params_yaml_as_it_was(project, sge_repro_bin):
    before = (project / "params.yaml").read_text()
    assert "profile: smoke" not in before  # the profile would rewrite it
    message = one_line(cli(sge_repro_bin, project, "run", "train_cls@nosuchmodel-seed0", "--profile", "smoke"))
    assert "unknown stage 'train_cls@nosuchmodel-seed0'" in message
    assert (project / "params.yaml").read_text() == before


@pytest.mark.parametrize("text, expected", [
    ("", "params.yaml: empty; expected every section"),
    ("seeds: [0]\n", "params.yaml: missing key(s) profile, cpu_threads, models"),
    # a detector's list is read by dvc.yaml from the file: the schema's default would not reach DVC
    (dump_params(profile_params("smoke", REPO / "pipelines" / "profiles")).replace("  mask_rcnn: []\n", ""),
     "params.yaml: missing key(s) detection.mask_rcnn"),
])
def test_empty_or_partial_params_yaml_is_named(project, sge_repro_bin, text, expected):
    (project / "params.yaml").write_text(text)
    for command in (["run", "all"], ["status"]):
        message = one_line(cli(sge_repro_bin, project, *command))
        assert expected in message and "Could not find" not in message


# ----------------------------------------------------------------------------- empty, partial and badly typed params.yaml
@pytest.mark.parametrize("edit, expected", [
    (("seeds: [0]", "seeds: [-1]"), "seeds.0: input should be greater than or equal to 0, got -1"),
    (("  epochs: 12", "  epochs: true"), "train_cls.epochs: input should be a valid integer, got True"),
])
def test_negative_seed_and_bool_epochs_refused_by_run(project, sge_repro_bin, edit, expected):
    params = project / "params.yaml"
    params.write_text(params.read_text().replace(*edit))
    assert expected in one_line(cli(sge_repro_bin, project, "run", "all"))


# ----------------------------------------------------------------------------- corrupt and hostile checkpoints
class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_corrupt_and_hostile_checkpoints_are_refused_in_one_line(project, sge_repro_bin):
    (project / "random.pt").write_bytes(os.urandom(4096))
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _Payload()}, project / "payload.pt")
    good = project / "good.pt"
    torch.save(nn.Linear(2, 2).state_dict(), good)
    (project / "truncated.pt").write_bytes(good.read_bytes()[:200])
    (project / "empty.pt").write_bytes(b"")
    expected = {"random.pt": "not a valid checkpoint", "truncated.pt": "not a valid checkpoint",
                "empty.pt": "not a valid checkpoint", "payload.pt": "refused, not a checkpoint of weights"}
    for name, phrase in expected.items():
        result = cli(sge_repro_bin, project, "convert-file", name, "out.pth", "--arch", "resnet18")
        message = one_line(result)
        assert f"checkpoint {name}: {phrase}" in message
        assert "weights_only=False" not in message and "will likely succeed" not in message
    assert "posix.system" in message or "nt.system" in message
    assert not (project / "PWNED").exists() and not (project / "out.pth").exists()


def test_detection_checkpointer_uses_the_same_safe_load(tmp_path):
    from sge_repro.detection.engine import AtomicCheckpointer

    corrupt = tmp_path / "model_final.pth"
    corrupt.write_bytes(os.urandom(1024))
    checkpointer = AtomicCheckpointer(nn.Linear(2, 2), str(tmp_path))
    with pytest.raises(UserError) as info:
        checkpointer._load_file(str(corrupt))
    assert str(info.value) == f"weights {corrupt}: not a valid checkpoint (neither a torch zip archive nor a legacy torch file)"
    with pytest.raises(UserError) as info:
        load_checkpoint_file(corrupt)
    assert str(info.value).startswith(f"checkpoint {corrupt}: not a valid checkpoint")


def test_a_killed_unreaped_process_does_not_count_as_alive():
    child = subprocess.Popen(["sleep", "300"])
    assert run_lock.pid_alive(child.pid)
    child.kill()
    wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z",
             10, "the child to become a zombie")
    assert not run_lock.pid_alive(child.pid)  # a zombie: killed, its parent has not waited yet
    # DVC (psutil) still counts it as running: status must not advise removing the lock file yet
    message = run_lock.explain_dvc_lock_error(
        f"ERROR: '/p/data/cls' is busy, it is being blocked by:\n  (PID {child.pid}): dvc repro\n", Path("."))
    assert f"pid {child.pid}: dvc repro" in message and "not yet reaped" in message
    assert "retry in a moment" in message and "do not remove" in message
    child.wait()
    assert not run_lock.pid_alive(child.pid) and not run_lock.pid_alive(dead_pid())
