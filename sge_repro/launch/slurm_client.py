"""The SLURM client commands the launcher runs (squeue, sacct, scancel): a job's state, cancelling."""

from __future__ import annotations

import getpass
import shutil
import subprocess

from sge_repro.errors import UserError
from sge_repro.launch.errors import LaunchError

LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
               "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "PREEMPTED"}
UNKNOWN = "UNKNOWN"  # neither squeue nor sacct knows the job (purged, or no accounting)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


# --- talking to SLURM --------------------------------------------------------------------------


def require_slurm_commands() -> None:
    missing = [command for command in ("sbatch", "squeue", "scancel", "scontrol") if shutil.which(command) is None]
    if missing:
        raise UserError(f"launch.launcher: slurm: {', '.join(missing)} not found on PATH; expected to run on a "
                        "SLURM login node (or set launch.launcher: local)")


def slurm_command(command: list[str]) -> str | None:
    """A SLURM client command's stdout, or None when it fails (its stderr is then in the result's place)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def job_state(job_id: str) -> str:
    """The job's state: squeue while the controller holds it, then sacct (accounting), else UNKNOWN.
    (submitit's `Job.state` asks sacct only, which knows no job where SLURM keeps no accounting.)

    If the controller cannot be reached at all, this raises rather than report the job as gone
    (which would submit a second one)."""
    try:
        done = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--states", "all", "--format", "%T"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"SLURM job {job_id}: squeue failed: {exc}") from None
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout.split()[0].upper()
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        raise LaunchError(f"SLURM job {job_id}: squeue failed: {last_line(done.stderr or done.stdout)}")
    accounted = slurm_command(["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", job_id,
                               "--format", "State"])
    if accounted and accounted.strip():
        # "CANCELLED by 0" -> CANCELLED
        return accounted.strip().splitlines()[0].split()[0].upper()
    return UNKNOWN


def cancel(job_id: str | None, job_name: str) -> None:
    """scancel the job (by id, or by this stage's job name when sbatch was interrupted before it answered)."""
    if job_id is not None:
        command = ["scancel", job_id]
    else:
        command = ["scancel", "--user", getpass.getuser(), "--name", job_name]
    subprocess.run(command, capture_output=True, timeout=60)
