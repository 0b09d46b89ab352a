"""params.yaml `released` and the import_cls stage (a given file as run seed 0, no training)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from authors_reference import AuthorsResNet, randomize, release_file
from sge_repro.errors import UserError
from sge_repro.models import create_model
from sge_repro.params import validate_params
from sge_repro.params_yaml import dump_params, profile_params
from sge_repro.paths import ProjectPaths
from sge_repro.stages.classification import import_cls


def _smoke(**changes) -> dict:
    raw = yaml.safe_load(dump_params(profile_params("smoke")))
    raw.update(changes)
    return raw


@pytest.mark.parametrize("changes, message", [
    ({"released": {"resnet18": "a.pth"}}, "released: resnet18 also in models"),
    ({"released": {"sge_resnet7": "a.pth"}}, "released: unknown model 'sge_resnet7'"),
    ({"released": {"se_resnet50": ""}}, "released: 'se_resnet50' has no checkpoint path"),
    ({"models": [], "convert": {"trained": [], "files": {"resnet18": "a.pth", "sge_resnet18": "b.pth"}}},
     "models: empty, and no released checkpoints"),
])
def test_released_params_errors(changes, message):
    with pytest.raises(UserError) as error:
        validate_params(_smoke(**changes), "params.yaml")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_only_released_classifiers_is_valid():
    params = validate_params(_smoke(models=[], released={"sge_resnet18": "released/sge.pth.tar"},
                                    convert={"trained": [], "files": {"resnet18": "a.pth",
                                                                      "sge_resnet18": "released/sge.pth.tar"}}))
    assert params.models == [] and {params.convert_source(b) for b in params.detection_backbones} == {"file"}


def test_import_keeps_the_authors_computation(tmp_path):
    """A BAM release imported in our format still computes as the authors' BAM (their product of gates)."""
    theirs = randomize(AuthorsResNet("bam", 50, width=32, num_classes=5), seed=1).eval()
    (tmp_path / "released").mkdir()
    release_file(theirs, tmp_path / "released" / "bam.pth.tar")
    params = validate_params(_smoke(released={"bam_resnet50": "released/bam.pth.tar"}))
    paths = ProjectPaths(tmp_path)
    record = import_cls(params, paths, "bam_resnet50")
    assert record["authors_computation"] is True and record["source_format"] == "official"
    assert record["model_kwargs"] == {"num_classes": 5, "groups": 64, "width": 32}
    imported = create_model("bam_resnet50", num_classes=5, width=32,
                            checkpoint=paths.cls_checkpoint("bam_resnet50", 0, "best")).eval()
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(imported(image), theirs(image))
    assert paths.cls_checkpoint("bam_resnet50", 0, "last").read_bytes() == \
        paths.cls_checkpoint("bam_resnet50", 0, "best").read_bytes()
    assert json.loads(paths.cls_train_metrics("bam_resnet50", 0).read_text())["epochs_trained_here"] == 0


def test_import_names_a_missing_or_unlisted_file(tmp_path):
    params = validate_params(_smoke(released={"sge_resnet50": "released/nowhere.pth.tar"}))
    paths = ProjectPaths(tmp_path)
    with pytest.raises(UserError, match=r"params.yaml: released.sge_resnet50: .*nowhere.pth.tar: file not found"):
        import_cls(params, paths, "sge_resnet50")
    with pytest.raises(UserError, match="released: 'se_resnet50' is not listed"):
        import_cls(params, paths, "se_resnet50")
    assert not (tmp_path / "runs").exists()


def test_the_released_profile_takes_torchvision_weights_and_the_authors_file():
    """The released profile's detection: ResNet50 from torchvision, SGE-ResNet50 from the authors' file, no
    classifier trained for either."""
    params = profile_params("released")
    assert params.pairs() == [("faster_rcnn", "resnet50"), ("faster_rcnn", "sge_resnet50")]
    assert {b: params.convert_source(b) for b in params.detection_backbones} == {
        "resnet50": "torchvision", "sge_resnet50": "file"}
    assert params.convert.trained == [] and params.convert.files == {"sge_resnet50": "released/sge_resnet50.pth.tar"}
