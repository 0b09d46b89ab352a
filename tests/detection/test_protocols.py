"""The detection protocols (train_det.protocol): each one's YAMLs build and train on the generated
COCO set; the authors' settings are really in the built config and model; under `authors` the
BatchNorm statistics stay fixed while the BN affine trains; only the intended keys differ between
protocols."""

import math

import pytest
import torch
from torch import nn

from sge_repro.detection.config import build_detector_config, detector_config_file
from sge_repro.detection.detectors import DETECTORS, PROTOCOLS
from sge_repro.detection.engine import DetectorTrainer, train_detector
from sge_repro.detection.mmdetection import FullModelClipSGD
from sge_repro.detection.setup import schedule_overrides
from sge_repro.errors import UserError
from sge_repro.models.weight_files import load_checkpoint_file
from sge_repro.params_yaml import profile_params

from .conftest import NUM_CATEGORIES, tiny_overrides

from detectron2.layers import FrozenBatchNorm2d  # noqa: E402  (imported by sge_repro.detection first)


def _config(detector, protocol, weights=None, registered=("unused_train", None), output="/tmp/unused",
            config_set="embedded", overrides=None, backbone="sge_resnet18"):
    return build_detector_config(detector, backbone if weights is None else None, weights, *registered, output,
                                 num_classes=NUM_CATEGORIES, seed=0, overrides=overrides, config_set=config_set,
                                 protocol=protocol)


def _flat(node, prefix=""):
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def _differences(a, b) -> dict:
    fa, fb = _flat(a), _flat(b)
    return {key: (fa.get(key), fb.get(key)) for key in fa.keys() | fb.keys() if fa.get(key) != fb.get(key)}


