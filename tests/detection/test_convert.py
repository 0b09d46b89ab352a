import pytest
import torch

from float_compare import relative_error
from sge_repro.atomic import torch_save
from sge_repro.detection.config import build_detector_config
from sge_repro.detection.convert import (
    BACKBONE_PREFIX,
    IMAGENET_PIXEL_MEAN,
    check_detector_weights,
    convert_classifier_to_detectron2,
)
from sge_repro.detection.engine import AtomicCheckpointer, DetectorTrainer
from sge_repro.errors import UserError
from sge_repro.models import create_model

from .conftest import GROUPS, WIDTH


def _classifier_features(model, x):
    model.eval()
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        outputs = {}
        for name, layer in zip(("res2", "res3", "res4", "res5"), (model.layer1, model.layer2, model.layer3, model.layer4)):
            x = layer(x)
            outputs[name] = x
    return outputs


def assert_backbone_computes_the_classifier(detector, weights, classifier) -> None:
    """The detector's bottom-up backbone, loaded from the converted `weights`, gives the
    classifier's stage features. detectron2 applies the frozen BatchNorm as x * scale + shift, the
    classifier as (x - mean) / sqrt(var + eps) * weight + bias: other float32 rounding, compared
    norm-wise (tests/float_compare.py); measured <= 2.5e-7 on AMD EPYC (res2; res3-res5 equal),
    the tolerance 40x that."""
    AtomicCheckpointer(detector).load(str(weights))
    detector.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = detector.backbone.bottom_up(x)
    expected = _classifier_features(classifier, x)
    for name in ("res2", "res3", "res4", "res5"):
        assert relative_error(ours[name], expected[name]) <= 1e-5, name


def test_round_trip_gives_identical_backbone_features(classifier_checkpoint, detectron2_weights, registered, tmp_path):
    _, classifier = classifier_checkpoint
    cfg = build_detector_config("faster_rcnn", None, detectron2_weights, *registered, tmp_path, num_classes=2, seed=0)
    # the architecture comes from the converted file's header
    assert (cfg.MODEL.SGE_BACKBONE.ARCH, cfg.MODEL.SGE_BACKBONE.WIDTH, cfg.MODEL.SGE_BACKBONE.GROUPS) == (
        "sge_resnet18", WIDTH, GROUPS)
    detector = DetectorTrainer.build_model(cfg)
    report = check_detector_weights(detector, detectron2_weights, pixel_mean=cfg.MODEL.PIXEL_MEAN,
                                    pixel_std=cfg.MODEL.PIXEL_STD)
    assert report["loaded"] > 0 and all(not k.startswith(BACKBONE_PREFIX) for k in report["missing_heads"])
    assert_backbone_computes_the_classifier(detector, detectron2_weights, classifier)


def test_converted_file_drops_fc_and_records_conventions(detectron2_weights):
    loaded = torch.load(detectron2_weights, map_location="cpu", weights_only=True)
    assert loaded["matching_heuristics"] is False
    keys = list(loaded["model"])
    assert all(k.startswith(BACKBONE_PREFIX) for k in keys)
    assert not any(".fc." in k or k.endswith("num_batches_tracked") for k in keys)
    assert f"{BACKBONE_PREFIX}layer1.0.sge.weight" in keys
    meta = loaded["sge_repro"]
    assert meta["input_format"] == "RGB" and meta["pixel_mean"] == IMAGENET_PIXEL_MEAN
    assert meta["model"] == "sge_resnet18" and meta["model_kwargs"] == {"groups": GROUPS, "width": WIDTH}


