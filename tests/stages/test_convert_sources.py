"""The convert sources (trained | file | torchvision): params, the derived stage inputs, the stages.

torchvision's weights are fetched from a real HTTP server on 127.0.0.1 started here, serving a
made-up file (never the outside network).
"""

from __future__ import annotations

import functools
import hashlib
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
from sge_repro.params_yaml import dump_params, load_params, profile_params, refresh_params_file, without_derived
from sge_repro.paths import ProjectPaths
from sge_repro.stages.detection import convert, fetch_weights


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
    raw = without_derived(yaml.safe_load(dump_params(profile_params("smoke"))))
    for key, value in changes.items():
        if "." in key:
            section, name = key.split(".")
            raw[section][name] = value
        else:
            raw[key] = value
    return raw


def test_source_defaults_and_per_backbone_override():
    params = validate_params(_smoke(**{"detection_backbones": ["resnet18", "sge_resnet18", "resnet50"],
                                       "convert.sources": {"resnet50": "torchvision", "sge_resnet18": "file"},
                                       "convert.files": {"sge_resnet18": "released/sge.pth.tar"}}))
    assert [params.convert_source(b) for b in params.detection_backbones] == ["trained", "file", "torchvision"]
    inputs = params.convert.inputs
    assert inputs["resnet18-0"].path == "runs/cls/resnet18-seed0" and inputs["resnet18-0"].checkpoint == "best"
    assert inputs["sge_resnet18-0"].path == "released/sge.pth.tar" and inputs["sge_resnet18-0"].checkpoint is None
    assert inputs["resnet50-0"].path == "runs/pretrained/resnet50-torchvision.pth"
    url, sha = TORCHVISION_IMAGENET_WEIGHTS["resnet50"]
    assert params.convert.downloads["resnet50"].url == url and params.convert.downloads["resnet50"].sha256 == sha
    assert set(params.convert.downloads) == {"resnet50"}  # resnet18 and sge_resnet18 fetch nothing


@pytest.mark.parametrize("changes, message", [
    ({"convert.sources": {"sge_resnet18": "file"}}, "convert.files: no file for 'sge_resnet18'"),
    ({"convert.files": {"resnet18": "x.pth"}}, "convert.files: 'resnet18' is not a detection backbone whose convert source is file"),
    ({"convert.sources": {"resnet18": "torchvision"}}, "cannot come from torchvision"),
    ({"convert.sources": {"resnet34": "file"}}, "convert.sources: 'resnet34' is not in detection_backbones"),
    ({"models": ["resnet18"]}, "detection_backbones: 'sge_resnet18' is not among models"),
    ({"convert.source": "anywhere"}, "convert.source: input should be 'trained', 'file' or 'torchvision'"),
])
def test_inconsistent_sources_are_one_line_errors(changes, message):
    with pytest.raises(UserError) as error:
        validate_params(_smoke(**changes), "params.yaml")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_file_or_torchvision_backbone_needs_no_classifier():
    params = validate_params(_smoke(**{"models": ["resnet18"], "convert.source": "file",
                                       "convert.files": {"resnet18": "a.pth", "sge_resnet18": "b.pth"}}))
    assert params.convert_source("sge_resnet18") == "file"


def test_stale_derived_inputs_are_refused_and_refreshed(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(dump_params(profile_params("smoke")))
    raw = yaml.safe_load(path.read_text())
    raw["convert"]["sources"] = {"sge_resnet18": "file"}
    raw["convert"]["files"] = {"sge_resnet18": "released/sge.pth.tar"}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # a hand edit: convert.inputs is now stale
    with pytest.raises(UserError, match="convert.inputs: out of date"):
        load_params(path)
    assert refresh_params_file(path) is True
    assert load_params(path).convert.inputs["sge_resnet18-0"].path == "released/sge.pth.tar"
    assert refresh_params_file(path) is False


def _paths_and_params(tmp_path, **changes):
    return ProjectPaths(tmp_path), validate_params(_smoke(**changes))


def test_convert_from_an_authors_release_file(tmp_path):
    """source file: the authors' release format (DataParallel keys inside state_dict), any width."""
    source = create_model("sge_resnet18", num_classes=7, groups=4, width=8, seed=3)
    release = tmp_path / "released" / "sge_resnet18.pth.tar"
    release.parent.mkdir()
    release_file(source, release)
    paths, params = _paths_and_params(tmp_path, **{"convert.sources": {"sge_resnet18": "file"},
                                                   "convert.files": {"sge_resnet18": "released/sge_resnet18.pth.tar"}})
    summary = convert(params, paths, "sge_resnet18", 0)
    header = read_weights_metadata(paths.det_weights("sge_resnet18", 0))
    assert header["backbone_source"] == "file" and header["source_format"] == "official"
    assert header["model"] == "sge_resnet18" and header["model_kwargs"] == {"groups": 4, "width": 8}
    weights = torch.load(paths.det_weights("sge_resnet18", 0), weights_only=True)["model"]
    assert torch.equal(weights["backbone.bottom_up.layer1.0.sge.weight"], source.layer1[0].sge.weight.detach())
    assert summary["num_tensors"] == len(weights)
    assert not (tmp_path / "runs" / "cls").exists()  # no classifier was needed


def test_convert_file_source_names_a_missing_file(tmp_path):
    paths, params = _paths_and_params(tmp_path, **{"convert.sources": {"sge_resnet18": "file"},
                                                   "convert.files": {"sge_resnet18": "nowhere.pth"}})
    with pytest.raises(UserError, match=r"nowhere.pth: not found \(params.yaml convert.files.sge_resnet18"):
        convert(params, paths, "sge_resnet18", 0)
    assert not paths.det_weights("sge_resnet18", 0).exists()


def _torchvision_params(tmp_path, base_url: str, sha256: str):
    return _paths_and_params(tmp_path, **{
        "detection_backbones": ["resnet18", "resnet50"],
        "convert.sources": {"resnet50": "torchvision"},
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
    assert not paths.torchvision_weights("resnet50").exists()

    # the leading digits are enough (torchvision's own check), as is the full digest
    paths, params = _torchvision_params(tmp_path, base_url, digest[:8])
    fetched = fetch_weights(params, paths, "resnet50")
    assert Path(fetched["weights"]) == paths.torchvision_weights("resnet50")
    with pytest.raises(UserError, match="'resnet18' does not take torchvision's weights"):
        fetch_weights(params, paths, "resnet18")

    convert(params, paths, "resnet50", 0)
    header = read_weights_metadata(paths.det_weights("resnet50", 0))
    assert header["backbone_source"] == "torchvision" and header["source_format"] == "torchvision"
    assert header["model_kwargs"]["width"] == 64
    weights = torch.load(paths.det_weights("resnet50", 0), weights_only=True)["model"]
    assert torch.equal(weights["backbone.bottom_up.layer4.2.conv3.weight"], made_up.layer4[2].conv3.weight.detach())