# --------------------------------------------------------------------------- files and what they set
@pytest.mark.parametrize("config_set", ["embedded", "paper"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_protocol_has_a_yaml_per_detector_that_names_it(protocol, config_set):
    for detector in DETECTORS:
        path = detector_config_file(detector, "sge_resnet50", config_set, protocol=protocol)
        if protocol != "detectron2":
            assert protocol in path.parts
        cfg = _config(detector, protocol, config_set=config_set)
        assert cfg.PROTOCOL == protocol


def test_unknown_protocol_and_mismatched_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"detection protocol 'mmdet': expected one of \['detectron2', 'authors', 'controlled'\]"):
        detector_config_file("faster_rcnn", None, "embedded", protocol="mmdet")
    # a protocol's file that does not say it is that protocol's
    (tmp_path / "embedded" / "authors").mkdir(parents=True)
    (tmp_path / "embedded" / "authors" / "faster_rcnn.yaml").write_text('PROTOCOL: "detectron2"\n')
    from sge_repro.detection import config

    original = config.CONFIG_DIR
    config.CONFIG_DIR = tmp_path
    try:
        with pytest.raises(UserError, match="PROTOCOL is 'detectron2', expected 'authors'"):
            _config("faster_rcnn", "authors")
    finally:
        config.CONFIG_DIR = original


# The keys (and values) in which the authors protocol differs from detectron2's, at COCO scale:
# each one a setting of the issue / paper-results.md, nothing else.
AUTHORS_RCNN = {
    "PROTOCOL": "authors",
    "MODEL.SGE_BACKBONE.NORM": "FrozenStatsBN",
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 2000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 2000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 2000,
    "MODEL.RPN.SMOOTH_L1_BETA": 1 / 9,
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlign",
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 2,
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 1.0,
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": "ROIAlign",
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": 2,
    "SOLVER.WEIGHT_DECAY_NORM": 0.0001,
    "SOLVER.CLIP_GRADIENTS.ENABLED": True,
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 35.0,
    "SOLVER.WARMUP_FACTOR": 1 / 3,
}
AUTHORS_RETINANET = {
    "PROTOCOL": "authors",
    "MODEL.SGE_BACKBONE.NORM": "FrozenStatsBN",
    "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA": 0.11,
    "SOLVER.WEIGHT_DECAY_NORM": 0.0001,
    "SOLVER.CLIP_GRADIENTS.ENABLED": True,
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 35.0,
    "SOLVER.WARMUP_FACTOR": 1 / 3,
}


def _expected_authors_difference(detector: str) -> dict:
    if detector == "retinanet":
        return dict(AUTHORS_RETINANET)
    expected = dict(AUTHORS_RCNN)
    if detector == "cascade_rcnn":
        # detectron2's cascade file already keeps 2000 training proposals
        del expected["MODEL.RPN.POST_NMS_TOPK_TRAIN"]
        expected["MODEL.ROI_HEADS.NAME"] = "StageWeightedCascadeROIHeads"
        expected["MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS"] = (1.0, 0.5, 0.25)
    return expected


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


@pytest.mark.parametrize("detector", DETECTORS)
def test_authors_differs_from_detectron2_exactly_in_the_authors_settings(detector):
    authors = _config(detector, "authors", config_set="paper", backbone="resnet50")
    detectron2 = _config(detector, "detectron2", config_set="paper", backbone="resnet50")
    differences = _differences(authors, detectron2)
    expected = _expected_authors_difference(detector)
    assert set(differences) == set(expected), sorted(set(differences) ^ set(expected))
    for key, value in expected.items():
        assert _close(differences[key][0], value), (key, differences[key])
    # settings the detectron2 files already share with the authors: still there
    for cfg in (authors, detectron2):
        assert cfg.MODEL.BACKBONE.FREEZE_AT == 2 and cfg.SOLVER.WARMUP_ITERS == 500
        assert cfg.SOLVER.WARMUP_METHOD == "linear" and cfg.SOLVER.MOMENTUM == 0.9
        assert cfg.SOLVER.WEIGHT_DECAY == 0.0001 and cfg.SOLVER.IMS_PER_BATCH == 16
        assert cfg.SOLVER.BASE_LR == (0.01 if detector == "retinanet" else 0.02)


@pytest.mark.parametrize("detector", DETECTORS)
def test_embedded_authors_has_the_same_settings_at_its_scale(detector):
    """Every authors setting is in the embedded authors file too, except the scale-bound proposal
    counts (there: as many after NMS as before, 300), and the rest of the file is the embedded
    detectron2 one."""
    authors = _config(detector, "authors")
    detectron2 = _config(detector, "detectron2")
    differences = _differences(authors, detectron2)
    expected = _expected_authors_difference(detector)
    scale_bound = {k for k in expected if k.startswith("MODEL.RPN.") and "TOPK" in k}
    for key in set(expected) - scale_bound:
        assert _close(_flat(authors)[key], expected[key]), key
    # the embedded detectron2 file fine-tunes the whole backbone; the authors freeze stem + res2
    extra = {"MODEL.BACKBONE.FREEZE_AT", "MODEL.SOLVER.CLIP_GRADIENTS.NORM_TYPE"}
    assert set(differences) <= set(expected) | extra | {
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "MODEL.RPN.PRE_NMS_TOPK_TEST", "MODEL.RPN.POST_NMS_TOPK_TRAIN",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "SOLVER.BASE_LR"}, sorted(differences)
    assert authors.MODEL.BACKBONE.FREEZE_AT == 2
    if detector != "retinanet":
        rpn = authors.MODEL.RPN
        assert rpn.PRE_NMS_TOPK_TRAIN == rpn.POST_NMS_TOPK_TRAIN == rpn.PRE_NMS_TOPK_TEST == rpn.POST_NMS_TOPK_TEST


@pytest.mark.parametrize("config_set", ["embedded", "paper"])
@pytest.mark.parametrize("detector", DETECTORS)
def test_controlled_is_detectron2s_config_with_its_own_name(detector, config_set):
    controlled = _config(detector, "controlled", config_set=config_set)
    detectron2 = _config(detector, "detectron2", config_set=config_set)
    assert _differences(controlled, detectron2) == {"PROTOCOL": ("controlled", "detectron2")}
    # the protocol is part of the config a run is built from, and of its dump (what a resume checks)
    assert controlled.dump() != detectron2.dump()


# --------------------------------------------------------------------------- read back from the built model
def test_authors_settings_are_in_the_built_faster_rcnn():
    cfg = _config("faster_rcnn", "authors", config_set="paper", backbone="resnet50",
                  overrides={"MODEL.DEVICE": "cpu"})
    model = DetectorTrainer.build_model(cfg)
    rpn = model.proposal_generator
    assert rpn.pre_nms_topk == {True: 2000, False: 2000} and rpn.post_nms_topk == {True: 2000, False: 2000}
    assert rpn.box_reg_loss_type == "smooth_l1" and math.isclose(rpn.smooth_l1_beta, 1 / 9)
    pooler = model.roi_heads.box_pooler.level_poolers[0]
    assert type(pooler).__name__ == "ROIAlign" and pooler.aligned is False and pooler.sampling_ratio == 2
    assert pooler.output_size == (7, 7)
    predictor = model.roi_heads.box_predictor
    assert predictor.box_reg_loss_type == "smooth_l1" and predictor.smooth_l1_beta == 1.0

    bottom_up = model.backbone.bottom_up
    model.train()
    norms = [m for m in bottom_up.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    trained_bn = [m for m in norms if isinstance(m, nn.BatchNorm2d)]
    # stem + res2 frozen entirely (FrozenBatchNorm2d); every other BN: eval mode, affine trainable
    assert isinstance(bottom_up.bn1, FrozenBatchNorm2d)
    assert all(isinstance(m, FrozenBatchNorm2d) for m in bottom_up.layer1.modules() if "BatchNorm" in type(m).__name__)
    assert trained_bn and all(not m.training for m in trained_bn)
    assert all(m.weight.requires_grad and m.bias.requires_grad for m in trained_bn)
    assert all(not p.requires_grad for p in bottom_up.layer1.parameters())

    optimizer = DetectorTrainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, FullModelClipSGD) and optimizer.max_norm == 35.0 and optimizer.norm_type == 2.0
    # weight decay 1e-4 on the BN affine as well (detectron2 would give it 0)
    bn_params = {id(p) for m in trained_bn for p in (m.weight, m.bias)}
    decays = {group["weight_decay"] for group in optimizer.param_groups if id(group["params"][0]) in bn_params}
    assert decays == {0.0001}
    scheduler = DetectorTrainer.build_lr_scheduler(cfg, optimizer)
    # linear warmup over 500 iterations from 1/3 of the lr
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.02 / 3, rel_tol=1e-6)
    for _ in range(500):
        optimizer.step()
        scheduler.step()
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.02, rel_tol=1e-6)


