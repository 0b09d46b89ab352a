"""The convert sources (the lists convert.trained | files | torchvision): params, the stages they give, the stages.

torchvision's weights are fetched from a real HTTP server on 127.0.0.1 started here, serving a
made-up file (never the outside network).
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from authors_reference import release_file
from sge_repro.detection.convert import read_weights_metadata
from sge_repro.errors import UserError
from sge_repro.models import create_model
from sge_repro.models.torchvision_weights import TORCHVISION_IMAGENET_WEIGHTS
from sge_repro.params import validate_params
from sge_repro.params_yaml import dump_params, load_params, profile_params
from sge_repro.paths import ProjectPaths
from sge_repro.pipeline import apply_profile, check_runnable
from sge_repro.stage_status import read_status
from sge_repro.stages.detection import convert, fetch_weights
from sge_repro.stages.report import pipeline_stages

REPO = Path(__file__).resolve().parents[2]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path, monkeypatch):
    """(folder served over HTTP, base URL) on 127.0.0.1."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "served"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _smoke(**changes) -> dict:
    raw = yaml.safe_load(dump_params(profile_params("smoke")))
    for key, value in changes.items():
        if "." in key:
            section, name = key.split(".")
            raw[section][name] = value
        else:
            raw[key] = value
    return raw


def test_each_list_names_the_source_of_its_backbones():
    params = validate_params(_smoke(**{"detection.faster_rcnn": ["resnet18", "sge_resnet18", "resnet50"],
                                       "convert.trained": ["resnet18"],
                                       "convert.files": {"sge_resnet18": "released/sge.pth.tar"},
                                       "convert.torchvision": ["resnet50"]}))
    assert [params.convert_source(b) for b in params.detection_backbones] == ["trained", "file", "torchvision"]
    # what each backbone's convert stage reads: the classifier's run, or the given weights under runs/pretrained
    paths = ProjectPaths(Path("."))
    assert paths.cls_run_dir("resnet18", 0).as_posix() == "runs/cls/resnet18-seed0" and params.convert.checkpoint == "best"
    assert paths.given_weights("sge_resnet18", "file").as_posix() == "runs/pretrained/sge_resnet18-file.pth"
    assert paths.given_weights("resnet50", "torchvision").as_posix() == "runs/pretrained/resnet50-torchvision.pth"
    url, sha = TORCHVISION_IMAGENET_WEIGHTS["resnet50"]
    assert params.torchvision_weights("resnet50").url == url and params.torchvision_weights("resnet50").sha256 == sha
    # one convert stage per source; only resnet50 is fetched (resnet18 and sge_resnet18 fetch nothing)
    stages = pipeline_stages(params)
    assert [name for name in stages if name.startswith(("fetch_weights", "copy_weights", "convert"))] == [
        "fetch_weights@resnet50", "copy_weights@sge_resnet18", "convert@resnet18-0", "convert_file@sge_resnet18-0",
        "convert_torchvision@resnet50-0"]


def test_an_overridden_torchvision_url_replaces_the_pinned_one():
    override = {"url": "http://127.0.0.1/resnet50.pth", "sha256": "0123abcd"}
    params = validate_params(_smoke(**{"detection.faster_rcnn": ["resnet18", "resnet50"], "convert.trained": ["resnet18"],
                                       "convert.torchvision": ["resnet50"],
                                       "convert.torchvision_weights": {"resnet50": override}}))
    assert params.torchvision_weights("resnet50").model_dump() == override


