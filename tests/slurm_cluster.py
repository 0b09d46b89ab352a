"""A real single-host SLURM cluster for the tests: munged, slurmctld and slurmd on this machine.

Debian's `slurm-wlm` + `munge` (`.ci/run` installs them). Everything lives in a temp folder: a
private munge key and socket, slurm.conf with free ports, state and logs, so it touches nothing of
the host's (no /etc/slurm, no system munged) and needs no systemd or cgroups (proctrack/linuxproc,
task/none). Clients (sbatch, squeue, submitit) find it through SLURM_CONF, set for the session.

Accounting: Debian's 22.05 has no file-based accounting storage (only slurmdbd + MySQL), so this
cluster runs `accounting_storage/none` plus the job completion log `jobcomp/filetxt`: `sacct
--completion` lists every job that ended (`finished_jobs`), and squeue every job still held.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

INSTALL = "apt-get install -y --no-install-recommends slurm-wlm munge"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "sacct")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _sbin(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


class SlurmCluster:
    """One node (this host) in partition `debug`; start() waits until the node is idle."""

    partition = "debug"

    def __init__(self, root: Path):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.processes: list[subprocess.Popen] = []

    @staticmethod
    def missing_commands() -> list[str]:
        return [name for name in DAEMONS + CLIENTS if _sbin(name) is None]

    def write_config(self) -> None:
        root, user = self.root, _user()
        for folder in ("munge", "state", "spool", "log"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o755)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self.socket = root / "munge" / "munge.sock"
        self.conf.write_text(f"""\
ClusterName=sgetest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=600
KillWait=5
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_memory_mb() - 512} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout_s: float = 60) -> None:
        self.write_config()
        root = self.root
        munged = [_sbin("munged"), "--foreground", f"--socket={self.socket}",
                  f"--key-file={root}/munge/munge.key", f"--log-file={root}/munge/munged.log",
                  f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed",
                  # Without it munged refuses root, and a socket below pytest's private (0700) temp folder.
                  "--force"]
        self._spawn(munged, "munged")
        self._wait(lambda: self.socket.exists(), timeout_s, "munged's socket")
        self._spawn([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn([_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], "slurmd")
        self._wait(lambda: self.node_state() == "idle", timeout_s, f"node {self.node} idle in sinfo")

    def _spawn(self, command: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.console", "wb")
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True))
        log.close()

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        raise RuntimeError(f"test SLURM cluster: no {what} within {timeout_s:.0f} s (exited: {dead or 'none'}); "
                           f"logs:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str) -> str:
        return subprocess.run(command, capture_output=True, text=True, check=True, env=self.env(),
                              timeout=60).stdout

    def node_state(self) -> str:
        try:
            return self.run("sinfo", "--noheader", "--nodes", self.node, "--format", "%T").strip()
        except subprocess.SubprocessError:
            return ""

    def job_state(self, job_id: str) -> str:
        """The job's state as the controller holds it (jobs stay MinJobAge = 600 s after they end)."""
        return self.run("squeue", "--noheader", "--jobs", job_id, "--states", "all", "--format", "%T").strip()

    def jobs_named(self, name: str) -> list[str]:
        """Ids of every job of that name the controller holds (pending, running or ended)."""
        listed = self.run("squeue", "--noheader", "--states", "all", "--name", name, "--format", "%i")
        return listed.split()

    def finished_jobs(self, name: str | None = None) -> list[tuple[str, str, str]]:
        """(id, name, state) of every ended job, from the job completion log through `sacct --completion`."""
        listed = self.run("sacct", "--completion", "--noheader", "--parsable2", "--format", "JobID,JobName,State")
        rows = [tuple(line.split("|")[:3]) for line in listed.splitlines() if line.strip()]
        return [row for row in rows if name is None or row[1] == name]

    def wait_for_state(self, job_id: str, states: set[str], timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job_id}: state {state!r} after {timeout_s} s, expected one of {states}")

    def stop(self) -> None:
        # Any job left over first, then the daemons we started (by their pids), newest first.
        subprocess.run(["scancel", "--user", _user()], env=self.env(), capture_output=True, timeout=60)
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def _user() -> str:
    import getpass

    return getpass.getuser()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running single-host SLURM cluster; SLURM_CONF and PYTHONPATH (the repo and tests/, for
    the jobs' imports: the 'shared filesystem') are set for the session."""
    missing = SlurmCluster.missing_commands()
    if missing:
        pytest.fail(f"the SLURM tests need {', '.join(missing)}: install them with `{INSTALL}` (as root)",
                    pytrace=False)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    repo = Path(__file__).resolve().parents[1]
    saved = {key: os.environ.get(key) for key in ("SLURM_CONF", "PYTHONPATH")}
    os.environ["SLURM_CONF"] = str(cluster.conf)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(repo), str(repo / "tests")] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
