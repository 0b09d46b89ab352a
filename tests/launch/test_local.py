"""sge_repro.launch: in-process for one process, torch elastic's local launcher for more, one-line
failures. Real processes, a real gloo group on 127.0.0.1."""

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

from sge_repro.errors import UserError
from sge_repro.launch import LaunchError, launch, resolve_nproc_per_node, runs_in_process
from sge_repro.params import Params, validate_params
from sge_repro.params_sections import LaunchParams

from . import targets

REPO = Path(__file__).resolve().parents[2]


def test_one_process_runs_in_this_process(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    settings = LaunchParams()
    assert runs_in_process(settings)
    unpicklable = lambda x: (os.getpid(), x)  # noqa: E731 - a lambda cannot reach another process
    assert launch(unpicklable, (7,), settings, name="t", state_dir=tmp_path / "state") == (os.getpid(), 7)
    assert not (tmp_path / "state").exists()


def test_already_inside_a_launched_world_runs_as_that_rank(monkeypatch):
    # torchrun / srun started this process as one rank: launching again would nest worlds.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert runs_in_process(LaunchParams(nproc_per_node=4))


def test_auto_is_every_visible_gpu_or_one():
    expected = torch.cuda.device_count() if torch.cuda.is_available() else 1
    assert resolve_nproc_per_node(LaunchParams(nproc_per_node="auto")) == max(expected, 1)
    assert resolve_nproc_per_node(LaunchParams(nproc_per_node=3)) == 3


def test_two_processes_join_one_group_and_rank_zero_answers(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state = tmp_path / "state"
    result = launch(targets.report_and_sum, (str(tmp_path), 10.0), LaunchParams(nproc_per_node=2),
                    name="t", state_dir=state)
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert result == {"rank": 0, "total": 21.0, "pid": seen[0]["pid"]}  # (10 + 0) + (10 + 1)
    assert seen[0]["pid"] != seen[1]["pid"] and os.getpid() not in (seen[0]["pid"], seen[1]["pid"])
    for rank, env in enumerate(seen):
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (
            str(rank), str(rank), "2", "2")
        assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    assert list(state.iterdir()) == []  # a successful launch leaves no error files behind


def test_a_worker_error_is_one_line_naming_stage_rank_and_message(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LaunchError) as caught:
        launch(targets.rank_one_raises, (str(tmp_path),), LaunchParams(nproc_per_node=2),
               name="train_cls@resnet18-0", state_dir=tmp_path / "state")
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and "\n" not in message
    assert message.startswith("train_cls@resnet18-0: rank 1 failed: params.yaml: train_cls.lr: something "
                              "rank 1 did not like; traceback: ")
    error_file = message.rsplit("traceback: ", 1)[1]
    assert error_file.startswith(str(tmp_path / "state"))
    assert "rank_one_raises" in json.loads(open(error_file).read())["message"]["extraInfo"]["py_callstack"]


def test_any_other_exception_keeps_its_type(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LaunchError, match=r"^t: rank 1 failed: KeyError: 'missing'; traceback: "):
        launch(targets.rank_one_crashes, (str(tmp_path),), LaunchParams(nproc_per_node=2), name="t",
               state_dir=tmp_path / "state")


def test_the_rank_whose_error_caused_the_others_is_named(tmp_path, monkeypatch):
    # Rank 0 fails on the connection rank 1 closed and exits first: torch elastic reports rank 0.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LaunchError) as caught:
        launch(targets.rank_one_raises_and_exits_last, (str(tmp_path),), LaunchParams(nproc_per_node=2), name="t",
               state_dir=tmp_path / "state")
    message = str(caught.value)
    assert re.match(r"t: rank 1 failed: ValueError: the data is not there; traceback: ", message), message
    error_file = Path(message.rsplit("traceback: ", 1)[1])
    traceback = json.loads(error_file.read_text())["message"]["extraInfo"]["py_callstack"]
    assert "rank_one_raises_and_exits_last" in traceback


def test_a_killed_worker_fails_the_launch_instead_of_hanging_it(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LaunchError, match=r"^t: rank 1 failed: killed by signal 9 \(SIGKILL\)$"):
        launch(targets.rank_one_is_killed, (str(tmp_path),), LaunchParams(nproc_per_node=2), name="t",
               state_dir=tmp_path / "state")


def test_a_worker_that_fails_before_the_target_runs_is_named_with_where_to_look(tmp_path, monkeypatch, capfd):
    """The target's module exists here but not for the spawned workers: they fail while unpickling
    it, before any error file is written; the line says so instead of torch's placeholder."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    module = tmp_path / "vanishing_target.py"
    module.write_text("def target():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing_target

    monkeypatch.setitem(sys.modules, "vanishing_target", vanishing_target)   # removed again after the test
    module.unlink()
    shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
    with pytest.raises(LaunchError) as caught:
        launch(vanishing_target.target, (), LaunchParams(nproc_per_node=2), name="t", state_dir=tmp_path / "state")
    message = str(caught.value)
    assert re.fullmatch(r"t: rank [01] failed: exited with code 1 without recording an error: it failed outside "
                        r"the stage's code \(e\.g\. while starting: importing or unpickling the target\); its "
                        r"traceback is in the output above", message), message
    assert "To enable traceback" not in message
    assert "No module named 'vanishing_target'" in capfd.readouterr().err   # the traceback is there


@pytest.mark.parametrize("launch_section, expected", [
    ({"nproc_per_node": "eight"}, "launch.nproc_per_node: expected an int >= 1 or 'auto', got 'eight'"),
    ({"nproc_per_node": 0}, "launch.nproc_per_node: expected an int >= 1 or 'auto', got 0"),
    ({"nproc_per_node": True}, "launch.nproc_per_node: expected an int >= 1 or 'auto', got True"),
    ({"nodes": 2}, "launch: nodes=2: more than one node needs launcher: slurm (got launcher: local)"),
    ({"launcher": "mpi"}, "launch.launcher"),
])
def test_launch_settings_are_validated(launch_section, expected):
    raw = Params().model_dump(mode="json")
    raw["launch"].update(launch_section)
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        validate_params(raw)


INTERRUPTED_LAUNCH = """
import sys
from pathlib import Path
from sge_repro.errors import UserError
from sge_repro.launch import launch
from sge_repro.params import LaunchParams
from launch import targets
try:
    launch(targets.sleep_and_record, (sys.argv[1],), LaunchParams(nproc_per_node=2), name="t",
           state_dir=Path(sys.argv[1]) / "state")
except UserError as exc:
    print(type(exc).__name__, exc, file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def test_ctrl_c_stops_the_workers_and_says_so_in_one_line(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "WORLD_SIZE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    process = subprocess.Popen([sys.executable, "-c", INTERRUPTED_LAUNCH, str(tmp_path)], env=env,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((tmp_path / "pid0").exists() and (tmp_path / "pid1").exists()):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        workers = [int((tmp_path / f"pid{rank}").read_text()) for rank in (0, 1)]
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 2
    assert stderr.strip().splitlines()[-1] == (
        "LaunchError t: interrupted by SIGINT; the workers were stopped (rerun to resume from the last checkpoint)")
    time.sleep(1)
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_launch_leaves_this_processs_signal_handlers_as_they_were(tmp_path, monkeypatch):
    # torch elastic replaces them with handlers that raise SignalException; left in place, Ctrl-C
    # would no longer be KeyboardInterrupt and a pool worker forked later would catch SIGTERM
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    launch(targets.report_and_sum, (str(tmp_path), 1.0), LaunchParams(nproc_per_node=2), name="t",
           state_dir=tmp_path / "state")
    assert {sig: signal.getsignal(sig) for sig in before} == before
