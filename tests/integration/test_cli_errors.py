"""Bad input at the command line: exit 2, one line naming the key, nothing written."""

import subprocess
from pathlib import Path

import pytest


def run(bin_path: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([bin_path, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and ".git" not in p.parts and ".dvc" not in p.parts}


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda t: t.replace("  epochs: 12", "  epoch: 12"), "unknown key 'train_cls.epoch'"),
        (lambda t: t.replace("  epochs: 12", "  epochs: twelve"), "train_cls.epochs"),
        (lambda t: t.replace("models: [resnet18, sge_resnet18]", "models: [resnet18, sge_resnet81]"),
         "unknown model 'sge_resnet81'"),
        # valid YAML and types that would fail only mid-pipeline, after the stages before ran
        (lambda t: t.replace("  groups: 8", "  groups: 7"), "model.groups: 7 does not divide the channels of sge_resnet18"),
        (lambda t: t.replace("  width: 32\n  groups: 8", "  width: 32\n  groups: 64"), "expected a divisor of 32"),
        (lambda t: t.replace("  lr: 0.05", "  lr: .inf"), "train_cls.lr: input should be a finite number"),
        (lambda t: t.replace("  lr: 0.05", "  lr: .nan"), "train_cls.lr: input should be a finite number"),
        (lambda t: t.replace("  device: cpu", "  device: tpu:7", 1), "train_cls.device: string should match"),
        (lambda t: t.replace("  device: cpu", "  device: cuda:12", 1), "train_cls.device: 'cuda:12', but this machine has"),
        (lambda t: t.replace("released: {}", "released: {sge_resnet50: 'weights/missing [1].pth'}"),
         "released.sge_resnet50: weights/missing [1].pth: file not found"),
        # YAML that PyYAML alone would accept, and keys that would break the one line
        (lambda t: t.replace("  epochs: 12", "  epochs: 12\n  epochs: 13"), "key 'epochs' given twice (first on line"),
        (lambda t: t.replace("  groups: 8", "  groups: 8\n  width: 16"), "key 'width' given twice"),
        (lambda t: t.replace("  epochs: 12", '  "ep\\nochs": 12'), "unknown key 'train_cls.ep\\nochs'"),
        (lambda t: t.replace("  epochs: 12", '  "ep\\eochs": 12'), "unknown key 'train_cls.ep\\x1bochs'"),
    ],
)
def test_bad_params_exit_2_and_write_nothing(project, sge_repro_bin, edit, expected):
    params = project / "params.yaml"
    params.write_text(edit(params.read_text()))
    before = snapshot(project)
    result = run(sge_repro_bin, project, "run", "all")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(project) == before


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"# caf\xe9\n", b"x: \x80\n"])
def test_params_that_are_not_utf8_are_one_line(project, sge_repro_bin, raw):
    params = project / "params.yaml"
    params.write_bytes(raw + params.read_bytes())
    before = snapshot(project)
    for command in (["run", "all"], ["status"]):
        result = run(sge_repro_bin, project, *command)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "params.yaml: not UTF-8 text (byte 0x" in lines[0], result.stderr
    assert snapshot(project) == before


def test_unknown_profile_and_stage(project, sge_repro_bin):
    before = snapshot(project)
    result = run(sge_repro_bin, project, "run", "all", "--profile", "nope")
    assert result.returncode == 2 and "unknown profile 'nope'" in result.stderr
    assert "available: embedded" in result.stderr
    result = run(sge_repro_bin, project, "run", "trian_cls")
    assert result.returncode == 2 and "unknown stage 'trian_cls'" in result.stderr
    assert "train_cls" in result.stderr
    assert snapshot(project) == before


def test_stage_command_refuses_unlisted_model(project, sge_repro_bin):
    result = run(sge_repro_bin, project, "train", "cls", "--model", "resnet50", "--seed", "0")
    assert result.returncode == 2
    assert "models: 'resnet50' is not listed" in result.stderr


def test_debug_shows_the_traceback(project, sge_repro_bin):
    result = run(sge_repro_bin, project, "--debug", "run", "all", "--profile", "nope")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_every_command_has_help(sge_repro_bin, tmp_path):
    commands = [["run"], ["status"], ["data", "prepare"], ["train", "cls"], ["train", "det"],
                ["eval", "cls"], ["eval", "det"], ["convert"], ["report"], ["models"], ["env"],
                ["bench", "sge"], ["bench", "train"], ["visualize"]]
    for command in commands:
        result = run(sge_repro_bin, tmp_path, *command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "Usage" in result.stdout


def test_models_json_contract(sge_repro_bin, tmp_path):
    """`sge-repro models --json`: [{"name", "params_m", "gflops"}] at 224x224, 1000 classes."""
    import json

    result = run(sge_repro_bin, tmp_path, "models", "--json", "resnet50", "sge_resnet50")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"resnet50", "sge_resnet50"}
    assert all(set(row) == {"name", "params_m", "gflops"} for row in rows.values())
    assert abs(rows["resnet50"]["params_m"] - 25.56) <= 0.005       # the paper's table
    assert abs(rows["sge_resnet50"]["params_m"] - 25.56) <= 0.005
    assert abs(rows["sge_resnet50"]["gflops"] / 4.127 - 1) <= 0.01
    assert rows["sge_resnet50"]["gflops"] > rows["resnet50"]["gflops"]  # SGE's ops are counted


@pytest.mark.parametrize("name", ["my [final].pth", "a [/x] b.pth", "[bold red]c[/].pth"])
def test_an_error_names_the_file_as_written(sge_repro_bin, tmp_path, name):
    """Error text is never read as rich markup: `[final]` is not dropped as a tag, a stray closing
    tag `[/x]` does not crash the CLI."""
    source = tmp_path / name  # "[/x]": a folder "a [" holding "x] b.pth"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"not a checkpoint")
    result = run(sge_repro_bin, tmp_path, "convert-file", name, "out.pth")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and name in lines[0], result.stderr
    assert not (tmp_path / "out.pth").exists()