def test_authors_settings_are_in_the_built_mask_cascade_and_retinanet():
    mask = DetectorTrainer.build_model(_config("mask_rcnn", "authors", config_set="paper", backbone="resnet50"))
    pooler = mask.roi_heads.mask_pooler.level_poolers[0]
    assert type(pooler).__name__ == "ROIAlign" and pooler.aligned is False and pooler.sampling_ratio == 2

    cascade = DetectorTrainer.build_model(_config("cascade_rcnn", "authors", config_set="paper", backbone="resnet50"))
    assert type(cascade.roi_heads).__name__ == "StageWeightedCascadeROIHeads"
    assert [p.loss_weight for p in cascade.roi_heads.box_predictor] == [
        {"loss_cls": 1.0, "loss_box_reg": 1.0}, {"loss_cls": 0.5, "loss_box_reg": 0.5},
        {"loss_cls": 0.25, "loss_box_reg": 0.25}]
    assert all(p.smooth_l1_beta == 1.0 for p in cascade.roi_heads.box_predictor)

    retinanet_cfg = _config("retinanet", "authors", config_set="paper", backbone="resnet50")
    retinanet = DetectorTrainer.build_model(retinanet_cfg)
    assert retinanet.box_reg_loss_type == "smooth_l1" and retinanet.smooth_l1_beta == 0.11
    assert retinanet_cfg.SOLVER.BASE_LR == 0.01


def test_wrong_stage_loss_weights_are_a_user_error():
    cfg = _config("cascade_rcnn", "authors")
    cfg.defrost()
    cfg.MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS = [1.0, 0.5]
    with pytest.raises(UserError, match=r"STAGE_LOSS_WEIGHTS: \[1.0, 0.5\], expected 3 non-negative numbers"):
        DetectorTrainer.build_model(cfg)


