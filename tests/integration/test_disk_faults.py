"""A full disk and a read-only project, met by the real CLI: one line naming the file and what
was wrong (exit 2), no traceback, nothing half-written, and a rerun with space freed works."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sge_repro.params_yaml import dump_params, profile_params
from small_disk import read_only_view, resize, small_disk


def cli(bin_path: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([bin_path, *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's last stderr line, after checking exit 2 and no traceback anywhere."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


def fill(folder: Path) -> None:
    """Take what is left of the filesystem at `folder` (one file that cannot grow further)."""
    with open(folder / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.fixture
def smoke(project: Path) -> Path:
    (project / "params.yaml").write_text(dump_params(profile_params("smoke")))
    return project


def test_a_full_disk_in_the_data_stage_names_the_manifest(smoke, sge_repro_bin):
    manifests = smoke / "data" / "manifests"
    with small_disk(manifests, 64 << 10):
        fill(manifests)
        line = error_line(cli(sge_repro_bin, smoke, "data", "prepare"))
        assert line.startswith("error: data/manifests/") and ": no space left on device (writing in data/manifests)" in line, line
        assert sorted(p.name for p in manifests.iterdir()) == ["filler"]  # no temp, no half manifest
        resize(manifests, 8 << 20)
        result = cli(sge_repro_bin, smoke, "data", "prepare")
        assert result.returncode == 0, result.stderr[-3000:]
        assert sorted(p.name for p in manifests.iterdir()) == ["cls.json", "det.json", "filler"]


def test_a_full_disk_under_the_run_log_ends_the_run_with_one_line(smoke, sge_repro_bin):
    logs = smoke / "logs"
    with small_disk(logs, 64 << 10):
        fill(logs)
        line = error_line(cli(sge_repro_bin, smoke, "run", "data"))
        assert line.startswith("error: logs/") and "no space left on device" in line, line


@pytest.mark.parametrize("command", [["status"], ["run", "all"], ["run", "data", "--profile", "smoke"], ["report"]])
def test_a_read_only_project_is_one_line(smoke, sge_repro_bin, tmp_path, command):
    with read_only_view(smoke, tmp_path / "read-only") as view:
        before = sorted(str(p.relative_to(view)) for p in view.rglob("*"))
        line = error_line(cli(sge_repro_bin, view, *command))
        assert "read-only file system" in line and "expected a folder this user can write" in line, line
        assert sorted(str(p.relative_to(view)) for p in view.rglob("*")) == before


def test_a_full_dvc_cache_is_named_with_the_way_to_recache(smoke, sge_repro_bin):
    """The training stage succeeds but DVC cannot copy its outputs into .dvc/cache: DVC still
    records the stage in dvc.lock (it looks done) and leaves a temp file in the cache. The run
    says so in one line with the way out; `dvc commit -f` with space freed caches them."""
    assert cli(sge_repro_bin, smoke, "run", "data").returncode == 0
    cache = smoke / ".dvc" / "cache"
    with small_disk(cache, 256 << 10):
        line = error_line(cli(sge_repro_bin, smoke, "run", "train_cls@resnet18-0"))
        assert line.startswith("error: .dvc/cache: DVC could not copy runs/cls/resnet18-seed0/") and \
            "(no space left on device), yet recorded its stage in dvc.lock" in line and "`dvc commit -f`" in line, line
        assert not list(cache.glob("files/*/*/.*.tmp"))  # DVC's half-copied temps are gone
        assert "runs/cls/resnet18-seed0/" in not_in_cache(smoke)
        resize(cache, 64 << 20)
        commit = subprocess.run([sys.executable, "-m", "dvc", "commit", "-f", "train_cls@resnet18-0"], cwd=smoke,
                                capture_output=True, text=True)
        assert commit.returncode == 0, commit.stderr[-2000:]
        assert not_in_cache(smoke) == []


def not_in_cache(project: Path) -> list[str]:
    """What DVC's lock records and its cache lacks (`dvc data status`)."""
    status = subprocess.run([sys.executable, "-m", "dvc", "data", "status", "--json"], cwd=project,
                            capture_output=True, text=True, check=True)
    return json.loads(status.stdout).get("not_in_cache", [])
