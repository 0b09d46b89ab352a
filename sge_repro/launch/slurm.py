"""The SLURM backend of `sge_repro.launch`: one submitit job of nodes x tasks per node per stage.

The head process submits the job, streams the tasks' logs and returns rank 0's result. Each task
exports the env:// variables from SLURM's and calls the target, which joins the process group
itself; the task destroys that group once the target has returned (an exiting gloo group may abort
the task). Assumes the repository, its data and `state_dir` are on a filesystem shared by the head
and the nodes (the job runs in the head's working directory, with its Python and environment).

State: `state_dir/slurm_job.json` ({"job_id", "job_name", "fingerprint", "ntasks", ...}, written
atomically right after sbatch returns) and submitit's folder `state_dir/submitit/`. The
fingerprint covers what is computed, not how it is launched, so a rerun re-attaches to a pending or
running job or collects a finished one (adopting a live job of this stage's name when the head died
before the record), submits anew after a failed, cancelled or timed-out job (the stage resumes from
what that job saved), and refuses (exit 2) while a job for different arguments is still live: it
would write the same outputs. Ctrl-C in the head cancels the job. A failed task ends the job
(`srun --kill-on-bad-exit`) and the head raises LaunchError naming the task whose error caused the
others' (`sge_repro.launch.errors.root_cause`) and its own error line.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import pickle
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import cloudpickle
import submitit
from pydantic import BaseModel

from sge_repro import atomic
from sge_repro.errors import UserError
from sge_repro.launch.errors import LaunchError, RankFailure, root_cause
from sge_repro.launch.slurm_client import (LIVE_STATES, UNKNOWN, cancel, job_state, last_line, require_slurm_commands,
                                          slurm_command)
from sge_repro.params_sections import LaunchParams

RECORD_FILE = "slurm_job.json"
LOG_POLL_S = 1.0  # how often the logs and result files are looked at (a stat each)
STATE_POLL_S = (2.0, 30.0)  # squeue every 2 s at first, backing off to every 30 s
RESULT_GRACE_S = 30.0  # how long a COMPLETED job's result files may take to appear (NFS attribute caches)


def run(target: Callable[..., Any], args: tuple, settings: LaunchParams, *, name: str, state_dir: Path) -> Any:
    """Run `target(*args)` on every task of one SLURM job; rank 0's return value."""
    tasks_per_node = _tasks_per_node(settings)
    require_slurm_commands()
    state_dir = Path(state_dir).absolute()
    folder = state_dir / "submitit"
    fingerprint = submission_fingerprint(target, args)
    job_name = _job_name(name, fingerprint)
    job_id: str | None = None
    try:
        record = _attachable_job(state_dir, fingerprint, job_name, name)
        if record is None:
            job_id = _submit(target, args, settings, tasks_per_node, folder, job_name)
            record = {"job_id": job_id, "job_name": job_name, "fingerprint": fingerprint,
                      "ntasks": settings.nodes * tasks_per_node, "folder": str(folder), "stage": name,
                      "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic.write_json(state_dir / RECORD_FILE, record)
            _say(f"{name}: submitted SLURM job {job_id} ({settings.nodes} node(s) x {tasks_per_node} task(s)); "
                 f"logs in {folder}")
        job_id = record["job_id"]
        return _follow(record, name)
    except KeyboardInterrupt:
        cancel(job_id, job_name)
        _say(f"cancelled SLURM job {job_id or job_name}")
        raise


# --- what is submitted -------------------------------------------------------------------------


def _tasks_per_node(settings: LaunchParams) -> int:
    if settings.nproc_per_node == "auto":
        raise UserError("params.yaml: launch.nproc_per_node: auto cannot be resolved for launcher slurm (this "
                        "host cannot see the compute nodes' GPUs); expected the number of GPUs per node, e.g. 8")
    return settings.nproc_per_node


def _canonical(value: Any) -> Any:
    """A JSON-able form of an argument that is the same in every process for equal values
    (pickle bytes are not: pydantic keeps a set of field names, whose order varies by process)."""
    if isinstance(value, BaseModel):
        # how the job is launched (params.launch: nodes, tasks, time limit, partition) is not what it computes
        launch = {name for name in type(value).model_fields if isinstance(getattr(value, name), LaunchParams)}
        return {"model": f"{type(value).__module__}.{type(value).__qualname__}",
                **value.model_dump(mode="json", exclude=launch)}
    if isinstance(value, os.PathLike):
        return {"path": os.fspath(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _canonical(item) for key, item in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    described = repr(value)
    if " at 0x" in described:   # object.__repr__: a memory address, different in every process
        raise TypeError(f"{type(value).__qualname__}: its repr names a memory address ({described}); a launch "
                        "argument needs a repr that is equal for equal values (e.g. a frozen dataclass)")
    return {"repr": described}


def submission_fingerprint(target: Callable[..., Any], args: tuple) -> str:
    """sha256 of what the job computes: the target, its arguments (launch settings left out) and
    the working directory."""
    described = {"target": f"{target.__module__}.{target.__qualname__}", "args": _canonical(list(args)),
                 "cwd": os.getcwd()}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _job_name(name: str, fingerprint: str) -> str:
    return f"sge-{re.sub(r'[^A-Za-z0-9_.@+-]', '_', name)}-{fingerprint[:12]}"


def memory_mb(amount: str) -> int:
    """SLURM's memory notation ("64G", "500M", "2048" = MB) in MB."""
    match = re.fullmatch(r"([1-9][0-9]*)([KMGT]?)", amount)
    if match is None:
        raise UserError(f"params.yaml: launch.slurm.mem_per_task: {amount!r}: expected a number with K, M, G or T")
    number, unit = int(match.group(1)), match.group(2) or "M"
    return max(1, number * {"K": 1, "M": 1024, "G": 1024 ** 2, "T": 1024 ** 3}[unit] // 1024)


def _uses_cuda(args: tuple) -> bool:
    """Whether the stage trains on CUDA: an argument (or a params section in it) has a `device`
    naming CUDA (train_cls.device, train_det.device). Then each task gets one GPU."""
    def devices(value: Any, depth: int = 0):
        device = getattr(value, "device", None)
        if isinstance(device, str):
            yield device
        if depth < 2 and hasattr(type(value), "model_fields"):
            for field in type(value).model_fields:
                yield from devices(getattr(value, field), depth + 1)
    return any(device.startswith("cuda") for arg in args for device in devices(arg))


def sbatch_parameters(settings: LaunchParams, tasks_per_node: int, cuda: bool, job_name: str) -> dict:
    """submitit SlurmExecutor parameters for one job of nodes x tasks_per_node tasks."""
    slurm = settings.slurm
    extra: dict[str, Any] = {"time": slurm.time_limit}
    for option in slurm.extra_options:
        key, has_value, value = option[2:].partition("=")
        extra[key] = value if has_value else True
    parameters = {
        "job_name": job_name, "nodes": settings.nodes, "ntasks_per_node": tasks_per_node,
        "cpus_per_task": slurm.cpus_per_task, "mem": f"{memory_mb(slurm.mem_per_task) * tasks_per_node}M",
        # A task that fails ends the job at once (its peers would wait in a collective until gloo /
        # NCCL time out).
        "srun_args": ["--kill-on-bad-exit=1"], "additional_parameters": extra,
    }
    if cuda:
        # One GPU per task. Every task sees its node's GPUs and takes cuda:LOCAL_RANK, as under
        # torchrun (join_process_group / rank_device), so they are requested per node.
        parameters["gpus_per_node"] = tasks_per_node
    if slurm.partition:
        parameters["partition"] = slurm.partition
    if slurm.account:
        parameters["account"] = slurm.account
    return parameters


def _submit(target, args, settings: LaunchParams, tasks_per_node: int, folder: Path, job_name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    executor.update_parameters(**sbatch_parameters(settings, tasks_per_node, _uses_cuda(args), job_name))
    # The call travels pickled: unpickled in the task only after the env:// variables are set, so
    # modules that read RANK at import (sge_repro.cli.ui) see the task's rank.
    payload = cloudpickle.dumps((target, args))
    try:
        job = executor.submit(task_main, payload)
    except Exception as exc:  # sbatch refused the job: its own message
        detail = str(exc).strip().splitlines()
        raise LaunchError(f"{job_name}: sbatch refused the job: {detail[-1] if detail else exc}") from None
    return str(job.job_id)


def task_main(payload: bytes) -> Any:
    """One SLURM task: env:// variables from SLURM's, then the target."""
    from sge_repro.distributed import leave_process_group  # torch: imported in the task, not the head

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    target, args = pickle.loads(payload)
    result = target(*args)
    leave_process_group()
    return result


# --- attaching to a recorded job ---------------------------------------------------------------


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable SLURM job record ({exc}); expected the JSON this launcher "
                        "writes. Remove it after checking `squeue --me` for a job of this stage") from None
    if not isinstance(record, dict) or not {"job_id", "fingerprint", "ntasks", "folder"} <= set(record):
        raise UserError(f"{path}: not a SLURM job record (expected job_id, fingerprint, ntasks, folder). Remove it "
                        "after checking `squeue --me` for a job of this stage")
    return record


def _attachable_job(state_dir: Path, fingerprint: str, job_name: str, name: str) -> dict | None:
    """The recorded (or orphaned) job to follow instead of submitting, or None to submit."""
    record = _read_record(state_dir / RECORD_FILE)
    if record is None:
        return _orphaned_job(state_dir, fingerprint, job_name, name)
    job_id = str(record["job_id"])
    state = job_state(job_id)
    if record["fingerprint"] != fingerprint:
        if state in LIVE_STATES:
            raise UserError(f"{name}: SLURM job {job_id} (recorded in {state_dir / RECORD_FILE}) was submitted "
                            f"for other params and is still {state}; it would write this stage's outputs. "
                            f"`scancel {job_id}` (or wait for it) and rerun")
        return None
    if state in LIVE_STATES:
        _say(f"{name}: re-attaching to SLURM job {job_id} ({state}), submitted {record.get('submitted', '?')}")
        return record
    outcomes = _outcomes(_job(record))
    if all(outcome is not None and outcome[0] == "success" for outcome in outcomes):
        _say(f"{name}: SLURM job {job_id} already finished ({state}); collecting its result")
        return record
    _say(f"{name}: the earlier SLURM job {job_id} ended {state} without a result; submitting a new job "
         "(the stage resumes from what that job saved)")
    return None


def _orphaned_job(state_dir: Path, fingerprint: str, job_name: str, name: str) -> dict | None:
    """A live job of this stage's name with no record (the head died between sbatch and the record)."""
    listed = slurm_command(["squeue", "--noheader", "--user", getpass.getuser(), "--name", job_name, "--format", "%i %T"])
    if listed is None:
        return None
    jobs = sorted((line.split() for line in listed.splitlines() if line.strip()), key=lambda job: int(job[0]))
    jobs = [job for job in jobs if job[1] in LIVE_STATES]
    if not jobs:
        return None
    job_id = jobs[0][0]
    shown = slurm_command(["scontrol", "show", "job", "--oneliner", job_id]) or ""
    ntasks = re.search(r"\bNumTasks=(\d+)", shown)
    if ntasks is None:
        return None
    record = {"job_id": job_id, "job_name": job_name, "fingerprint": fingerprint, "ntasks": int(ntasks.group(1)),
              "folder": str(state_dir / "submitit"), "stage": name, "submitted": "?"}
    atomic.write_json(state_dir / RECORD_FILE, record)
    _say(f"{name}: adopting SLURM job {job_id} ({jobs[0][1]}), submitted for this stage but never recorded")
    return record


# --- following a job ---------------------------------------------------------------------------


class LogTail:
    """Copies what is appended to a file onto a stream, whole lines at a time, each with a prefix."""

    def __init__(self, path: Path, stream: TextIO, prefix: str = ""):
        self.path, self.stream, self.prefix = path, stream, prefix
        self.offset = 0
        self.partial = b""

    def pump(self, final: bool = False) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size > self.offset:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(size - self.offset)
            self.offset += len(data)
            lines = (self.partial + data).split(b"\n")
            self.partial = lines.pop()
            self._write(lines)
        if final and self.partial:
            self._write([self.partial])
            self.partial = b""

    def _write(self, lines: list[bytes]) -> None:
        for line in lines:
            self.stream.write(self.prefix + line.decode("utf-8", "replace").rstrip("\r") + "\n")
        self.stream.flush()


def _job(record: dict) -> submitit.SlurmJob:
    """submitit's handle on a recorded job: each task's log and result files, outcome, scancel."""
    return submitit.SlurmJob(record["folder"], str(record["job_id"]), tasks=range(int(record["ntasks"])))


def _outcomes(job: submitit.SlurmJob, known: list | None = None) -> list[tuple[str, Any] | None]:
    """Each task's ("success", value) / ("error", traceback), or None while it has none (`known`:
    outcomes read before, not read again). submitit writes a result file under a temp name and
    renames it: a present file is complete, and reading it does not wait."""
    outcomes = list(known) if known is not None else [None] * job.num_tasks
    for rank, outcome in enumerate(outcomes):
        task = job.task(rank)
        if outcome is None and task.paths.result_pickle.exists():
            error = task.exception()
            outcomes[rank] = ("success", task.result()) if error is None else ("error", _traceback(error))
    return outcomes


def _traceback(error: Exception) -> str:
    """The task's own traceback out of submitit's FailedJobError, which frames it between two
    lines of dashes and follows it with where the logs are."""
    parts = re.split(r"^-{10,}$", str(error), flags=re.MULTILINE)
    return parts[1].strip() if len(parts) >= 3 else str(error)


def _follow(record: dict, name: str) -> Any:
    """Stream the job's logs until every task has a result, one has failed, or the job has ended;
    rank 0's result."""
    job = _job(record)
    job_id, ntasks, folder = job.job_id, job.num_tasks, Path(record["folder"])
    tails = []
    for task in range(ntasks):
        paths = job.task(task).paths
        prefix = f"[rank {task}] " if ntasks > 1 else ""
        tails += [LogTail(paths.stdout, sys.stdout, prefix), LogTail(paths.stderr, sys.stderr, prefix)]
    state, state_poll, next_state_check, completed_at = UNKNOWN, STATE_POLL_S[0], 0.0, None
    outcomes: list = [None] * ntasks
    failed_at = None
    while True:
        for tail in tails:
            tail.pump()
        outcomes = _outcomes(job, outcomes)
        failures = _failures(job, outcomes)
        if all(outcomes) or any(not failure.lost_a_peer for failure in failures):
            break
        if failures:
            # Only ranks that lost a peer so far: the peer's own error follows (its result file), or
            # the job ends without it (killed, say). Watched at every poll from now on.
            failed_at = failed_at or time.monotonic()
            if time.monotonic() - failed_at > RESULT_GRACE_S:
                break
            next_state_check = 0.0
        if time.monotonic() >= next_state_check:
            next_state_check = time.monotonic() + state_poll
            state_poll = min(state_poll * 1.5, STATE_POLL_S[1])
            try:
                state = job_state(job_id)
            except LaunchError as exc:  # the controller is restarting, say: the job itself goes on
                _say(f"{name}: {exc}; retrying")
            else:
                if state == "COMPLETED":
                    # A shared filesystem may show the last result files a little later.
                    completed_at = completed_at or time.monotonic()
                    next_state_check = time.monotonic() + LOG_POLL_S
                    if time.monotonic() - completed_at > RESULT_GRACE_S:
                        break
                elif state not in LIVE_STATES:
                    outcomes = _outcomes(job, outcomes)
                    break
        time.sleep(LOG_POLL_S)
    failures = _failures(job, outcomes)
    if failures and state in LIVE_STATES | {UNKNOWN}:
        job.cancel(check=False)  # its peers may be waiting for it in a collective
    for tail in tails:
        tail.pump(final=True)
    missing = [task for task, outcome in enumerate(outcomes) if outcome is None]
    if failures:
        failed = root_cause(failures)
        message = (f"{name}: SLURM job {job_id} failed on rank {failed.rank}: {last_line(failed.message)} "
                   f"(log: {job.task(failed.rank).paths.stderr})")
        if failed.lost_a_peer and missing:
            # The peer it lost died without an error of its own (a signal, the OOM killer).
            message += f"; no result from rank(s) {', '.join(map(str, missing))} (logs in {folder})"
        raise LaunchError(message)
    if missing:
        # Ended without a result: cancelled, timed out, out of memory, node failure.
        task = missing[0]
        stderr = job.task(task).paths.stderr
        error = _last_error_line(stderr)
        raise LaunchError(f"{name}: SLURM job {job_id} ended {state} without a result from rank {task}"
                          + (f": {error}" if error else "") + f" (log: {stderr})")
    if state in LIVE_STATES | {UNKNOWN}:
        _wait_until_ended(job_id)  # the tasks are exiting: the stage ends with its job (and its allocation)
    return outcomes[0][1]


def _failures(job: submitit.SlurmJob, outcomes: list) -> list[RankFailure]:
    """The tasks that failed: their tracebacks, timed by their result files (written when the
    exception reached submitit; on a shared filesystem the server's clock times them all)."""
    failures = []
    for task, outcome in enumerate(outcomes):
        if outcome is not None and outcome[0] == "error":
            try:
                written = job.task(task).paths.result_pickle.stat().st_mtime
            except OSError:
                written = None
            failures.append(RankFailure(task, str(outcome[1]), written))
    return failures


def _wait_until_ended(job_id: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        while job_state(job_id) in LIVE_STATES and time.monotonic() < deadline:
            time.sleep(LOG_POLL_S)
    except LaunchError:
        pass  # every task has delivered its result: nothing is lost by not waiting


def _last_error_line(path: Path) -> str:
    """The job's own last word in a task's stderr: slurmstepd's "*** JOB ... CANCELLED / DUE TO TIME
    LIMIT ***" line, else the last line that reads like an error, else the last line."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except FileNotFoundError:
        return ""
    lines = [line for line in lines if line]
    verdicts = [line for line in lines if re.search(r"\*\*\* (JOB|STEP) .*\*\*\*", line)]
    errors = [line for line in lines if re.search(r"error|Error|Killed|oom|OOM", line)]
    return (verdicts or errors or lines or [""])[-1]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