def test_stage_weighted_cascade_scales_each_stage_loss(detectron2_weights, registered):
    """Same weights, same batch, same sampling: stage k's losses are STAGE_LOSS_WEIGHTS[k] times those
    of equal weights (detectron2's own CascadeROIHeads gives the same losses as weights 1 / 1 / 1)."""
    from detectron2.data import build_detection_train_loader
    from detectron2.utils.events import EventStorage

    torch.set_num_threads(1)
    overrides = tiny_overrides(**{"MODEL.DEVICE": "cpu"})
    weighted = _config("cascade_rcnn", "authors", detectron2_weights, registered, overrides=overrides)
    equal_cfg = weighted.clone()
    equal_cfg.defrost()
    equal_cfg.MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS = [1.0, 1.0, 1.0]
    plain_cfg = equal_cfg.clone()
    plain_cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    models = [DetectorTrainer.build_model(cfg) for cfg in (weighted, equal_cfg, plain_cfg)]
    state = models[0].state_dict()
    for model in models[1:]:
        model.load_state_dict(state)
    batch = next(iter(build_detection_train_loader(weighted)))
    losses = []
    for model in models:
        model.train()
        torch.manual_seed(0)
        with EventStorage(0):
            losses.append({k: float(v) for k, v in model(batch).items()})
    weighted_losses, equal_losses, plain_losses = losses
    assert equal_losses == plain_losses
    for stage, weight in enumerate((1.0, 0.5, 0.25)):
        for name in ("loss_cls", "loss_box_reg"):
            key = f"{name}_stage{stage}"
            assert math.isclose(weighted_losses[key], weight * equal_losses[key], rel_tol=1e-6, abs_tol=1e-12), key
    assert equal_losses["loss_cls_stage2"] > 0


def test_full_model_clipping_clips_the_total_norm_not_each_tensor():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    optimizer = FullModelClipSGD([a, b], lr=1.0, max_norm=35.0)
    a.grad = torch.full((3,), 30.0)  # norm 51.96: alone above 35
    b.grad = torch.full((4,), 10.0)  # norm 20: alone below 35
    total = math.sqrt(3 * 30.0 ** 2 + 4 * 10.0 ** 2)
    optimizer.step()
    scale = 35.0 / total
    # both tensors scaled by one factor (per-tensor clipping would leave b's 10.0 as it is)
    assert torch.allclose(a.detach(), torch.full((3,), -30.0 * scale), rtol=1e-5)
    assert torch.allclose(b.detach(), torch.full((4,), -10.0 * scale), rtol=1e-5)
    assert math.isclose(float(torch.cat([a.detach(), b.detach()]).norm()), 35.0, rel_tol=1e-5)


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("detector", DETECTORS)
def test_each_protocol_trains_a_few_iterations(protocol, detector, detectron2_weights, registered, tmp_path):
    torch.set_num_threads(1)
    cfg = _config(detector, protocol, detectron2_weights, registered, tmp_path / "run", overrides=tiny_overrides())
    final = train_detector(cfg, resume=False)
    assert final.is_file()
    assert 'PROTOCOL: ' + protocol in (tmp_path / "run" / "config.yaml").read_text()


FROZEN_STAGES = ("backbone.bottom_up.bn1.", "backbone.bottom_up.layer1.")  # stem + res2


@pytest.fixture(scope="module")
def calibrated_weights(tmp_path_factory):
    """detectron2 weights of a classifier whose BN running statistics are those of its own
    activations (as after ImageNet training): with the shared fixture's random statistics every
    activation after an eval-mode BN is negative, the ReLUs pass nothing and no gradient reaches
    the BN affine at all."""
    from sge_repro.atomic import torch_save
    from sge_repro.detection.convert import convert_classifier_to_detectron2
    from sge_repro.models import create_model
    from sge_repro.models.weight_files import make_classifier_checkpoint

    from .conftest import GROUPS, IMAGE_SIZE, WIDTH

    model = create_model("sge_resnet18", num_classes=5, groups=GROUPS, width=WIDTH, seed=2)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
    folder = tmp_path_factory.mktemp("calibrated")
    checkpoint = make_classifier_checkpoint("sge_resnet18", {"num_classes": 5, "groups": GROUPS, "width": WIDTH}, model)
    torch_save(checkpoint, folder / "cls.pt")
    convert_classifier_to_detectron2(folder / "cls.pt", folder / "d2.pth")
    return folder / "d2.pth"


