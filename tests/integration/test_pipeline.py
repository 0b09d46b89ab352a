"""The whole pipeline through real DVC, real detectron2 and real pycocotools, on the smoke profile."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sge_repro.params import validate_params
from sge_repro.params_yaml import dump_params

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]
BOX_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def sge_repro(bin_path: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([bin_path, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"sge-repro {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def stale_stages(cwd: Path) -> set[str]:
    """The stages `dvc status` says would rerun, except the data stage's standing "always changed"
    (always_changed in dvc.yaml: it rescans the datasets on every repro; any other reason counts)."""
    out = subprocess.run([*DVC, "status", "--json"], cwd=cwd, capture_output=True, text=True, check=True).stdout
    status = {name.split(":", 1)[-1]: why for name, why in json.loads(out or "{}").items()}
    assert status.get("data") == ["always changed"], status.get("data")
    return {name for name, why in status.items() if not (name == "data" and why == ["always changed"])}


def set_param(cwd: Path, section: str | None, key: str, value) -> None:
    path = cwd / "params.yaml"
    params = yaml.safe_load(path.read_text())
    (params[section] if section else params)[key] = value
    # written as sge-repro writes it: setting a value back gives back the same bytes (the report
    # stage depends on params.yaml's bytes, whose sha256 its provenance records)
    path.write_text(dump_params(validate_params(params)))


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
        (d, b) for d, backbones in params["detection"].items() for b in backbones}
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

    check_dataset_changes_rerun_exactly_their_stages(project, sge_repro_bin, params)

    # another seed: its stages are new, seed 0's stay up to date
    set_param(project, None, "seeds", [0, 1])
    stale = stale_stages(project)
    assert {"visualize", "report", "train_cls@resnet18-1", "eval_faster_rcnn@resnet18-1"} <= stale
    assert not [name for name in stale if name.endswith("-0")]
    set_param(project, None, "seeds", [0])
    assert stale_stages(project) == set()

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


def check_dataset_changes_rerun_exactly_their_stages(project: Path, sge_repro_bin: str, params: dict) -> None:
    """A changed / added / removed image reruns the data stage and the stages of that dataset,
    nothing else; restoring the content restores the recorded manifest (nothing stale); a corrupt
    image is named (exit 2) or, with data.skip_corrupt, left out. Only the data stage runs here."""
    env = {**subprocess.os.environ, "PATH": f"{Path(sge_repro_bin).parent}:{subprocess.os.environ['PATH']}"}

    def data_stage() -> None:
        subprocess.run([*DVC, "repro", "data"], cwd=project, check=True, capture_output=True, env=env)

    cls_stages = {f"{group}@{model}-0" for group in ("train_cls", "eval_cls") for model in params["models"]}
    cls_stages.add("visualize")
    det_stages = {f"{group}_{detector}@{backbone}-0" for group in ("train", "eval")
                  for detector, backbones in params["detection"].items() for backbone in backbones}
    manifests = {name: (project / "data" / "manifests" / f"{name}.json").read_bytes() for name in ("cls", "det")}
    images = sorted((project / "data" / "cls" / "train").rglob("*.jpg"))
    image, original = images[0], images[0].read_bytes()

    image.write_bytes(images[1].read_bytes())                                   # changed
    status = subprocess.run([sge_repro_bin, "status"], cwd=project, capture_output=True, text=True, timeout=900,
                            env={**env, "COLUMNS": "300"}).stdout   # wide: no wrapped cells
    assert "cls: 1 new or changed file(s) to verify" in status and "may run" in status
    data_stage()
    assert stale_stages(project) == cls_stages
    image.write_bytes(original)                                                 # the same content again
    data_stage()
    assert stale_stages(project) == set()
    added = image.with_name("added.jpg")                                        # added
    added.write_bytes(images[1].read_bytes())
    data_stage()
    assert stale_stages(project) == cls_stages
    added.unlink()
    data_stage()
    assert stale_stages(project) == set()
    image.unlink()                                                              # removed
    data_stage()
    assert stale_stages(project) == cls_stages
    image.write_bytes(original)
    data_stage()
    assert stale_stages(project) == set()

    det_images = sorted((project / "data" / "det" / "val").glob("*.jpg"))      # the other dataset
    det_original = det_images[0].read_bytes()
    det_images[0].write_bytes(det_images[1].read_bytes())
    data_stage()
    assert stale_stages(project) == det_stages
    det_images[0].write_bytes(det_original)
    data_stage()
    assert stale_stages(project) == set()

    image.write_bytes(original[: len(original) // 2])                          # corrupt
    failed = subprocess.run([sge_repro_bin, "run", "data"], cwd=project, capture_output=True, text=True, timeout=900)
    assert failed.returncode == 2
    assert "1 corrupt image(s)" in failed.stderr and image.name in failed.stderr
    assert stale_stages(project) == set()                                       # the manifests were kept
    set_param(project, "data", "skip_corrupt", True)
    data_stage()
    # the cls manifest leaves the image out; the det manifest is unchanged, so no detector reruns
    # (the flag itself is no stage's param); the report records params.yaml's hash
    assert stale_stages(project) == cls_stages | {"report"}
    listed = json.loads((project / "data" / "manifests" / "cls.json").read_text())["corrupt"]
    assert [item["file"] for item in listed] == [image.relative_to(project / "data" / "cls").as_posix()]
    set_param(project, "data", "skip_corrupt", False)
    image.write_bytes(original)
    data_stage()
    assert stale_stages(project) == set()
    assert {name: (project / "data" / "manifests" / f"{name}.json").read_bytes() for name in manifests} == manifests


@pytest.mark.parametrize("profile", ["smoke", "released", "paper", "rehearsal"])
def test_the_reports_stage_list_is_dvcs(project, profile):
    """The report's provenance looks up each stage's run by name: its list is the one DVC expands
    from dvc.yaml (released checkpoints' and torchvision downloads' stages included)."""
    from sge_repro.params_yaml import profile_params
    from sge_repro.stages.report import pipeline_stages

    params = profile_params(profile, project / "pipelines" / "profiles")
    (project / "params.yaml").write_text(dump_params(params))
    listed = subprocess.run([*DVC, "stage", "list", "--name-only"], cwd=project, capture_output=True, text=True,
                            check=True).stdout.split()
    assert pipeline_stages(params) + ["report"] == listed
