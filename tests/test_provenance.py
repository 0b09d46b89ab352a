"""Provenance of a report: git state, stage runs from status files (real git, real files)."""

import hashlib
import subprocess

import pytest

from sge_repro.provenance import file_sha256, git_state, stage_runs
from sge_repro.stage_status import StageStatus


def git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_git_state_outside_a_repo_clean_and_dirty(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None, "changed": []}
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("runs/\n")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "x")
    head = git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ignored.pt").write_text("x")
    assert git_state(tmp_path) == {"commit": head, "dirty": False, "changed": []}
    (tmp_path / "params.yaml").write_text("a: 2\n")
    (tmp_path / "new_module.py").write_text("")
    assert git_state(tmp_path) == {"commit": head, "dirty": True, "changed": ["new_module.py", "params.yaml"]}
    assert file_sha256(tmp_path / "params.yaml") == hashlib.sha256(b"a: 2\n").hexdigest()
    assert file_sha256(tmp_path / "absent.yaml") is None


def test_stage_runs_come_from_the_status_files(tmp_path):
    clock = [1_700_000_000.0]
    status = StageStatus(tmp_path / "train_cls@m-0.json", "train_cls@m-0", clock=lambda: clock[0])
    clock[0] += 125.04
    status.finish()
    runs = stage_runs(tmp_path, ["data", "train_cls@m-0"])  # data wrote no file: not listed
    assert runs == [{"stage": "train_cls@m-0", "state": "done", "wall_time_s": 125.04,
                     "finished": "2023-11-14T22:15:25+00:00", "host": runs[0]["host"], "world_size": 1,
                     "devices": ""}]


@pytest.mark.parametrize("key, value", [("elapsed_s", "abc"), ("updated", [1]), ("world_size", "two"),
                                        ("updated", 1e300), ("elapsed_s", 10 ** 400), ("elapsed_s", float("inf"))])
def test_a_damaged_status_file_is_left_out_of_the_provenance(tmp_path, key, value):
    """Status files describe runs (the report's provenance), they are not results: one with a
    field of another type or out of range is left out, as an unreadable one is, never a traceback."""
    import json

    for stage in ("good", "bad"):
        StageStatus(tmp_path / f"{stage}.json", stage).finish()
    record = json.loads((tmp_path / "bad.json").read_text())
    record[key] = value
    (tmp_path / "bad.json").write_text(json.dumps(record))
    assert [run["stage"] for run in stage_runs(tmp_path, ["good", "bad"])] == ["good"]


def test_what_the_pipeline_writes_into_the_tree_is_not_dirt(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "x")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (tmp_path / "metrics" / "eval_cls").mkdir(parents=True)
    (tmp_path / "metrics" / "eval_cls" / "m-seed0.json").write_text("{}")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "h.tsv").write_text("epoch\n")
    assert git_state(tmp_path)["dirty"] is False
