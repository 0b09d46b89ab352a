"""The whole pipeline through real DVC, real detectron2 and real pycocotools, on the smoke profile."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]
BOX_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def sge_repro(bin_path: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([bin_path, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"sge-repro {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def stale_stages(cwd: Path) -> set[str]:
    out = subprocess.run([*DVC, "status", "--json"], cwd=cwd, capture_output=True, text=True, check=True).stdout
    return {name.split(":", 1)[-1] for name in json.loads(out or "{}")}


def set_param(cwd: Path, section: str, key: str, value) -> None:
    path = cwd / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_smoke_pipeline_end_to_end(project, sge_repro_bin):
    first = sge_repro(sge_repro_bin, project, "run", "all", "--profile", "smoke")
    assert "profile smoke" in first.stdout

    summary = json.loads((project / "reports" / "summary.json").read_text())
    assert summary["profile"] == "smoke"
    params = yaml.safe_load((project / "params.yaml").read_text())
    classification = {row["model"]: row for row in summary["classification"]}
    assert set(classification) == set(params["models"])
    for row in classification.values():
        assert set(row) >= {"model", "dataset", "seed", "top1", "top5", "params_m", "gflops"}
        assert row["dataset"] == "embedded" and row["seed"] == 0
        assert 0 <= row["top1"] <= row["top5"] <= 100
        assert 0 < row["params_m"] < 1 and row["gflops"] >= 0
    detection = summary["detection"]
    assert {(r["detector"], r["backbone"]) for r in detection} == {
        (d, b) for d in params["detectors"] for b in params["detection_backbones"]}
    for row in detection:
        assert set(row["bbox"]) == BOX_KEYS
        assert all(0 <= value <= 100 for value in row["bbox"].values())
        assert "segm" not in row  # no mask model in the smoke profile
        # how it was trained: the protocol of params.yaml, backbones from this pipeline's classifiers
        assert (row["engine"], row["protocol"], row["backbone_weights"]) == (
            "detectron2", params["train_det"]["protocol"], "trained")
    for name in ("report.md", "report.html"):
        assert (project / "reports" / name).stat().st_size > 0
    # the per-stage artifacts DVC declared
    assert (project / "runs" / "cls" / "sge_resnet18-seed0" / "best.pt").exists()
    assert (project / "runs" / "convert" / "sge_resnet18-seed0.pth").exists()
    assert (project / "metrics" / "eval_det" / "faster_rcnn-sge_resnet18-seed0.json").exists()
    # the visualize stage drew the SGE model's attention, and the HTML report embeds it
    maps = sorted((project / "runs" / "visualize" / "sge_resnet18-seed0").glob("*.png"))
    assert maps and not (project / "runs" / "visualize" / "resnet18-seed0").exists()
    html = (project / "reports" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= len(maps)

    # nothing changed: a second run does no work, and DVC agrees every stage is up to date
    assert stale_stages(project) == set()
    second = sge_repro(sge_repro_bin, project, "run", "all")
    assert "0 stage(s) ran" in second.stdout
    assert "Running stage" not in second.stdout

    # one param changed: only the stages that read it are stale
    set_param(project, "report", "tolerance", 0.5)
    assert stale_stages(project) == {"report"}
    set_param(project, "eval_cls", "batch_size", 7)
    assert stale_stages(project) == {"report", "eval_cls@resnet18-0", "eval_cls@sge_resnet18-0"}

    # `dvc repro STAGE` works without the CLI (bin/ of this environment on PATH)
    env_path = f"{Path(sge_repro_bin).parent}:{subprocess.os.environ['PATH']}"
    subprocess.run([*DVC, "repro", "report"], cwd=project, check=True, capture_output=True,
                   env={**subprocess.os.environ, "PATH": env_path})
    assert "report" not in stale_stages(project)