def test_torchvision_and_official_files_convert_to_the_same_tensors(classifier_checkpoint, tmp_path):
    _, model = classifier_checkpoint
    state = model.state_dict()
    torch_save(state, tmp_path / "tv.pth")
    official = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}, "acc": 1.0, "best_acc": 1.0,
                "optimizer": {}}
    torch_save(official, tmp_path / "official.pth.tar")
    tv = convert_classifier_to_detectron2(tmp_path / "tv.pth", tmp_path / "tv_d2.pth")
    off = convert_classifier_to_detectron2(tmp_path / "official.pth.tar", tmp_path / "off_d2.pth")
    assert tv["source_format"] == "torchvision" and off["source_format"] == "official"
    assert tv["model"] == off["model"] == "sge_resnet18"  # inferred from the keys
    a = torch.load(tmp_path / "tv_d2.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "off_d2.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_wrong_architecture_is_refused_at_conversion(classifier_checkpoint, tmp_path):
    with pytest.raises(UserError, match="resnet18"):
        convert_classifier_to_detectron2(classifier_checkpoint[0], tmp_path / "x.pth", model_name="resnet18")
    plain = create_model("resnet18", num_classes=5, width=WIDTH).state_dict()
    torch_save(plain, tmp_path / "plain.pth")
    with pytest.raises(UserError, match="does not match the model"):
        convert_classifier_to_detectron2(tmp_path / "plain.pth", tmp_path / "x.pth", model_name="sge_resnet18",
                                         model_kwargs={"groups": GROUPS})


def test_a_missing_backbone_tensor_is_an_error_not_a_random_init(detectron2_weights, registered, tmp_path):
    loaded = torch.load(detectron2_weights, weights_only=True)
    del loaded["model"][f"{BACKBONE_PREFIX}layer3.1.conv2.weight"]
    torch_save(loaded, tmp_path / "partial.pth")
    cfg = build_detector_config("retinanet", None, tmp_path / "partial.pth", *registered, tmp_path / "run",
                                num_classes=2, seed=0)
    detector = DetectorTrainer.build_model(cfg)
    with pytest.raises(UserError, match=r"1 backbone tensors missing \(first: backbone.bottom_up.layer3.1.conv2.weight"):
        check_detector_weights(detector, tmp_path / "partial.pth")


def test_weights_of_another_backbone_are_refused(detectron2_weights, registered, tmp_path):
    with pytest.raises(UserError, match="converted from 'sge_resnet18'"):
        build_detector_config("faster_rcnn", "resnet18", detectron2_weights, *registered, tmp_path, 2, 0)


def test_pixel_convention_mismatch_is_refused(detectron2_weights, registered, tmp_path):
    cfg = build_detector_config("faster_rcnn", None, detectron2_weights, *registered, tmp_path, 2, 0,
                                overrides={"MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675]})
    detector = DetectorTrainer.build_model(cfg)
    with pytest.raises(UserError, match="pixel_mean"):
        check_detector_weights(detector, detectron2_weights, pixel_mean=cfg.MODEL.PIXEL_MEAN)


def test_an_sge_without_normalization_converts_and_builds_as_such(registered, tmp_path):
    """The classifier's header says sge_normalize: false; convert records it, the detector config
    takes it from the weights (as WIDTH / GROUPS), the backbone computes the classifier's
    features, and asking for the normalised module on these weights is an error."""
    from sge_repro.detection.engine import _weights_metadata
    from sge_repro.models.weight_files import make_classifier_checkpoint
    from sge_repro.models.attention import SpatialGroupEnhance

    kwargs = {"num_classes": 5, "groups": GROUPS, "width": WIDTH}
    classifier = create_model("sge_resnet18", seed=3, sge_normalize=False, sge_weight_init=0.01, **kwargs)
    source = torch_save(make_classifier_checkpoint("sge_resnet18", kwargs, classifier), tmp_path / "cls.pt")
    weights = tmp_path / "d2.pth"
    summary = convert_classifier_to_detectron2(source, weights)
    assert summary["model_kwargs"] == {"groups": GROUPS, "width": WIDTH, "sge_normalize": False}

    for variant in (None, {"sge_normalize": False, "sge_weight_init": 0.01}):
        cfg = build_detector_config("faster_rcnn", None, weights, *registered, tmp_path / "run", num_classes=2, seed=0,
                                    sge_variant=variant)
        assert cfg.MODEL.SGE_BACKBONE.SGE_NORMALIZE is False
    assert cfg.MODEL.SGE_BACKBONE.SGE_WEIGHT_INIT == 0.01 and _weights_metadata(cfg)["model_kwargs"]["sge_normalize"] is False
    detector = DetectorTrainer.build_model(cfg)
    assert {module.normalize for module in detector.modules() if isinstance(module, SpatialGroupEnhance)} == {False}
    assert_backbone_computes_the_classifier(detector, weights, classifier)
    with pytest.raises(UserError, match=r"converted from an SGE with sge_normalize=False, but model.sge_normalize is True"):
        build_detector_config("faster_rcnn", None, weights, *registered, tmp_path / "run", num_classes=2, seed=0,
                              sge_variant={"sge_normalize": True})
