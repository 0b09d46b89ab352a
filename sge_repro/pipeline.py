"""Driving DVC: apply a profile to params.yaml, list stages, run `dvc repro`, read status.

The CLI's `run` and `status` commands are views over these functions. A run writes params.yaml
and its log only while it holds the run lock (`sge_repro.run_lock`). DVC is run as a
subprocess of this interpreter (`python -m dvc`), with this environment's bin/ first on PATH
so that every stage's `sge-repro ...` command resolves to this installation.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from sge_repro import atomic, run_lock
from sge_repro.errors import UserError
from sge_repro.params import PARAMS_FILE, validate_params
from sge_repro.params_yaml import dump_params, load_params, profile_params, read_yaml, set_values
from sge_repro.paths import ProjectPaths

LOG_FILE = Path("logs") / "dvc-repro.log"  # opened (truncated) only by the holder of the run lock


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def dvc(*args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], capture_output=True, text=True, env=stage_env(), cwd=cwd
    )
    if check and result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        explained = run_lock.explain_dvc_lock_error(output, cwd or Path("."))
        if explained:
            raise UserError(explained)
        message = output.splitlines()
        raise UserError(f"dvc {' '.join(args)} failed: {message[-1] if message else result.returncode}")
    return result


def require_dvc_project(root: Path = Path(".")) -> None:
    """An sge-repro project that this user can write: DVC writes its locks in .dvc/tmp/ for every
    command, `status` included (on a read-only project it would fail with its own advice)."""
    if not (root / "dvc.yaml").exists() or not (root / ".dvc").is_dir():
        raise UserError(f"{root.resolve()}: not an sge-repro project (expected dvc.yaml and .dvc/ here)")
    scratch = root / ".dvc" / "tmp"
    try:
        scratch.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=scratch):
            pass
    except OSError as error:
        failure = atomic.write_failure(error, scratch / "(a lock file)")
        if failure is None:
            raise
        raise failure from error


def apply_profile(name: str | None, params_file: Path = PARAMS_FILE) -> tuple[str, bool]:
    """Rewrite params.yaml as defaults + the profile overlay; returns (profile, changed).

    Without a name, params.yaml is validated and used as it is (the user's edits count). An
    unchanged file is not rewritten, so DVC sees nothing new.
    """
    if name is None:
        return load_params(params_file).profile, False
    text = dump_params(profile_params(name))
    if params_file.exists() and params_file.read_bytes() == text.encode("utf-8"):
        return name, False
    atomic.write_text(params_file, text)
    return name, True


def prepare_run(profile: str | None, targets: list[str], params_file: Path = PARAMS_FILE) -> tuple[str, bool, list[str]]:
    """Apply the profile and check the targets against the stages it expands to: (profile, changed, stages).

    A target that does not exist under the new params leaves params.yaml as it was: the stage list
    depends on params.yaml (matrix over models / seeds ...), so it is written first and put back.
    """
    before = params_file.read_bytes() if params_file.exists() else None
    name, changed = apply_profile(profile, params_file)
    try:
        check_runnable(load_params(params_file), params_file.parent)
        stages = list_stages()
        for target in targets:
            resolve_target(target, stages)
    except UserError:
        if changed and before is not None:
            atomic.write_bytes(params_file, before)
        raise
    return name, changed, stages


def check_runnable(params, root: Path) -> None:
    """What params.yaml names outside itself, checked before any stage runs (a stage failing on it
    would come after the stages before it, with DVC's earlier outputs of it already removed): the
    given checkpoint files exist, and a GPU named for a stage run here is on this machine (a SLURM
    run's GPUs are on the nodes the job gets)."""
    files = [(f"released.{name}", path) for name, path in params.released.items()]
    files += [(f"convert.files.{name}", path) for name, path in params.convert.files.items()]
    for key, path in files:
        if not (root / path).is_file():
            raise UserError(f"params.yaml: {key}: {path}: file not found (relative to {root.resolve()})")
    sections = {"train_cls": params.train_cls.device, "eval_cls": params.eval_cls.device,
                "train_det": params.train_det.device, "eval_det": params.eval_det.device}
    wanted = {key: device for key, device in sections.items() if device.startswith("cuda")}
    if params.launch.launcher == "slurm":
        wanted = {key: device for key, device in wanted.items() if key not in ("train_cls", "train_det")}
    if wanted:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for key, device in wanted.items():
            index = int(device.partition(":")[2] or 0)
            if index >= count:
                raise UserError(f"params.yaml: {key}.device: {device!r}, but this machine has "
                                f"{count or 'no'} CUDA device{'s' if count != 1 else ''}; expected 'cpu'"
                                + (f" or cuda:0..{count - 1}" if count else ""))


def run_experiment(assignments: list[str], targets: list[str], queue: bool = False, name: str | None = None,
                   params_file: Path = PARAMS_FILE, temp: bool = False) -> int:
    """`dvc exp run [--queue | --temp] [--name NAME] [TARGETS]` with params.yaml set by `assignments`
    (KEY=VALUE) and the keys sge-repro derives brought up to date; returns DVC's exit code.

    As `dvc exp run -S`, with the file validated and the given files checked before DVC starts
    (bad input: UserError, file untouched), not at the first stage that reads them.
    A queued experiment (and one run in a temporary copy, `temp`) takes the workspace's params.yaml
    with it; the file is put back afterwards, so the next one starts from the same baseline.
    Otherwise, as `dvc exp run -S`, the workspace keeps the experiment's params and results."""
    require_dvc_project()
    run_lock.refuse_if_busy()
    before = params_file.read_bytes()
    params = validate_params(set_values(read_yaml(params_file), assignments),
                             f"{params_file} (with -S)" if assignments else str(params_file))
    check_runnable(params, params_file.parent)
    atomic.write_text(params_file, dump_params(params))
    command = [sys.executable, "-m", "dvc", "exp", "run", *(["--queue"] if queue else []),
               *(["--temp"] if temp else []), *(["--name", name] if name else []), *targets]
    try:
        return subprocess.run(command, env=stage_env(), cwd=params_file.parent).returncode
    finally:
        if queue or temp:
            atomic.write_bytes(params_file, before)


def list_stages() -> list[str]:
    """Every stage name after foreach/matrix expansion, in dvc.yaml order."""
    return dvc("stage", "list", "--name-only").stdout.split()


def manifest_dependents(dvc_file: Path = Path("dvc.yaml")) -> dict[str, set[str]]:
    """{dataset ("cls", "det"): the stage groups of dvc.yaml that depend on its manifest}."""
    stages = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("stages", {})
    manifests = ProjectPaths(Path("."))
    return {name: {group for group, stage in stages.items()
                   if manifests.manifest(name).as_posix() in [str(dep) for dep in stage.get("deps", [])]}
            for name in ("cls", "det")}


def stage_groups(stages: list[str]) -> list[str]:
    return sorted({s.split("@", 1)[0] for s in stages})


def resolve_target(target: str, stages: list[str]) -> str:
    if target in stages or target in stage_groups(stages):
        return target
    allowed = ", ".join(stage_groups(stages) + [s for s in stages if "@" in s][:6])
    raise UserError(f"unknown stage {target!r} (allowed: {allowed}, ...)")


def stale_stages() -> dict[str, list]:
    """Stages whose deps / params / outs changed since their last run (`dvc status`)."""
    out = dvc("status", "--json").stdout.strip()
    try:
        status = json.loads(out or "{}")
    except json.JSONDecodeError:
        raise UserError(f"dvc status: unexpected output {out[:80]!r}") from None
    # `dvc status --json` prefixes stage names with "dvc.yaml:" in some versions.
    return {key.split(":", 1)[-1]: value for key, value in status.items()}


@dataclass
class StageEvent:
    stage: str
    state: str  # running | skipped | restored | done | failed
    at: float = field(default_factory=time.monotonic)


_RUNNING = re.compile(r"^Running stage '([^']+)'")
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping")
_RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run")


def repro(
    targets: list[str],
    force: bool = False,
    on_event: Callable[[StageEvent], None] = lambda event: None,
    on_line: Callable[[str], None] = lambda line: None,
    log_path: Path = LOG_FILE,
) -> int:
    """Run `dvc repro`, reporting stage transitions; returns DVC's exit code.

    The caller holds the run lock (`run_lock.hold`): the log is truncated here.
    """
    args = [sys.executable, "-m", "dvc", "repro", *(["--force"] if force else []), *targets]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    running: str | None = None
    log_failed: OSError | None = None
    log = open(log_path, "w", encoding="utf-8")
    process = None
    try:
        process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=stage_env(), bufsize=1
        )
        assert process.stdout is not None
        for line in (raw.rstrip("\n") for raw in process.stdout):
            if log_failed is None:
                try:
                    log.write(line + "\n")
                    log.flush()
                except OSError as error:  # e.g. a full disk: DVC's output is still followed to its end
                    log_failed = error
            on_line(line)
            for pattern, state in ((_RUNNING, "running"), (_SKIPPED, "skipped"), (_RESTORED, "restored")):
                match = pattern.match(line)
                if match:
                    if running is not None:
                        on_event(StageEvent(running, "done"))
                        running = None
                    on_event(StageEvent(match.group(1), state))
                    if state == "running":
                        running = match.group(1)
        code = process.wait()
    except BaseException:  # Ctrl-C (or an error here): DVC must end before the run lock is released
        _stop(process)
        raise
    finally:
        try:
            log.close()
        except OSError as error:  # what it still buffered did not fit either
            log_failed = log_failed or error
    if running is not None:
        on_event(StageEvent(running, "done" if code == 0 else "failed"))
    if log_failed is not None:
        raise atomic.write_failure(log_failed, log_path) or log_failed
    return code


# DVC's line for an output it could not copy into its cache: it still records the stage in
# dvc.lock (the stage looks done, its cache entry is missing) and leaves a temp file in the cache
_CACHE_FAILURE = re.compile(r"ERROR: failed to transfer '[0-9a-f.]+' - \[Errno \d+\] ([^:]+):?\s*'?([^']*)'?")
CACHE_DIR = Path(".dvc") / "cache"


def cache_failure(lines: list[str], root: Path = Path(".")) -> UserError | None:
    """The one-line error for outputs `dvc repro` could not copy into its cache (None if none); the
    temp files DVC left in the cache are removed (call it after DVC exited, holding the run lock)."""
    found = [match for line in lines if (match := _CACHE_FAILURE.search(line))]
    if not found:
        return None
    for leftover in (root / CACHE_DIR).glob("files/*/*/.*.tmp"):
        leftover.unlink(missing_ok=True)
    reason, path = found[0].group(1).strip(), found[0].group(2).strip()
    where = (str(Path(path).relative_to(root.resolve())) if Path(path).is_relative_to(root.resolve()) else path) \
        if path else "an output"
    more = f" (and {len(found) - 1} more file(s))" if len(found) > 1 else ""
    return UserError(f"{CACHE_DIR}: DVC could not copy {where}{more} into it ({reason.lower()}), yet recorded its "
                     "stage in dvc.lock; free space, run `dvc commit -f` (it caches what dvc.lock records), then rerun")
# How long `dvc repro` gets to stop its stage after Ctrl-C (a training stage writes its checkpoint)
STOP_GRACE_S = 60


def _stop(process: subprocess.Popen | None) -> None:
    """Interrupt `dvc repro` (a Ctrl-C at a terminal reached it already; a SIGINT sent to this
    process alone did not) and wait until it has exited, so the next run does not find it still
    holding DVC's locks; terminate / kill it if it does not stop in time."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    for stop, grace in ((lambda: None, STOP_GRACE_S), (process.terminate, 10), (process.kill, None)):
        stop()
        try:
            process.communicate(timeout=grace)  # reads what it still prints: a full pipe would block it
            return
        except subprocess.TimeoutExpired:
            continue
