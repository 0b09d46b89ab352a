"""`sge-repro exp ablate` end to end on the smoke profile: a small sweep (G = 1, 2, 4) run as real
DVC experiments, the table read back against `dvc exp show`, a rerun that resumes, and a
changed recipe that is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from integration.conftest import copy_project
from sge_repro.params_yaml import dump_params, profile_params

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
VERDICTS = {"held", "not held", "not significant", "undetermined"}


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def ablate(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sge-repro"), "exp", "ablate", "-g", "1", "-g", "2", *args], cwd=root, env=ENV,
                          capture_output=True, text=True, timeout=1800)


def shown_experiments(root: Path) -> dict[str, dict]:
    shown = json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root, env=ENV,
                                      capture_output=True, text=True, check=True).stdout)
    return {exp["name"]: exp["revs"][0]["data"] for entry in shown for exp in (entry.get("experiments") or [])}


def test_the_ablation_runs_as_dvc_experiments_and_its_table_is_theirs(tmp_path):
    root = copy_project(tmp_path / "project")
    (root / "params.yaml").write_text(dump_params(profile_params("smoke", root / "pipelines" / "profiles")))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "smoke params")
    params_before = (root / "params.yaml").read_bytes()

    first = ablate(root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "SGE ablations: sge_resnet18 against resnet18" in first.stdout and "The authors' conclusions" in first.stdout
    assert (root / "params.yaml").read_bytes() == params_before  # every variant started from the same file
    assert [line for line in first.stdout.splitlines() if line.startswith("experiment ")] == [
        f"experiment {n}/6: {name}" for n, name in enumerate(
            ["resnet18-plain (plain)", "sge_resnet18-g1 (G = 1)", "sge_resnet18-g2 (G = 2)", "sge_resnet18-g4 (G = 4)",
             "sge_resnet18-g4-gamma1 (G = 4, gamma init 1)", "sge_resnet18-g4-nonorm (G = 4, no normalisation)"], 1)]

    result = json.loads((root / "reports" / "ablation.json").read_text())
    experiments = shown_experiments(root)
    names = ["resnet18-plain", "sge_resnet18-g1", "sge_resnet18-g2", "sge_resnet18-g4", "sge_resnet18-g4-gamma1",
             "sge_resnet18-g4-nonorm"]
    assert [row["experiment"] for row in result["rows"]] == names and sorted(experiments) == sorted(names)
    plain_top1 = None
    for row in result["rows"]:
        data = experiments[row["experiment"]]
        params = data["params"]["params.yaml"]["data"]
        assert params["models"] == [row["model"]]
        metrics = data["metrics"][f"metrics/eval_cls/{row['model']}-seed0.json"]["data"]
        assert row["top1"] == pytest.approx(metrics["top1"], abs=1e-9)  # the per-image file and the metric agree
        assert row["top1_ci"][0] <= row["top1"] <= row["top1_ci"][1]
        if row["groups"] is None:
            plain_top1 = row["top1"]
            continue
        assert (params["model"]["groups"], params["model"]["sge_weight_init"], params["model"]["sge_normalize"]) == \
            (row["groups"], row["sge_weight_init"], row["sge_normalize"])
        assert row["gain"]["gain"] == pytest.approx(row["top1"] - plain_top1, abs=1e-9)
    variants = {row["experiment"]: (row["groups"], row["sge_weight_init"], row["sge_normalize"]) for row in result["rows"]}
    assert variants["sge_resnet18-g4-gamma1"] == (4, 1.0, True) and variants["sge_resnet18-g4-nonorm"] == (4, 0.0, False)
    assert [claim["claim"] for claim in result["claims"]] == [
        "a middle G is best", "gamma initialised to 0 beats 1", "the normalisation is needed"]
    for claim in result["claims"]:
        assert claim["verdict"] in VERDICTS - {"undetermined"}
        diff = claim["difference"]
        assert (claim["verdict"] == "held") == (diff["ci_low"] > 0)
        assert (claim["verdict"] == "not held") == (diff["ci_high"] < 0)
    assert "| sge_resnet18-g4-nonorm | G = 4, no normalisation |" in (root / "reports" / "ablation.md").read_text()

    # a rerun resumes: nothing is queued again, the same table
    table = (root / "reports" / "ablation.json").read_bytes()
    again = ablate(root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "experiment 1/" not in again.stdout
    assert sorted(shown_experiments(root)) == sorted(names)
    assert (root / "reports" / "ablation.json").read_bytes() == table

    # another recipe is not mixed into this ablation
    edited = (root / "params.yaml").read_text().replace("  epochs: 2\n", "  epochs: 3\n", 1)
    assert edited != params_before.decode()
    (root / "params.yaml").write_text(edited)
    refused = ablate(root)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: experiment resnet18-plain ran with train_cls.epochs = 2, params.yaml now gives 3; expected the same "
        "recipe: commit the change to start a new ablation, or remove it (`dvc exp remove resnet18-plain`) and rerun"]
    assert (root / "reports" / "ablation.json").read_bytes() == table
    assert sorted(shown_experiments(root)) == sorted(names)


def test_a_failed_experiment_is_one_line_and_leaves_params_yaml_and_the_experiments_as_they_were(tmp_path):
    """The first experiment fails at its data stage (a dataset path that is not there): DVC's own
    output, then one line naming the experiment; params.yaml is the user's again, no experiment is
    recorded, nothing is written in reports/. A rerun says the experiment starts over."""
    root = copy_project(tmp_path / "project")
    params = profile_params("smoke", root / "pipelines" / "profiles")
    params.data.classification.source, params.data.classification.source_path = "imagenet", "datasets/missing"
    (root / "params.yaml").write_text(dump_params(params))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "a dataset that is not there")
    before = (root / "params.yaml").read_bytes()

    failed = ablate(root)
    assert failed.returncode == 2
    assert "data.classification.source_path: datasets/missing does not exist" in failed.stdout + failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == (
        "error: experiment resnet18-plain failed (DVC's output above): rerun to go on from it")
    assert (root / "params.yaml").read_bytes() == before
    assert shown_experiments(root) == {} and not (root / "reports").exists()

    # the rerun says that the unfinished experiment starts over (a temporary copy keeps no checkpoint)
    again = ablate(root)
    assert again.returncode == 2
    assert ("experiment resnet18-plain began in an earlier run and did not finish: it starts again from its first "
            "epoch") in again.stderr
    assert shown_experiments(root) == {} and not (root / "reports").exists()
    # on another commit the experiment of that name is a new one: nothing of it began before
    git(root, "commit", "-q", "--allow-empty", "-m", "another commit")
    other = ablate(root)
    assert other.returncode == 2 and "began in an earlier run" not in other.stderr
