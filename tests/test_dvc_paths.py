"""dvc.yaml's paths are the ones sge_repro.paths computes: a stage reads and writes where DVC
looks. The data stage's outs are the manifests; the stages after it depend on the manifest of
their dataset, never on an image tree."""

from pathlib import Path

import yaml

from sge_repro.detection.detectors import DETECTORS
from sge_repro.paths import ProjectPaths

REPO = Path(__file__).resolve().parents[1]
PATHS = ProjectPaths(Path("."))
ITEM = {"${item.model}": "M", "${item.seed}": "7", "${item.backbone}": "B", "${item}": "B", "${key}": "B"}


def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def entries(stage: dict, kind: str) -> list[str]:
    """Paths of deps / outs / metrics / plots with the matrix / foreach placeholders filled in."""
    found = []
    for entry in stage.get("do", stage).get(kind, []):
        path = next(iter(entry)) if isinstance(entry, dict) else entry
        for placeholder, value in ITEM.items():
            path = path.replace(placeholder, value)
        found.append(path)
    return found


def posix(path: Path) -> str:
    return path.as_posix()


def test_the_data_stage_writes_the_manifests_and_nothing_else():
    data = stages()["data"]
    assert entries(data, "outs") == [posix(PATHS.cls_manifest), posix(PATHS.det_manifest)]
    assert data.get("always_changed") is True   # it rescans the trees: see dvc.yaml
    assert all(out[next(iter(out))] == {"cache": False, "persist": True} for out in data["outs"])


def test_stages_depend_on_their_dataset_manifest_not_on_an_image_tree():
    every = stages()
    cls, det = posix(PATHS.cls_manifest), posix(PATHS.det_manifest)
    for name in ("train_cls", "eval_cls", "visualize"):
        assert cls in entries(every[name], "deps") and det not in entries(every[name], "deps"), name
    for name in (f"{group}_{detector}" for group in ("train", "eval") for detector in DETECTORS):
        assert det in entries(every[name], "deps") and cls not in entries(every[name], "deps"), name
    trees = (posix(PATHS.cls_data), posix(PATHS.det_data))
    for name, stage in every.items():
        for kind in ("deps", "outs"):
            assert not any(path.startswith(trees) for path in entries(stage, kind)), (name, kind)


def test_run_artifacts_match_paths_py():
    every = stages()
    assert entries(every["train_cls"], "outs") == [posix(PATHS.cls_run_dir("M", 7))]
    assert entries(every["train_cls"], "metrics") == [posix(PATHS.cls_train_metrics("M", 7))]
    assert entries(every["train_cls"], "plots") == [posix(PATHS.cls_history("M", 7))]
    assert entries(every["eval_cls"], "outs") == [posix(PATHS.cls_predictions("M", 7))]
    assert entries(every["eval_cls"], "metrics") == [posix(PATHS.cls_metrics("M", 7))]
    assert entries(every["fetch_weights"], "outs") == [posix(PATHS.given_weights("B", "torchvision"))]
    assert entries(every["copy_weights"], "outs") == [posix(PATHS.given_weights("B", "file"))]
    # one convert stage per source: each reads its own input and writes the same weights file
    for name, source in (("convert", posix(PATHS.cls_run_dir("B", 7))),
                         ("convert_file", posix(PATHS.given_weights("B", "file"))),
                         ("convert_torchvision", posix(PATHS.given_weights("B", "torchvision")))):
        assert (entries(every[name], "deps"), entries(every[name], "outs")) == (
            [source], [posix(PATHS.det_weights("B", 7))]), name
    for detector in DETECTORS:
        train, evaluate = every[f"train_{detector}"], every[f"eval_{detector}"]
        assert entries(train, "outs") == [posix(PATHS.det_run_dir(detector, "B", 7))]
        assert posix(PATHS.det_weights("B", 7)) in entries(train, "deps")
        assert f"--detector {detector} " in train["cmd"] and f"--detector {detector} " in evaluate["cmd"]
        assert train["matrix"]["backbone"] == evaluate["matrix"]["backbone"] == f"${{detection.{detector}}}"
        assert posix(PATHS.det_run_dir(detector, "B", 7)) in entries(evaluate, "deps")
        assert entries(evaluate, "metrics") == [posix(PATHS.det_metrics(detector, "B", 7))]
    assert entries(every["visualize"], "outs") == [posix(PATHS.attention_maps)]
    assert entries(every["report"], "outs") == [posix(PATHS.reports)]