@pytest.mark.parametrize("changes, message", [
    ({"convert.trained": ["resnet18"]},
     "detection: backbone 'sge_resnet18' has no weights: list it in convert.trained (a classifier trained here), "
     "convert.files or convert.torchvision"),
    ({"convert.files": {"resnet18": "x.pth"}}, "convert.trained: 'resnet18' is also in convert.files; expected one source"),
    ({"convert.trained": ["sge_resnet18"], "convert.torchvision": ["resnet18"]},
     "convert.torchvision: 'resnet18': torchvision's ImageNet weights exist for resnet50, resnet101 only"),
    ({"convert.files": {"resnet34": "a.pth"}},
     "convert.files: 'resnet34' is not a backbone of any detector in detection (backbones: resnet18, sge_resnet18)"),
    ({"models": ["resnet18"]}, "convert.trained: 'sge_resnet18' is not among models ['resnet18']"),
    ({"convert.trained": ["resnet18"], "convert.files": {"sge_resnet18": ""}}, "convert.files: 'sge_resnet18' has no file path"),
    ({"convert.trained": ["resnet18", "sge_resnet18", "resnet18"]}, "convert.trained: duplicate entries in"),
    ({"convert.torchvision_weights": {"resnet50": {"url": "http://127.0.0.1/r.pth", "sha256": "0123abcd"}}},
     "convert.torchvision_weights: 'resnet50' is not in convert.torchvision"),
    ({"convert.trained": "resnet18"}, "convert.trained: input should be a valid list"),
    # the keys of before (the one source and its overrides, and what sge-repro derived from them) are gone
    ({"convert.source": "trained"}, "unknown key 'convert.source' (allowed here: checkpoint, trained, files, torchvision, "
                                    "torchvision_weights)"),
    ({"convert.sources": {"sge_resnet18": "file"}}, "unknown key 'convert.sources'"),
    ({"convert.inputs": {}}, "unknown key 'convert.inputs'"),
    ({"convert.downloads": {}}, "unknown key 'convert.downloads'"),
])
def test_inconsistent_sources_are_one_line_errors(changes, message):
    with pytest.raises(UserError) as error:
        validate_params(_smoke(**changes), "params.yaml")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_file_or_torchvision_backbone_needs_no_classifier():
    params = validate_params(_smoke(**{"models": ["resnet18"], "convert.trained": [],
                                       "convert.files": {"resnet18": "a.pth", "sge_resnet18": "b.pth"}}))
    assert params.convert_source("sge_resnet18") == "file"
    params = validate_params(_smoke(**{"models": ["resnet18"], "detection.faster_rcnn": ["resnet50"],
                                       "convert.trained": [], "convert.torchvision": ["resnet50"]}))
    assert params.convert_source("resnet50") == "torchvision" and params.models == ["resnet18"]


def test_a_hand_edit_of_the_convert_lists_is_read_as_it_is(tmp_path):
    """Nothing in params.yaml is derived: a hand edit needs no rewrite (`sge-repro run` without a profile
    leaves the file alone), and a mistake in it is one line."""
    path = tmp_path / "params.yaml"
    path.write_text(dump_params(profile_params("smoke")))
    raw = yaml.safe_load(path.read_text())
    raw["convert"]["trained"] = ["resnet18"]
    raw["convert"]["files"] = {"sge_resnet18": "released/sge.pth.tar"}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # a hand edit
    edited = path.read_bytes()
    params = load_params(path)
    assert params.convert_source("sge_resnet18") == "file" and "copy_weights@sge_resnet18" in pipeline_stages(params)
    assert apply_profile(None, path) == ("smoke", False) and path.read_bytes() == edited
    assert yaml.safe_load(dump_params(params)) == raw  # what sge-repro writes holds what was given, nothing more

    raw["convert"]["trained"] = ["resnet18", "sge_resnet18"]  # now in two lists
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(UserError) as error:
        load_params(path)
    assert "convert.trained: 'sge_resnet18' is also in convert.files; expected one source" in str(error.value)
    assert "\n" not in str(error.value)
    raw["convert"]["inputs"] = {}  # a params.yaml of before, with a derived key
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(UserError, match=r"unknown key 'convert.inputs'"):
        load_params(path)


def _paths_and_params(tmp_path, **changes):
    return ProjectPaths(tmp_path), validate_params(_smoke(**changes))


def _copy_weights_stage(root: Path, backbone: str, file: str) -> None:
    """dvc.yaml's copy_weights@<backbone> command, run in `root`: convert.files' file into runs/pretrained/."""
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["copy_weights"]["do"]["cmd"]
    cmd = cmd.replace("${item}", file).replace("${key}", backbone)
    subprocess.run(["bash", "-c", cmd], cwd=root, check=True, timeout=60)


