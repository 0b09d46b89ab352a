"""Which YAML a run uses: the "embedded" and "paper" config sets; the YAMLs leave the backbone's
width and groups to the converted weights' header."""

import pytest
import yaml

from sge_repro.detection.config import CONFIG_DIR, detector_config_file
from sge_repro.detection.detectors import DETECTORS
from sge_repro.errors import UserError


def test_paper_files_follow_the_parsed_backbone_name():
    assert detector_config_file("faster_rcnn", "sge_resnet101", "paper").name == "faster_rcnn_SGE_R101_FPN_2x.yaml"
    assert detector_config_file("mask_rcnn", "se_resnet101", "paper").name == "mask_rcnn_R101_FPN_2x.yaml"
    assert detector_config_file("cascade_rcnn", None, "paper").name == "cascade_rcnn_R50_FPN_20e.yaml"
    assert detector_config_file("retinanet", "sge_resnet18", "paper").name == "retinanet_SGE_R50_FPN_2x.yaml"
    with pytest.raises(UserError, match="unknown name 'sge_resnet19'"):
        detector_config_file("retinanet", "sge_resnet19", "paper")


@pytest.mark.parametrize("detector", DETECTORS)
def test_embedded_set_has_every_detector(detector):
    assert detector_config_file(detector, None, "embedded") == CONFIG_DIR / "embedded" / f"{detector}.yaml"


def test_the_old_cpu_name_is_refused():
    with pytest.raises(UserError, match="config set 'cpu': expected one of \\['embedded', 'paper'\\]"):
        detector_config_file("faster_rcnn", None, "cpu")


def test_no_yaml_sets_width_or_groups():
    for path in CONFIG_DIR.rglob("*.yaml"):
        node = (yaml.safe_load(path.read_text()).get("MODEL") or {}).get("SGE_BACKBONE") or {}
        assert not {"WIDTH", "GROUPS"} & set(node), path