def _backbone_bn(state: dict) -> dict:
    """Every BatchNorm tensor of the bottom-up network (the modules with running statistics)."""
    norms = [k[: -len(".running_mean")] for k in state
             if k.startswith("backbone.bottom_up.") and k.endswith(".running_mean")]
    return {f"{n}.{t}": state[f"{n}.{t}"] for n in norms for t in ("running_mean", "running_var", "weight", "bias")}


def _train_and_compare(cfg, weights_path):
    train_detector(cfg, resume=False)
    before = _backbone_bn(load_checkpoint_file(weights_path)["model"])
    after = _backbone_bn(load_checkpoint_file(f"{cfg.OUTPUT_DIR}/model_final.pth")["model"])
    assert before.keys() == after.keys() and before
    stats = [k for k in before if "running_" in k]
    affine = [k for k in before if k.endswith((".weight", ".bias")) and not k.startswith(FROZEN_STAGES)]
    return before, after, stats, affine


def test_authors_keeps_bn_statistics_and_trains_bn_affine(calibrated_weights, registered, tmp_path):
    torch.set_num_threads(1)
    overrides = tiny_overrides(**{"SOLVER.MAX_ITER": 3, "SOLVER.BASE_LR": 0.05, "SOLVER.WARMUP_ITERS": 0})
    cfg = _config("faster_rcnn", "authors", calibrated_weights, registered, tmp_path / "authors", overrides=overrides)
    before, after, stats, affine = _train_and_compare(cfg, calibrated_weights)
    # running statistics: bit for bit those of the ImageNet (here: fixture) classifier
    assert all(torch.equal(before[k], after[k]) for k in stats)
    # the affine of every BN outside the frozen stem + res2 moved; inside them it did not
    moved = [k for k in affine if not torch.equal(before[k], after[k])]
    assert affine and moved == affine, sorted(set(affine) - set(moved))[:5]
    frozen = [k for k in before if k.startswith(FROZEN_STAGES)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)

    # the same check detects moving statistics: with plain BN (batch statistics) they do change
    overrides["MODEL.SGE_BACKBONE.NORM"] = "BN"
    cfg = _config("faster_rcnn", "authors", calibrated_weights, registered, tmp_path / "bn", overrides=overrides)
    before, after, stats, _ = _train_and_compare(cfg, calibrated_weights)
    assert any(not torch.equal(before[k], after[k]) for k in stats if not k.startswith(FROZEN_STAGES))


def test_paper_profile_keeps_the_yaml_warmup_for_every_protocol():
    params = profile_params("paper")
    assert params.train_det.warmup_iters is None
    for protocol in PROTOCOLS:
        overrides = schedule_overrides("faster_rcnn", "paper", params.train_det.max_iter, 16, params.train_det.base_lr,
                                       params.train_det.warmup_iters, 800, 1333, 5000, 4, protocol=protocol)
        assert overrides["SOLVER.WARMUP_ITERS"] == 500
        retinanet = schedule_overrides("retinanet", "paper", params.train_det.max_iter, 16, params.train_det.base_lr,
                                       None, 800, 1333, 5000, 4, protocol=protocol)
        assert retinanet["SOLVER.BASE_LR"] == 0.01
    # an explicit warmup_iters still wins
    assert schedule_overrides("faster_rcnn", "paper", 180000, 16, 0.02, 1000, 800, 1333, 5000, 4,
                              protocol="authors")["SOLVER.WARMUP_ITERS"] == 1000


def test_paper_profile_trains_every_detector_with_every_backbone_as_its_protocol_asks():
    """The paper's table under `controlled`: each detector of params.yaml `detection` with all five backbones,
    each from the classifier the profile trains (the convert source the protocol requires)."""
    from sge_repro.detection.detectors import protocol_weights_source
    from sge_repro.models.registry import parse_model_name

    params = profile_params("paper")
    assert params.train_det.protocol == "controlled" and params.detectors == list(DETECTORS)
    assert params.pairs() == [(detector, backbone) for detector in DETECTORS for backbone in params.models]
    for backbone in params.detection_backbones:
        plain = parse_model_name(backbone).attention == "none"
        assert params.convert_source(backbone) == protocol_weights_source("controlled", plain) == "trained", backbone
    assert params.convert.trained == params.models