def test_convert_from_an_authors_release_file(tmp_path):
    """source file: the authors' release format (DataParallel keys inside state_dict), any width."""
    source = create_model("sge_resnet18", num_classes=7, groups=4, width=8, seed=3)
    release = tmp_path / "released" / "sge_resnet18.pth.tar"
    release.parent.mkdir()
    release_file(source, release)
    paths, params = _paths_and_params(tmp_path, **{"convert.trained": ["resnet18"],
                                                   "convert.files": {"sge_resnet18": "released/sge_resnet18.pth.tar"}})
    _copy_weights_stage(tmp_path, "sge_resnet18", params.convert.files["sge_resnet18"])
    assert paths.given_weights("sge_resnet18", "file").read_bytes() == release.read_bytes()
    summary = convert(params, paths, "sge_resnet18", 0)
    header = read_weights_metadata(paths.det_weights("sge_resnet18", 0))
    assert header["backbone_source"] == "file" and header["source_format"] == "official"
    assert header["model"] == "sge_resnet18" and header["model_kwargs"] == {"groups": 4, "width": 8}
    weights = torch.load(paths.det_weights("sge_resnet18", 0), weights_only=True)["model"]
    assert torch.equal(weights["backbone.bottom_up.layer1.0.sge.weight"], source.layer1[0].sge.weight.detach())
    assert summary["num_tensors"] == len(weights)
    assert not (tmp_path / "runs" / "cls").exists()  # no classifier was needed
    # its status file under the stage's name in dvc.yaml (one convert stage per source)
    assert read_status(paths.stage_status("convert_file@sge_resnet18-0"))["state"] == "done"
    assert not paths.stage_status("convert@sge_resnet18-0").exists()


def test_convert_file_source_names_a_missing_file(tmp_path):
    paths, params = _paths_and_params(tmp_path, **{"convert.trained": ["resnet18"],
                                                   "convert.files": {"sge_resnet18": "nowhere.pth"}})
    # before any stage runs: the given file named by its params.yaml key
    with pytest.raises(UserError, match=r"params.yaml: convert.files.sge_resnet18: nowhere.pth: file not found"):
        check_runnable(params, tmp_path)
    # at the convert stage: the copy that copy_weights makes
    with pytest.raises(UserError, match=r"sge_resnet18-file.pth: not found \(run the copy_weights@sge_resnet18 stage"):
        convert(params, paths, "sge_resnet18", 0)
    assert not paths.det_weights("sge_resnet18", 0).exists()


def _torchvision_params(tmp_path, base_url: str, sha256: str):
    return _paths_and_params(tmp_path, **{
        "detection.faster_rcnn": ["resnet18", "resnet50"],
        "convert.trained": ["resnet18"],
        "convert.torchvision": ["resnet50"],
        "convert.torchvision_weights": {"resnet50": {"url": f"{base_url}/resnet50-made-up.pth", "sha256": sha256}}})


def test_fetch_torchvision_weights_from_a_local_server_then_convert(served, tmp_path):
    folder, base_url = served
    made_up = torchvision.models.resnet50(weights=None)  # torchvision's own layout, random weights
    torch.save(made_up.state_dict(), folder / "resnet50-made-up.pth")
    digest = hashlib.sha256((folder / "resnet50-made-up.pth").read_bytes()).hexdigest()

    # a wrong checksum: refused, nothing written where the convert stage would read it
    paths, params = _torchvision_params(tmp_path, base_url, "0" * 64)
    with pytest.raises(UserError, match="sha256 mismatch"):
        fetch_weights(params, paths, "resnet50")
    assert not paths.given_weights("resnet50", "torchvision").exists()

    # the leading digits are enough (torchvision's own check), as is the full digest
    paths, params = _torchvision_params(tmp_path, base_url, digest[:8])
    fetched = fetch_weights(params, paths, "resnet50")
    assert Path(fetched["weights"]) == paths.given_weights("resnet50", "torchvision")
    with pytest.raises(UserError, match=r"convert.torchvision: 'resnet18' is not listed \(listed: resnet50\)"):
        fetch_weights(params, paths, "resnet18")

    convert(params, paths, "resnet50", 0)
    assert read_status(paths.stage_status("convert_torchvision@resnet50-0"))["state"] == "done"
    header = read_weights_metadata(paths.det_weights("resnet50", 0))
    assert header["backbone_source"] == "torchvision" and header["source_format"] == "torchvision"
    assert header["model_kwargs"]["width"] == 64
    weights = torch.load(paths.det_weights("resnet50", 0), weights_only=True)["model"]
    assert torch.equal(weights["backbone.bottom_up.layer4.2.conv3.weight"], made_up.layer4[2].conv3.weight.detach())
